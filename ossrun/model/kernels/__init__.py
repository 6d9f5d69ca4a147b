"""Native CPU kernels, compiled on first use with the system C compiler and loaded with ctypes.

A kernel is a drop-in behind one function; the plain PyTorch path stays the reference (tests
compare the two) and is used wherever a kernel is unavailable: no compiler, another device,
`OSSRUN_KERNELS=0`.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ossrun.paths import cache_dir

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("mxfp4_cpu.c")
_lib: ctypes.CDLL | None = None
_tried = False


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler: MXFP4 experts use the PyTorch path")
        return None
    source = _SOURCE.read_bytes()
    digest = hashlib.sha256(source + _cpu_flags().encode() + platform.machine().encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"mxfp4_cpu-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            command = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(_SOURCE), "-o", str(built), "-lm"]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                log.warning("MXFP4 kernel did not compile (%s); using the PyTorch path", result.stderr.strip()[:500])
                return None
            built.replace(target)  # atomic: concurrent first uses never load a half-written file
    lib = ctypes.CDLL(str(target))
    lib.mxfp4_grouped_linear.restype = ctypes.c_int
    lib.mxfp4_grouped_linear.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    return lib


def _library() -> ctypes.CDLL | None:
    global _lib, _tried
    if not _tried:
        _tried = True
        if os.environ.get("OSSRUN_KERNELS", "1") != "0":
            try:
                _lib = _build()
            except Exception:  # a broken toolchain must never break the model: fall back
                log.exception("MXFP4 kernel unavailable; using the PyTorch path")
                _lib = None
    return _lib


def mxfp4_kernel_available(device: torch.device) -> bool:
    """Whether the fused packed-weight kernel runs on `device` (CPU with a working C compiler)."""
    return device.type == "cpu" and _library() is not None


def mxfp4_grouped_linear(x: torch.Tensor, offsets: torch.Tensor, experts: torch.Tensor, blocks: torch.Tensor,
                         scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Rows of x [P, K] grouped by expert (group g = rows offsets[g]:offsets[g+1], expert experts[g]) times
    their expert's packed weights (blocks [E, O, K/32, 16], scales [E, O, K/32]) plus bias [E, O] → [P, O] fp32."""
    lib = _library()
    rows, k = x.shape
    out_features = blocks.shape[1]
    x = x.float().contiguous()
    offsets, experts = offsets.to(torch.int64).contiguous(), experts.to(torch.int64).contiguous()
    blocks, scales = blocks.contiguous(), scales.contiguous()
    bias = None if bias is None else bias.float().contiguous()
    y = torch.empty(rows, out_features, dtype=torch.float32)
    status = lib.mxfp4_grouped_linear(x.data_ptr(), k, offsets.data_ptr(), experts.data_ptr(), len(experts), blocks.data_ptr(),
                                      scales.data_ptr(), out_features, None if bias is None else bias.data_ptr(), y.data_ptr())
    if status != 0:
        raise ValueError(f"mxfp4_grouped_linear rejected shapes x={tuple(x.shape)} blocks={tuple(blocks.shape)}")
    return y
