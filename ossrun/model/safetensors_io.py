"""Zero-copy safetensors reading and streaming writing.

The `safetensors` library copies every tensor it loads into process memory; a 13 GB checkpoint
must instead stay memory-mapped so that only the pages a step touches become resident (a small file
that may change under the server, a LoRA adapter, is read whole instead: `read_whole`). Writing
streams tensor by tensor so the `20b` random checkpoint is never whole in memory. The file format
is the library's own (and our tests read our files back with it).
"""

from __future__ import annotations

import io
import json
import mmap
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "U8": torch.uint8,
    "I8": torch.int8, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * self.dtype.itemsize


class SafetensorsError(ValueError):
    """A file that is not a whole safetensors file (cut short, not one at all, a header that contradicts itself).
    Said without the file's name: the caller knows what the file is to it and names it."""


def read_header(path: Path) -> tuple[int, dict]:
    """(where the data starts, the JSON header); a SafetensorsError for a file that is not safetensors (a header
    length beyond the file would otherwise ask for exabytes of memory)."""
    with open(path, "rb") as f:
        return _header(f, os.fstat(f.fileno()).st_size)


def _header(f: BinaryIO, size: int) -> tuple[int, dict]:
    prefix = f.read(8)
    if len(prefix) < 8:
        raise SafetensorsError(f"not a safetensors file: {size} bytes, too short for a header")
    (length,) = struct.unpack("<Q", prefix)
    if length > size - 8:
        raise SafetensorsError(f"not a safetensors file: its header length {length} runs past the end of the file")
    try:
        header = json.loads(f.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsError(f"not a safetensors file: its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SafetensorsError("not a safetensors file: its header is not a JSON object")
    return 8 + length, header


@dataclass(frozen=True, slots=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _entries(header: dict, data_bytes: int) -> dict[str, _Entry]:
    """The header's tensors, each checked against itself and the file's size: a cut-short file (an interrupted
    download) is then one clear error here, not `torch.frombuffer`'s arithmetic, and nothing reads the data."""
    entries = {name: _entry(name, info) for name, info in header.items() if name != "__metadata__"}
    needed = max((e.end for e in entries.values()), default=0)
    if needed > data_bytes:
        raise SafetensorsError(f"cut short: its header describes {needed} bytes of tensors, the file holds {data_bytes} "
                               "(an interrupted download or copy?)")
    return entries


def _entry(name: str, info: object) -> _Entry:
    if not isinstance(info, dict):
        raise SafetensorsError(f"its header's entry for {name} is not an object")
    if info.get("dtype") not in DTYPES:
        raise SafetensorsError(f"tensor {name} has dtype {info.get('dtype')!r}, not one of {', '.join(DTYPES)}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not _naturals(shape):
        raise SafetensorsError(f"tensor {name} has shape {shape!r}, not a list of sizes")
    if not (_naturals(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
        raise SafetensorsError(f"tensor {name} has data_offsets {offsets!r}, not [begin, end]")
    entry = _Entry(DTYPES[info["dtype"]], tuple(shape), offsets[0], offsets[1])
    expected = TensorSpec(name, entry.dtype, entry.shape).nbytes
    if entry.end - entry.begin != expected:
        raise SafetensorsError(f"tensor {name} ({info['dtype']} {list(shape)}) needs {expected} bytes, its data_offsets span "
                               f"{entry.end - entry.begin}")
    return entry


def _naturals(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def open_mmap(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one file as views into a private (copy-on-write) memory map.

    Nothing is read until used; pages are shared with the page cache, so resident memory grows
    only with what a forward actually touches. The header is checked first (SafetensorsError).
    """
    data_start, header = read_header(path)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    return _tensors(mapped, data_start, header)


def read_whole(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one small file, read into the process's memory in one read: what they hold never changes after,
    whatever happens to the file (a map shows the file's later contents in pages not yet touched, and faults with
    SIGBUS past the end of a file cut short). For files that are not ours to keep still, such as a LoRA adapter in
    an operator's folder. The header is checked first (SafetensorsError)."""
    data = bytearray(path.read_bytes())
    data_start, header = _header(io.BytesIO(data), len(data))
    return _tensors(data, data_start, header)


def _tensors(buffer: mmap.mmap | bytearray, data_start: int, header: dict) -> dict[str, torch.Tensor]:
    """The header's tensors as views into `buffer` (the whole file)."""
    tensors = {}
    for name, entry in _entries(header, len(buffer) - data_start).items():
        if entry.end == entry.begin:
            tensors[name] = torch.empty(entry.shape, dtype=entry.dtype)
            continue
        count = (entry.end - entry.begin) // entry.dtype.itemsize
        tensors[name] = torch.frombuffer(buffer, dtype=entry.dtype, count=count, offset=data_start + entry.begin).view(entry.shape)
    return tensors


def write_streaming(path: Path, specs: Iterable[TensorSpec], make: Callable[[TensorSpec], torch.Tensor],
                    metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose tensors are produced one at a time by `make(spec)`."""
    specs = list(specs)
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for spec in specs:
            tensor = make(spec)
            if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                raise ValueError(f"{spec.name}: made {tensor.dtype} {tuple(tensor.shape)}, expected {spec.dtype} {spec.shape}")
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
