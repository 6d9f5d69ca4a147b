"""Zero-copy safetensors reading and streaming writing.

The `safetensors` library copies every tensor it loads into process memory; a 13 GB checkpoint
must instead stay memory-mapped so that only the pages a step touches become resident. Writing
streams tensor by tensor so the `20b` random checkpoint is never whole in memory. The file format
is the library's own (and our tests read our files back with it).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

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
        return count * torch.empty((), dtype=self.dtype).element_size()


def read_header(path: Path) -> tuple[int, dict]:
    """(where the data starts, the JSON header); a ValueError for a file that is not safetensors (a header length
    beyond the file would otherwise ask for exabytes of memory)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > os.fstat(f.fileno()).st_size - 8:
            raise ValueError(f"its header length {length} runs past the end of the file")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    return 8 + length, header


def open_mmap(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one file as views into a private (copy-on-write) memory map.

    Nothing is read until used; pages are shared with the page cache, so resident memory grows
    only with what a forward actually touches.
    """
    data_start, header = read_header(path)
    header.pop("__metadata__", None)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if info.get("dtype") not in DTYPES:
            raise ValueError(f"tensor {name} has dtype {info.get('dtype')!r}, not one of {', '.join(DTYPES)}")
        dtype = DTYPES[info["dtype"]]
        shape = tuple(info["shape"])
        if end == begin:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        flat = torch.frombuffer(mapped, dtype=dtype, count=(end - begin) // _itemsize(dtype), offset=data_start + begin)
        tensors[name] = flat.view(shape)
    return tensors


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


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
