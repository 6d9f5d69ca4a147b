"""Native CPU kernels, compiled on first use with the system C compiler and loaded with ctypes.

A kernel is a drop-in behind one function; the plain PyTorch path stays the reference (tests
compare the two) and is used wherever a kernel is unavailable: no compiler, another device,
`OSSRUN_KERNELS=0`. `build.py` compiles them and picks the instruction set at run time.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from ossrun.model.kernels.build import kernels_enabled, load_selected

_SOURCE = Path(__file__).with_name("mxfp4_cpu.c")


def _library() -> ctypes.CDLL | None:
    if not kernels_enabled():
        return None
    lib = load_selected(_SOURCE)
    if lib is not None:
        lib.mxfp4_grouped_linear.restype = ctypes.c_int
        lib.mxfp4_grouped_linear.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    return lib


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
