"""8-bit dense weights for the CPU's fast path: Q8 blocks quantised at load, multiplied by a C kernel.

A weight [N, K] becomes int8 values (per block of 32 along K, scaled to [-127, 127]) and one
fp16 scale per block times one power of two per tensor. `q8_linear` quantises the activations
the same way and runs `q8_cpu.c` (integer dot products per block, both cores). The PyTorch
functions here are the reference the tests hold the kernel to, and the fallback where no kernel
can be built.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ossrun.model.kernels.build import kernels_enabled, load_selected

BLOCK = 32
_SOURCE = Path(__file__).with_name("q8_cpu.c")
# fp16 scales hold up to 65504; the per-tensor power of two puts the largest block scale near 2^14,
# so scales down to 2^-28 of it stay normal fp16 numbers (no subnormal precision loss).
_TOP_EXPONENT = 14


@dataclass(frozen=True)
class Q8Weight:
    """values [N, K] int8 in [-127, 127]; scales [N, K/32] fp16; weight ≈ values * scales * scale."""

    values: torch.Tensor
    scales: torch.Tensor
    scale: float

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)

    @property
    def nbytes(self) -> int:
        return self.values.numel() + 2 * self.scales.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.values.shape
        blocks = self.values.view(n, k // BLOCK, BLOCK).float() * (self.scales.float() * self.scale).unsqueeze(-1)
        return blocks.view(n, k).to(dtype)


def quantize_weight(weight: torch.Tensor, chunk_rows: int = 4096) -> Q8Weight:
    """[N, K] (K a multiple of 32) → Q8Weight, rounding each weight to the nearest step of its block.

    Works through `chunk_rows` rows at a time, so quantising the 20b unembedding never holds an
    fp32 copy of it (2.3 GB).
    """
    n, k = weight.shape
    if k % BLOCK:
        raise ValueError(f"Q8 needs in-features divisible by {BLOCK}, got {k}")
    amax = torch.cat([_blocks(weight[i:i + chunk_rows]).abs().amax(dim=-1) for i in range(0, n, chunk_rows)])  # [N, K/32]
    top = float(amax.max()) / 127.0 if n else 0.0
    scale = 2.0 ** (math.frexp(top)[1] - _TOP_EXPONENT) if top > 0 else 1.0
    scales = (amax / 127.0 / scale).to(torch.float16)
    values = torch.empty(n, k, dtype=torch.int8)
    for i in range(0, n, chunk_rows):
        step = scales[i:i + chunk_rows].float() * scale
        inv = torch.where(step > 0, 1.0 / step, torch.zeros_like(step))
        q = torch.round(_blocks(weight[i:i + chunk_rows]) * inv.unsqueeze(-1)).clamp_(-127, 127)
        values[i:i + chunk_rows] = q.reshape(-1, k).to(torch.int8)
    return Q8Weight(values, scales.contiguous(), scale)


def _blocks(rows: torch.Tensor) -> torch.Tensor:
    """[n, K] → fp32 [n, K/32, 32]."""
    return rows.detach().float().reshape(rows.shape[0], -1, BLOCK)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] → int8 [M, K], fp32 scales [M, K/32]: the kernel's own activation rounding (reference). A block holding
    NaN or inf has scale NaN (its values are then meaningless); one whose inverse scale is not finite quantises to 0."""
    m, k = x.shape
    blocks = x.float().reshape(m, k // BLOCK, BLOCK)
    d = blocks.abs().amax(dim=-1) / 127.0
    d = torch.where(torch.isfinite(blocks).all(-1), d, torch.full_like(d, float("nan")))
    inv = 1.0 / d
    inv = torch.where(torch.isfinite(inv), inv, torch.zeros_like(inv))
    q = torch.round(blocks * inv.unsqueeze(-1)).to(torch.int8)
    return q.reshape(m, k), d


def q8_linear_reference(x: torch.Tensor, weight: Q8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the kernel computes, in float64: per-block integer dots times both scales, summed → [M, N] fp32."""
    xq, xd = quantize_activations(x)
    m, k = xq.shape
    n = weight.values.shape[0]
    xb = xq.view(m, k // BLOCK, BLOCK).double()
    wb = weight.values.view(n, k // BLOCK, BLOCK).double()
    dots = torch.einsum("mbj,nbj->mnb", xb, wb)  # exact integers
    y = (dots * xd.double().unsqueeze(1) * (weight.scales.double() * weight.scale).unsqueeze(0)).sum(-1)
    if bias is not None:
        y = y + bias.double()
    return y.float()


def _library() -> ctypes.CDLL | None:
    if not kernels_enabled():
        return None
    lib = load_selected(_SOURCE)
    if lib is not None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.q8_linear.restype = ctypes.c_int
        lib.q8_linear.argtypes = [ptr, i64, i64, ptr, ptr, ctypes.c_float, i64, ptr, ptr, ctypes.c_int]
        lib.q8_quantize_rows.restype = ctypes.c_int
        lib.q8_quantize_rows.argtypes = [ptr, i64, i64, ptr, ptr, ctypes.c_int]
        lib.q8_amx_active.restype = ctypes.c_int
        lib.q8_amx_active.argtypes = []
    return lib


def amx_active() -> bool:
    """Whether products of many rows run on AMX tiles now: the CPU has them, Linux granted them, `OSSRUN_CPU_AMX` is
    not 0 and the selected variant is avx512vnni or avx512bf16 (the ones built with them)."""
    lib = _library()
    return lib is not None and bool(lib.q8_amx_active())


def q8_kernel_available(device: torch.device) -> bool:
    """Whether the Q8 kernel runs on `device` (CPU with a working C compiler, kernels not turned off)."""
    return device.type == "cpu" and _library() is not None


def q8_quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's activation quantisation on its own (tests compare it with `quantize_activations`)."""
    x = x.float().contiguous()
    m, k = x.shape
    q, d = torch.empty(m, k, dtype=torch.int8), torch.empty(m, k // BLOCK, dtype=torch.float32)
    if _library().q8_quantize_rows(x.data_ptr(), m, k, q.data_ptr(), d.data_ptr(), torch.get_num_threads()) != 0:
        raise ValueError(f"q8_quantize_rows rejected shape {tuple(x.shape)}")
    return q, d


def q8_linear(x: torch.Tensor, weight: Q8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] times the Q8 weight [N, K] transposed, plus bias [N] (fp32) → [M, N] fp32.

    Without the kernel (no compiler, `OSSRUN_KERNELS=0`) the weight is dequantised and BLAS does it.
    """
    lib = _library()
    if lib is None:
        return F.linear(x.float(), weight.dequantize(), None if bias is None else bias.float())
    x = x.float().contiguous()
    m, k = x.shape
    n = weight.values.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.float().contiguous()
    bias_ptr = None if bias is None else bias.data_ptr()
    status = lib.q8_linear(x.data_ptr(), m, k, weight.values.data_ptr(), weight.scales.data_ptr(), weight.scale, n,
                           bias_ptr, y.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise ValueError(f"q8_linear rejected x={tuple(x.shape)} weight={weight.shape} (status {status})")
    return y
