"""The model's dense (non-expert) projections, in full precision or with 8-bit weights.

The exact precision keeps `F.linear` on weights at the model's dtype: the reference computation.
The fast precision on the CPU quantises the weight once at load to Q8 blocks (see
`kernels/dense_cpu.py`) and multiplies with the int8 kernel: half the bytes of bf16 per token,
and integer dot products that beat torch's bf16 GEMM on CPUs without native bf16 at every row
count (bench/dense_cpu.py). Elsewhere (CUDA, no compiler) fast keeps full-precision weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ossrun.model.kernels.dense_cpu import BLOCK, Q8Weight, q8_kernel_available, q8_linear, quantize_weight


def uses_q8(precision: str, device: torch.device, in_features: int) -> bool:
    """Whether a projection with `in_features` inputs gets Q8 weights under `precision` on `device`."""
    return precision == "fast" and in_features % BLOCK == 0 and q8_kernel_available(device)


class DenseLinear(nn.Module):
    """y = x Wᵀ + b, with W [N, K] at `dtype`, or in Q8 when `uses_q8` says so (bias then kept in fp32)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device,
                 precision: str = "exact"):
        super().__init__()
        self.quantized = uses_q8(precision, device, weight.shape[1])
        bias_dtype = torch.float32 if self.quantized else dtype
        self.bias = None if bias is None else nn.Parameter(bias.to(device=device, dtype=bias_dtype), requires_grad=False)
        if self.quantized:
            q8 = quantize_weight(weight)
            self.register_buffer("values", q8.values, persistent=False)
            self.register_buffer("scales", q8.scales, persistent=False)
            self.scale = q8.scale
            self.weight = None
        else:
            self.weight = nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """x [T, K] → [T, N] in `out_dtype` (default: x's dtype)."""
        out_dtype = out_dtype or x.dtype
        if self.quantized:
            return q8_linear(x, Q8Weight(self.values, self.scales, self.scale), self.bias).to(out_dtype)
        return F.linear(x, self.weight, self.bias).to(out_dtype)
