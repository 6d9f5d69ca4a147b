"""Grouped MXFP4 expert matmul in Triton: the CUDA drop-in for a MoE layer's routed experts.

Rows (token, expert) pairs arrive sorted by expert. One launch multiplies every group by its
expert's packed weights: each program takes BLOCK_M rows of one expert and BLOCK_N output
columns, streams the weights as they lie in the checkpoint (blocks [E, O, K/32, 16] uint8, scales
[E, O, K/32] E8M0), decodes E2M1 × 2^(scale−127) in registers and feeds bf16 tensor-core dots
with fp32 accumulation. The first projection fuses its bias and gpt-oss's clamped SwiGLU (glu and
linear are interleaved output rows, so one program reads both halves of its output columns) and
gathers its rows from the tokens; the second fuses its bias and the routing weight, and scatters
its rows back to token order. Which rows belong to which expert is computed on the device (no host sync),
so the same launch serves decode, prefill and a captured CUDA graph.

Decoding without a lookup table: the three magnitude bits of an E2M1 nibble, placed at bit 9 of
an fp16, give exactly 2^-14 times the E2M1 value (the zero-exponent case lands on fp16's
subnormal, which conversions handle exactly); the sign bit goes to bit 15. Multiplying by
2^14 · 2^(s−127) then restores the value, exactly for scale bytes 2..240 (real checkpoints sit
around 110..130; outside, weights would be below 2^-125 or above 2^115).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

SWIGLU_ALPHA = 1.702


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1: the CI tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pdl() -> bool:
    """Programmatic dependent launch (Hopper) for the decode path's kernels: each lets the next one's programs start
    as soon as all of its own have started, and waits for the previous kernel to finish before reading what it
    wrote; the GEMV streams its first weights before that wait. At batch 1 a step is ~220 kernels, each a few µs
    of launch ramp and tail. OSSRUN_PDL=1 turns it on (not yet timed on a GPU: bench/gpu.py's graph replay
    compares); never in the interpreter (no PTX there)."""
    return not interpreting() and os.environ.get("OSSRUN_PDL", "0") == "1"


def pdl_launch() -> dict:
    """The launch option that goes with `pdl()`: kernel[grid](..., PDL=pdl(), **pdl_launch())."""
    return {"launch_pdl": True} if pdl() else {}


@triton.jit
def pdl_release(PDL: tl.constexpr):
    """Let the next kernel's programs be scheduled (they wait in `pdl_wait` for this kernel to finish)."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait until the previous kernel has finished and its writes are visible. Every program of a kernel launched with
    PDL passes here before it reads anything a kernel before it wrote, and before it returns: a kernel that ended
    without waiting could end before its predecessor, and the kernel after it would then read too early."""
    if PDL:
        gdc_wait()


@triton.jit
def mma(a, b, EMULATE: tl.constexpr):
    """a·b of bf16 tiles with fp32 accumulation. Triton 3.6's interpreter multiplies bf16 tiles as
    their raw uint16 bits, so there the (already bf16-rounded) operands are widened to fp32 first."""
    if EMULATE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)


@triton.jit
def _decode(nibble, scale):
    """E2M1 nibbles (int32) and their fp32 block scales → fp32 values (exact)."""
    bits = ((nibble & 8) << 12) | ((nibble & 7) << 9)
    half = bits.to(tl.int16).to(tl.float16, bitcast=True)
    return half.to(tl.float32) * scale


@triton.jit
def _scale_of(byte):
    """E8M0 byte → 2^(byte−127) · 2^14 in fp32, built as the float with exponent field byte + 14."""
    return ((byte.to(tl.int32) + 14) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _mxfp4_grouped_kernel(
    x_ptr, y_ptr, blocks_ptr, scales_ptr, bias_ptr,
    counts_ptr, order_ptr, row_weight_ptr,
    N_OUT, swiglu_limit,
    stride_xm, stride_ym,
    stride_be, stride_bo, stride_se, stride_so, stride_biase,
    K: tl.constexpr, N_EXPERTS: tl.constexpr, SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr,
    GATHER: tl.constexpr, SCATTER: tl.constexpr, ROUTE_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EMULATE: tl.constexpr,
):
    # Which expert and rows this program takes: walk the groups' tile counts (E scalar loads, no
    # host sync, no tile table to build between launches).
    tile = tl.program_id(0)
    seen = 0  # tiles of the experts before e
    start = 0  # rows of the experts before e
    expert = -1
    row_start = 0
    row_end = 0
    for e in range(N_EXPERTS):
        count = tl.load(counts_ptr + e).to(tl.int32)
        n_tiles = (count + BLOCK_M - 1) // BLOCK_M
        hit = (tile >= seen) & (tile < seen + n_tiles)
        expert = tl.where(hit, e, expert)
        row_start = tl.where(hit, start + (tile - seen) * BLOCK_M, row_start)
        row_end = tl.where(hit, start + count, row_end)
        seen += n_tiles
        start += count
    if expert < 0:  # a tile past the last group: nothing to do
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    if GATHER:  # sorted row r reads token order[r] // k of x (no gathered copy of the activations)
        x_rows = tl.load(order_ptr + rows, mask=row_ok, other=0) // ROUTE_K
    else:
        x_rows = rows
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns of this program
    col_ok = cols < N_OUT
    # Weight rows: with SwiGLU, output column c needs rows 2c (glu) and 2c+1 (linear).
    if SWIGLU:
        w_rows = cols * 2
    else:
        w_rows = cols
    half_k: tl.constexpr = BLOCK_K // 2
    kb = tl.arange(0, half_k)  # byte index within the K tile: byte j holds elements 2j (low) and 2j+1 (high)
    w_base = blocks_ptr + expert.to(tl.int64) * stride_be
    s_base = scales_ptr + expert.to(tl.int64) * stride_se
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_lin = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        byte = k0 // 2 + kb  # [half_k]
        k_ok = byte < K // 2
        x_even = tl.load(x_ptr + x_rows[:, None] * stride_xm + (2 * byte)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        x_odd = tl.load(x_ptr + x_rows[:, None] * stride_xm + (2 * byte + 1)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        x_even = x_even.to(tl.bfloat16)
        x_odd = x_odd.to(tl.bfloat16)
        wmask = k_ok[:, None] & col_ok[None, :]
        packed = tl.load(w_base + w_rows[None, :] * stride_bo + byte[:, None], mask=wmask, other=0).to(tl.int32)  # [half_k, N]
        sbyte = tl.load(s_base + w_rows[None, :] * stride_so + (byte // 16)[:, None], mask=wmask, other=0)
        scale = _scale_of(sbyte)
        acc += mma(x_even, _decode(packed & 15, scale).to(tl.bfloat16), EMULATE)
        acc += mma(x_odd, _decode(packed >> 4, scale).to(tl.bfloat16), EMULATE)
        if SWIGLU:
            packed = tl.load(w_base + (w_rows + 1)[None, :] * stride_bo + byte[:, None], mask=wmask, other=0).to(tl.int32)
            sbyte = tl.load(s_base + (w_rows + 1)[None, :] * stride_so + (byte // 16)[:, None], mask=wmask, other=0)
            scale = _scale_of(sbyte)
            acc_lin += mma(x_even, _decode(packed & 15, scale).to(tl.bfloat16), EMULATE)
            acc_lin += mma(x_odd, _decode(packed >> 4, scale).to(tl.bfloat16), EMULATE)
    if HAS_BIAS:
        b_base = bias_ptr + expert * stride_biase
        acc += tl.load(b_base + w_rows, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if SWIGLU:
            acc_lin += tl.load(b_base + w_rows + 1, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if SWIGLU:
        glu = tl.minimum(acc, swiglu_limit)
        lin = tl.minimum(tl.maximum(acc_lin, -swiglu_limit), swiglu_limit)
        acc = glu * tl.sigmoid(1.702 * glu) * (lin + 1.0)  # SWIGLU_ALPHA (a literal: jit code reads no globals)
    if SCATTER:  # back to (token, slot) order, times the routing weight: the caller only sums over slots
        y_rows = tl.load(order_ptr + rows, mask=row_ok, other=0)
        acc = acc * tl.load(row_weight_ptr + y_rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    else:
        y_rows = rows
    out = y_ptr + y_rows[:, None] * stride_ym + cols[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _block_m(rows: int, n_experts: int) -> int:
    """Rows per program: the mean group size rounded up to a power of two, from 16 (the smallest dot) to 64."""
    return min(64, max(16, triton.next_power_of_2(max(1, rows // max(1, n_experts)))))


def _tile(block_m: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, warps): 64×128, 4 warps, the tile of the measured H200 runs (bench/GPU_NOTES.md).
    OSSRUN_MOE_TILE="N,K,W" overrides it for small row counts (bench/gpu_sweep.py times the choices:
    at batch 1 they moved a MoE layer only between ~200 and ~430 µs, far from the ~15 µs HBM allows)."""
    override = os.environ.get("OSSRUN_MOE_TILE")
    if override and block_m == 16:
        n, k, w = (int(v) for v in override.split(","))
        return n, k, w
    return 64, 128, 4


