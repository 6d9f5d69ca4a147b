"""Dense projections of a few rows in Triton (bf16 weights): the batch-1 qkv, out and unembedding GEMVs.

At one row a projection is a matrix-vector product bound by reading W once. Each program owns one
row and BLOCK_N output columns, loads its W rows with 16-byte loads along K (the widest tiles take a
whole row in one round trip), accumulates in fp32 and reduces once at the end; a second row reads W
again (from L2 when it is still there): this is for one or two rows. The bias, the rounding to the activations' dtype (as `F.linear` rounds), and
the residual add (`x + out(o)`) are fused, which saves the separate add launch of each layer.
Whether it beats cuBLAS at a row count is measured (bench/gpu_sweep.py); `gemv_max_rows()` is the
largest row count that takes it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ossrun.model.kernels.triton_moe import pdl, pdl_launch, pdl_release, pdl_wait

GEMV_MAX_ROWS = 1
# (BLOCK_N, BLOCK_K, warps); the first is the default (the fastest in run 7). Run 1: tiles that loop over K (256–512 wide) ran at 0.7–1.4 TB/s
# on qkv/out (serial round trips); the wide ones load a whole row at once.
SWEEP_TILES = [(4, 2048, 8), (2, 2048, 4), (8, 512, 4), (2, 4096, 4), (4, 4096, 8), (4, 1024, 4)]


def gemv_max_rows() -> int:
    """Row counts up to this take the Triton GEMV (OSSRUN_GEMV_MAX_ROWS overrides: 0 keeps cuBLAS everywhere)."""
    return int(os.environ.get("OSSRUN_GEMV_MAX_ROWS", GEMV_MAX_ROWS))


def gemv_tile() -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, warps); OSSRUN_GEMV_TILE="n,k,w" overrides it (bench/gpu_sweep.py)."""
    override = os.environ.get("OSSRUN_GEMV_TILE")
    if override:
        n, k, w = (int(v) for v in override.split(","))
        return n, k, w
    return SWEEP_TILES[0]


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, g_ptr, N, stride_x, stride_w, stride_r, stride_y, eps,
                 K: tl.constexpr, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, NORM: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    pdl_release(PDL)
    row = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # axis 0: the unembedding has 201088 / BLOCK_N tiles
    col_ok = cols < N
    k_i = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_x
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w  # the unembedding's 201088 rows × 2880 pass 2^31 elements
    w = tl.load(w_rows + k_i[None, :], mask=col_ok[:, None] & (k_i < K)[None, :], other=0.0)
    pdl_wait(PDL)  # the weights are the model's: their first chunk is on its way before the previous kernel has ended
    inv = 0.0
    if NORM:  # RMSNorm of the row first (each program reads it from L2: K values against BLOCK_N·K weights)
        squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xs = tl.load(x_row + k0 + k_i, mask=k0 + k_i < K, other=0.0).to(tl.float32)
            squares += xs * xs
        inv = tl.rsqrt(tl.sum(squares, 0) / K + eps)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    x = _normed(x_row, g_ptr, k_i, inv, K, NORM)
    for k0 in range(BLOCK_K, K + BLOCK_K, BLOCK_K):  # the next chunk's loads go out before this one's math
        k = k0 + k_i
        k_ok = k < K
        n_x = _normed(x_row, g_ptr, k, inv, K, NORM)
        n_w = tl.load(w_rows + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        x, w = n_x, n_w
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = out.to(x_ptr.dtype.element_ty).to(tl.float32)  # F.linear's output dtype, before any residual or upcast
    if RESIDUAL:
        out += tl.load(r_ptr + row * stride_r + cols, mask=col_ok, other=0.0).to(tl.float32)
        out = out.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, out.to(y_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _normed(x_row, g_ptr, k, inv, K: tl.constexpr, NORM: tl.constexpr):
    """x[k] (masked past K), or with NORM its RMSNorm x·inv·g in fp32 rounded to x's dtype, as `rms_norm` stores it."""
    x = tl.load(x_row + k, mask=k < K, other=0.0)
    if NORM:
        x = (x.to(tl.float32) * inv * tl.load(g_ptr + k, mask=k < K, other=0.0)).to(x_row.dtype.element_ty)
    return x


def fuse_norm() -> bool:
    """Whether a projection that follows an RMSNorm takes it into the GEMV (one launch fewer a layer at batch 1).
    Not yet timed on a GPU: OSSRUN_GEMV_FUSE_NORM=1 turns it on (bench/gpu.py's graph replay compares)."""
    return os.environ.get("OSSRUN_GEMV_FUSE_NORM", "0") == "1"


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype | None = None,
         residual: torch.Tensor | None = None, norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """x [M, K] · weightᵀ [N, K] + bias, rounded to x's dtype, + residual [M, N] (rounded again) → [M, N] in `out_dtype`:
    what `residual + F.linear(x, weight, bias).to(out_dtype)` computes, up to the fp32 summation order. With
    norm = (scale fp32 [K], eps), x is first RMSNorm-ed (`triton_fused.rms_norm`'s arithmetic and rounding)."""
    rows, k = x.shape
    n = weight.shape[0]
    y = torch.empty(rows, n, dtype=out_dtype or x.dtype, device=x.device)
    if rows:
        x = x if x.stride(-1) == 1 else x.contiguous()
        block_n, block_k, warps = gemv_tile()
        r = residual if residual is not None else y
        scale, eps = norm if norm is not None else (x, 0.0)
        _gemv_kernel[(triton.cdiv(n, block_n), rows)](
            x, weight, bias if bias is not None else x, r, y, scale, n, x.stride(0), weight.stride(0), r.stride(0), y.stride(0),
            float(eps), K=k, HAS_BIAS=bias is not None, RESIDUAL=residual is not None, NORM=norm is not None, BLOCK_N=block_n,
            BLOCK_K=block_k, PDL=pdl(), num_warps=warps, **pdl_launch())
    return y
