"""A layer's small operations fused in Triton, for the CUDA fast path.

At batch 1 a decode step is hundreds of tiny kernels; each of these replaces a chain of them
with one launch computing the same arithmetic as the PyTorch reference:
- `rms_norm`: fp32 RMSNorm (`gpt_oss.RMSNorm`), one row per program (8 launches → 1);
- `rope_and_cache`: YaRN RoPE of q and k straight from the qkv projection, k and v written into
  their cache slots, q returned (`Rotary.apply` twice, the split copies and both cache writes: ~20 → 1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ossrun.model.kernels.triton_moe import pdl, pdl_launch, pdl_release, pdl_wait


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, stride_x, stride_y, eps, N: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_release(PDL)
    pdl_wait(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, 0) / N + eps)
    y = x * inv * tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H] → x / rms(x) · scale in fp32, returned in x's dtype."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty_like(x)
    if x.shape[0]:
        n = x.shape[-1]
        _rms_norm_kernel[(x.shape[0],)](x, scale, y, x.stride(0), y.stride(0), eps, N=n, BLOCK=triton.next_power_of_2(n), PDL=pdl(),
                                         **pdl_launch())
    return y


@triton.jit
def _rotate(row_ptr, heads, ok, cos, sin, HALF: tl.constexpr):
    """RoPE on the two halves of `heads` (rows of D = 2·HALF values from row_ptr) → the two rotated halves, fp32."""
    j = tl.arange(0, HALF)
    x1 = tl.load(row_ptr + heads[:, None] * (2 * HALF) + j[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(row_ptr + heads[:, None] * (2 * HALF) + HALF + j[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    return x1 * cos[None, :] - x2 * sin[None, :], x2 * cos[None, :] + x1 * sin[None, :]


@triton.jit
def _rope_cache_kernel(
    qkv_ptr, cos_ptr, sin_ptr, slot_ptr, q_ptr, k_ptr, v_ptr,
    stride_qkv, stride_cos, stride_qt, stride_slot, stride_head,
    HQ: tl.constexpr, HKV: tl.constexpr, HQ_P: tl.constexpr, HKV_P: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr,
):
    pdl_release(PDL)
    pdl_wait(PDL)
    t = tl.program_id(0)
    HALF: tl.constexpr = D // 2
    j = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + t * stride_cos + j)
    sin = tl.load(sin_ptr + t * stride_cos + j)
    row = qkv_ptr + t.to(tl.int64) * stride_qkv
    # q: rotated into its own [T, Hq, D] output.
    h = tl.arange(0, HQ_P)
    h_ok = h < HQ
    a, b = _rotate(row, h, h_ok, cos, sin, HALF)
    q_row = q_ptr + t.to(tl.int64) * stride_qt + h[:, None] * D + j[None, :]
    tl.store(q_row, a.to(q_ptr.dtype.element_ty), mask=h_ok[:, None])
    tl.store(q_row + HALF, b.to(q_ptr.dtype.element_ty), mask=h_ok[:, None])
    # k (rotated) and v straight into the cache slot of this token.
    slot = tl.load(slot_ptr + t)
    g = tl.arange(0, HKV_P)
    g_ok = g < HKV
    a, b = _rotate(row + HQ * D, g, g_ok, cos, sin, HALF)
    k_row = k_ptr + slot * stride_slot + g[:, None] * stride_head + j[None, :]
    tl.store(k_row, a.to(k_ptr.dtype.element_ty), mask=g_ok[:, None])
    tl.store(k_row + HALF, b.to(k_ptr.dtype.element_ty), mask=g_ok[:, None])
    d = tl.arange(0, D)
    v = tl.load(row + (HQ + HKV) * D + g[:, None] * D + d[None, :], mask=g_ok[:, None], other=0.0)
    tl.store(v_ptr + slot * stride_slot + g[:, None] * stride_head + d[None, :], v.to(v_ptr.dtype.element_ty), mask=g_ok[:, None])


def rope_and_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int) -> torch.Tensor:
    """qkv [T, (Hq + 2 Hkv)·D] (the projection's output), cos/sin [T, 1, D/2] fp32 → q [T, Hq, D] rotated;
    k (rotated) and v are written to slot_mapping[t] of k/v_cache [blocks, page, Hkv, D]."""
    n_kv, dim = k_cache.shape[2], k_cache.shape[3]
    tokens = qkv.shape[0]
    q = torch.empty(tokens, n_heads, dim, dtype=qkv.dtype, device=qkv.device)
    if tokens:
        qkv, cos, sin = qkv.contiguous(), cos.reshape(tokens, -1).contiguous(), sin.reshape(tokens, -1).contiguous()
        _rope_cache_kernel[(tokens,)](
            qkv, cos, sin, slot_mapping, q, k_cache, v_cache,
            qkv.stride(0), cos.stride(0), q.stride(0), k_cache.stride(1), k_cache.stride(2),
            HQ=n_heads, HKV=n_kv, HQ_P=triton.next_power_of_2(n_heads), HKV_P=triton.next_power_of_2(n_kv), D=dim, PDL=pdl(),
            **pdl_launch(),
        )
    return q