def mxfp4_grouped_matmul(
    x: torch.Tensor, counts: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
    swiglu_limit: float | None = None, out_dtype: torch.dtype | None = None,
    order: torch.Tensor | None = None, gather: bool = False, route_k: int = 1, row_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows sorted by expert, `counts` [E] rows per expert (on the device) → x·Wᵀ + b [P, O], or the clamped
    SwiGLU of it [P, O/2] with `swiglu_limit` (glu and linear interleaved, as gpt-oss stores them).

    blocks [E, O, K/32, 16] and scales [E, O, K/32] are the checkpoint's packed bytes; bias [E, O].
    With `order` [P] (pair index of each sorted row): `gather` reads sorted row r from x[order[r] // route_k]
    (x holds the tokens); otherwise `row_weights` [P] (per pair) scales row r and writes it to output row
    order[r]. The launch has P/BLOCK_M + E programs per column tile, enough for any grouping; the ones
    past the last group return at once. Its shape depends only on P, so it can be captured in a graph.
    """
    n_experts, n_rows_w = blocks.shape[0], blocks.shape[1]
    k = x.shape[1]
    rows = order.shape[0] if order is not None else x.shape[0]
    if blocks.shape[2] * 32 != k:
        raise ValueError(f"x has {k} features, the packed weights {blocks.shape[2] * 32}")
    n_out = n_rows_w // 2 if swiglu_limit is not None else n_rows_w
    y = torch.empty(rows, n_out, dtype=out_dtype or x.dtype, device=x.device)
    if rows == 0:
        return y
    block_m = _block_m(rows, n_experts)
    x = x.contiguous()
    block_n, block_k, warps = _tile(block_m)
    grid = (triton.cdiv(rows, block_m) + n_experts, triton.cdiv(n_out, block_n))
    scatter = order is not None and not gather
    _mxfp4_grouped_kernel[grid](
        x, y, blocks, scales, bias if bias is not None else x, counts,
        order if order is not None else counts, row_weights if scatter else x,
        n_out, float(swiglu_limit or 0.0),
        x.stride(0), y.stride(0),
        blocks.stride(0), blocks.stride(1), scales.stride(0), scales.stride(1), bias.stride(0) if bias is not None else 0,
        K=k, N_EXPERTS=n_experts, SWIGLU=swiglu_limit is not None, HAS_BIAS=bias is not None,
        GATHER=order is not None and gather, SCATTER=scatter, ROUTE_K=route_k,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EMULATE=interpreting(), num_warps=warps,
    )
    return y


@triton.jit
def top_k_softmax(logits, E: tl.constexpr, E_P: tl.constexpr, K: tl.constexpr, K_P: tl.constexpr):
    """Rows of router logits [R, E_P] fp32 (−inf past E) → each row's top K experts [R, K_P] int32 (highest first,
    lowest id on ties) and the softmax over those K logits in fp32 [R, K_P] (0 past K): the router of every path."""
    e = tl.arange(0, E_P)[None, :]
    j = tl.arange(0, K_P)[None, :]
    top_v = tl.full((logits.shape[0], K_P), float("-inf"), tl.float32)
    top_e = tl.zeros((logits.shape[0], K_P), tl.int32)
    for i in tl.static_range(K):
        best = tl.max(logits, 1)[:, None]
        chosen = tl.minimum(tl.min(tl.where(logits == best, e, E_P), 1), E - 1)[:, None]  # NaN logits must not index past E
        top_v = tl.where(j == i, best, top_v)
        top_e = tl.where(j == i, chosen, top_e)
        logits = tl.where(e == chosen, float("-inf"), logits)
    w = tl.exp(top_v - tl.max(top_v, 1)[:, None])
    return top_e, w / tl.sum(w, 1)[:, None]


@triton.jit
def _route_kernel(logits_ptr, experts_ptr, weights_ptr, counts_ptr, rank_ptr, stride_l,
                  E: tl.constexpr, E_P: tl.constexpr, K: tl.constexpr, K_P: tl.constexpr):
    """One token: top-k of its router logits (highest first, lowest id on ties), softmax over those k in
    fp32, and each chosen expert's row count bumped; the count before the bump is the pair's rank in its group."""
    t = tl.program_id(0)
    e = tl.arange(0, E_P)[None, :]
    logits = tl.load(logits_ptr + t * stride_l + e, mask=e < E, other=float("-inf")).to(tl.float32)
    top_e, w = top_k_softmax(logits, E, E_P, K, K_P)
    j = tl.arange(0, K_P)[None, :]
    ok = j < K
    tl.store(experts_ptr + t * K + j, top_e.to(tl.int64), mask=ok)
    tl.store(weights_ptr + t * K + j, w.to(weights_ptr.dtype.element_ty), mask=ok)
    rank = tl.atomic_add(counts_ptr + top_e, 1, mask=ok)
    tl.store(rank_ptr + t * K + j, rank, mask=ok)


@triton.jit
def _order_kernel(experts_ptr, rank_ptr, counts_ptr, order_ptr, P, E: tl.constexpr, E_P: tl.constexpr, BLOCK: tl.constexpr):
    """Pairs → their place when sorted by expert: order[offset(expert) + rank] = pair."""
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = p < P
    expert = tl.load(experts_ptr + p, mask=ok, other=0).to(tl.int32)
    rank = tl.load(rank_ptr + p, mask=ok, other=0)
    e = tl.arange(0, E_P)
    counts = tl.load(counts_ptr + e, mask=e < E, other=0)
    offset = tl.sum(tl.where(e[None, :] < expert[:, None], counts[None, :], 0), 1)
    tl.store(order_ptr + offset + rank, p.to(tl.int64), mask=ok)


def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits [T, E] → experts [T, k] (int64), weights [T, k] (logits' dtype), rows per expert [E] (int32)
    and `order` [T·k]: the pairs sorted by expert. Three launches, no host sync; within an expert the
    order is whatever the atomics gave, which changes no row's result (rows of a tile never mix)."""
    n_tokens, n_experts = logits.shape
    experts = torch.empty(n_tokens, k, dtype=torch.long, device=logits.device)
    weights = torch.empty(n_tokens, k, dtype=logits.dtype, device=logits.device)
    counts = torch.zeros(n_experts, dtype=torch.int32, device=logits.device)
    rank = torch.empty(n_tokens * k, dtype=torch.int32, device=logits.device)
    order = torch.empty(n_tokens * k, dtype=torch.long, device=logits.device)
    if n_tokens:
        e_p, k_p = triton.next_power_of_2(n_experts), triton.next_power_of_2(k)
        _route_kernel[(n_tokens,)](logits, experts, weights, counts, rank, logits.stride(0), E=n_experts, E_P=e_p, K=k, K_P=k_p)
        block = 128
        _order_kernel[(triton.cdiv(n_tokens * k, block),)](experts, rank, counts, order, n_tokens * k, E=n_experts, E_P=e_p,
                                                           BLOCK=block)
    return experts, weights, counts, order


def moe_experts(t: torch.Tensor, logits: torch.Tensor, k: int, mlp1: tuple, mlp2: tuple, swiglu_limit: float) -> torch.Tensor:
    """A MoE layer's experts from its router logits: t [T, H], logits [T, E] → Σ_k weight · expert(t) [T, H].

    mlp1/mlp2 = (blocks, scales, bias). Routing (top-k, softmax, grouping by expert) runs in two small
    kernels; the first projection gathers its rows from t and fuses the SwiGLU, the second scatters
    its rows back to pair order times their routing weights (fp32), and the k slots of a token are summed.
    """
    _, weights, counts, order = route(logits, k)
    h = mxfp4_grouped_matmul(t, counts, *mlp1, swiglu_limit=swiglu_limit, order=order, gather=True, route_k=k)
    y = mxfp4_grouped_matmul(h, counts, *mlp2, out_dtype=torch.float32, order=order, row_weights=weights.reshape(-1))
    return y.view(t.shape[0], k, -1).sum(1).to(t.dtype)


def moe_layer(x: torch.Tensor, norm, gate: tuple[torch.Tensor, torch.Tensor], k: int, mlp1: tuple, mlp2: tuple,
              swiglu_limit: float, small_scales: bool = False) -> torch.Tensor:
    """A MoE layer with its residual: x [T, H] → x + Σ_k weight · expert(norm(x)); `norm` is the layer's `RMSNorm`
    (fp32 `scale`, `eps`), gate = (weight [E, H], bias [E]).

    Chosen by token count (a graph captures one count, so one path): up to `decode_max_tokens()` tokens the
    few-token kernels, `decode_kind()` of them: the GEMV kernels of `triton_moe_decode` (weights read once
    per row at 16-byte loads) or the swap-AB tensor-core kernels of `triton_moe_mma`; above, the router,
    `route` and the grouped tensor-core kernel, which decodes each weight tile once for all the rows of its expert."""
    from ossrun.model.kernels.triton_moe_decode import decode_kind, decode_max_tokens, moe_layer_decode

    if x.shape[0] <= decode_max_tokens():
        if decode_kind() == "mma":
            from ossrun.model.kernels.triton_moe_mma import MAX_PAIRS, moe_layer_mma

            if x.shape[0] * k <= MAX_PAIRS:
                return moe_layer_mma(x, (norm.scale, norm.eps), gate, k, mlp1, mlp2, swiglu_limit, small_scales)
        return moe_layer_decode(x, (norm.scale, norm.eps), gate, k, mlp1, mlp2, swiglu_limit)
    t = norm(x)
    logits = torch.nn.functional.linear(t, *gate)
    return x + moe_experts(t, logits, k, mlp1, mlp2, swiglu_limit)
