"""Where the CUDA path meets the model: whether the Triton kernels run, and the per-step launch data.

The kernel modules are imported lazily: Triton decides at decoration time whether a kernel is
compiled or interpreted (TRITON_INTERPRET), and a CPU process that never takes this path
should not pay for importing Triton at all.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ossrun.model.kernels.build import kernels_enabled


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_available(device: torch.device, precision: str) -> bool:
    """Whether the Triton kernels replace the PyTorch reference: CUDA, fast precision, kernels on, triton installed."""
    return device.type == "cuda" and precision == "fast" and kernels_enabled() and _triton_importable()


@dataclass(slots=True)
class PagedLaunch:
    """One step's query layout as device tensors, built once per step and shared by every layer."""

    q_starts: torch.Tensor  # [B] first query row of each sequence in the flat batch
    q_lens: torch.Tensor  # [B]
    positions: torch.Tensor  # [T]
    decode_seqs: torch.Tensor  # sequences with one query (one launch)
    prefill_seqs: torch.Tensor  # sequences with several (another launch)
    max_prefill_len: int

    @classmethod
    def build(cls, query_starts: list[int], query_lens: list[int], prefill_rows: list[int], positions: torch.Tensor) -> "PagedLaunch":
        device = positions.device
        decode = [b for b, n in enumerate(query_lens) if n == 1]
        as_tensor = functools.partial(torch.tensor, dtype=torch.int32, device=device)
        return cls(as_tensor(query_starts), as_tensor(query_lens), positions, as_tensor(decode), as_tensor(prefill_rows),
                   max((query_lens[b] for b in prefill_rows), default=0))

    def __call__(self, group, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, sinks: torch.Tensor,
                 window: int | None, scale: float) -> torch.Tensor:
        """q [T, Hq, D] against the paged cache of `group` (a `PagedGroup`, already written) → [T, Hq, D]."""
        from ossrun.model.kernels.triton_attention import paged_attention

        out = torch.empty_like(q)
        common = (q, k_cache, v_cache, sinks, window, scale, group.block_tables, group.first_block, group.context_lens,
                  self.q_starts, self.q_lens, self.positions)
        paged_attention(*common, self.decode_seqs, 1, out)
        paged_attention(*common, self.prefill_seqs, self.max_prefill_len, out)
        return out


def linear(layer, x: torch.Tensor, out_dtype: torch.dtype | None = None, residual: torch.Tensor | None = None,
           norm=None) -> torch.Tensor:
    """`residual + layer(norm(x), out_dtype)` for a `DenseLinear` on the CUDA fast path (`norm`: an `RMSNorm` or None):
    few rows take the Triton GEMV (bias and residual fused, and the norm where `fuse_norm()`, `kernels/triton_gemv.py`),
    more rows cuBLAS through the layer."""
    from ossrun.model.kernels.triton_gemv import fuse_norm, gemv, gemv_max_rows

    if layer.weight is not None and x.shape[0] <= gemv_max_rows():
        if norm is not None and fuse_norm():
            return gemv(x, layer.weight, layer.bias, out_dtype, residual, norm=(norm.scale, norm.eps))
        return gemv(norm(x) if norm is not None else x, layer.weight, layer.bias, out_dtype, residual)
    y = layer(norm(x) if norm is not None else x, out_dtype)
    return y if residual is None else residual + y
