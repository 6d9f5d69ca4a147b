"""A MoE layer for few tokens (decode) in Triton: GEMV-style MXFP4 kernels, no tensor cores, four launches.

At batch 1 a MoE layer multiplies one row by each of 4 experts: a matrix-vector product whose
cost is reading the packed weights once (~51 MB a 20b layer: ~12 µs of HBM). The grouped tl.dot
kernel (`triton_moe.py`) pads every expert to 16 rows and lays the decoded tile out for the tensor
cores; at one row a program it reached ~185 GB/s. Here each program owns one (row, output tile):
it streams its weight rows with 16-byte loads along K (the checkpoint's layout: a row's bytes are
contiguous), decodes E2M1 in registers, multiplies by the activations on the FP32 units, and
applies each 32-element block's E8M0 scale once to the block's partial sum. No sorting by expert
is needed: a row knows its expert.

The four launches of a layer:
1. `_norm_logits_kernel`, per token and 4 experts: RMSNorm (fp32) and those router logits (rounded to
   the model dtype as `F.linear` rounds them); `_topk_kernel`, per token: top-k and the softmax over
   the k. They replace norm, router GEMV, routing and grouping (~6 launches).
2. `_mlp1_kernel`, per (token, slot) and output tile: the gate and linear rows (interleaved in the
   checkpoint: one contiguous run of rows) + bias + gpt-oss's clamped SwiGLU → h (model dtype, as the
   grouped kernel rounds it).
3. `_mlp2_kernel`, per token and output tile, the k slots side by side in one tile: h through their
   experts, + bias, times the routing weight, summed in fp32, rounded to the model dtype and added to
   the residual (the caller's `x + moe(x)`), so the layer's output leaves in one store.

Each decoded weight is used once per row here, so the FP32 work grows with rows; the grouped
kernel wins once experts hold several rows: `DECODE_MAX_TOKENS` picks between them
(measured on the H200, bench/GPU_NOTES.md).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ossrun.model.kernels.triton_moe import _scale_of, interpreting, pdl, pdl_launch, pdl_release, pdl_wait, top_k_softmax

DECODE_MAX_TOKENS = 8
# (BLOCK_N, BLOCK_B, warps) that bench/gpu_sweep.py times and tests/triton_sm90_compile.py compiles; the first of
# each is the default (the fastest of run 7's sweep, bench/GPU_NOTES.md). mlp1's tile is [2·BLOCK_N rows, BLOCK_B, 16 B],
# mlp2's [k slots, BLOCK_N, BLOCK_B, 16 B]; 16 B or more a thread keeps the loads 16 bytes wide.
SWEEP_TILES_MLP1 = [(8, 8, 4), (4, 16, 4), (4, 8, 2), (8, 16, 4), (16, 8, 8), (4, 32, 4), (2, 32, 2), (4, 16, 2), (8, 32, 8)]
SWEEP_TILES_MLP2 = [(8, 8, 8), (4, 8, 4), (2, 16, 4), (4, 16, 4), (2, 8, 2), (2, 32, 4), (4, 32, 8), (1, 32, 2), (8, 16, 8)]


def decode_max_tokens() -> int:
    """Token counts up to this take the GEMV kernels (OSSRUN_MOE_DECODE_MAX overrides, for bench/gpu_sweep.py)."""
    return int(os.environ.get("OSSRUN_MOE_DECODE_MAX", DECODE_MAX_TOKENS))


def decode_kind() -> str:
    """Which few-token MoE kernels run: "gemv" (this module) or "mma" (`triton_moe_mma`, the swap-AB tensor-core
    kernels). OSSRUN_MOE_DECODE_KIND picks; bench/gpu_sweep.py times both and writes the faster one."""
    kind = os.environ.get("OSSRUN_MOE_DECODE_KIND", "gemv")
    if kind not in ("gemv", "mma"):
        raise ValueError(f"OSSRUN_MOE_DECODE_KIND={kind!r}: expected 'gemv' or 'mma'")
    return kind


def use_asm() -> bool:
    """The PTX nibble decode: compiled kernels only (OSSRUN_MOE_ASM=0 takes the integer path, for comparison)."""
    return not interpreting() and os.environ.get("OSSRUN_MOE_ASM", "1") != "0"


def tiles() -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """((BLOCK_N, BLOCK_B, warps) of mlp1, the same of mlp2): output columns per program, 32-element blocks of K
    per iteration, warps. OSSRUN_MOE_DECODE_TILES="n1,b1,w1;n2,b2,w2" overrides them (bench/gpu_sweep.py)."""
    override = os.environ.get("OSSRUN_MOE_DECODE_TILES")
    if override:
        first, second = (tuple(int(v) for v in part.split(",")) for part in override.split(";"))
        return first, second  # type: ignore[return-value]
    return SWEEP_TILES_MLP1[0], SWEEP_TILES_MLP2[0]


@triton.jit
def _e2m1(nibble):
    """E2M1 nibbles (int32) → their values × 2^-14 in fp32, exactly (see triton_moe's module docstring)."""
    bits = ((nibble & 8) << 12) | ((nibble & 7) << 9)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


_E2M1_PTX = tl.constexpr("""{
    .reg .b32 z, t0, t1, a, b;
    mov.b32 z, 0;
    prmt.b32 t0, $4, z, 0x4140;
    prmt.b32 t1, $4, z, 0x4342;
    shl.b32 a, t0, 9;
    and.b32 a, a, 0x0E000E00;
    shl.b32 b, t0, 12;
    and.b32 b, b, 0x80008000;
    or.b32 $0, a, b;
    shl.b32 a, t1, 9;
    and.b32 a, a, 0x0E000E00;
    shl.b32 b, t1, 12;
    and.b32 b, b, 0x80008000;
    or.b32 $1, a, b;
    shl.b32 a, t0, 5;
    and.b32 a, a, 0x0E000E00;
    shl.b32 b, t0, 8;
    and.b32 b, b, 0x80008000;
    or.b32 $2, a, b;
    shl.b32 a, t1, 5;
    and.b32 a, a, 0x0E000E00;
    shl.b32 b, t1, 8;
    and.b32 b, b, 0x80008000;
    or.b32 $3, a, b;
}""")  # a constexpr: jit code reads no other globals


@triton.jit
def _e2m1_pairs(packed, ASM: tl.constexpr):
    """Packed bytes (uint8) → (low nibbles, high nibbles) as fp32 values × 2^-14, exactly.

    ASM (compiled on NVIDIA GPUs): four bytes per PTX block, two nibbles per instruction: prmt spreads
    bytes 0,1 (then 2,3) to the two 16-bit halves of a word, and shifts and masks put each nibble's magnitude
    at bit 9 and its sign at bit 15 of its half (an fp16 pair): ~2 instructions a value instead of ~8 for
    the per-element integer path, which the interpreter takes (it has no PTX)."""
    if ASM:
        lo, hi = tl.inline_asm_elementwise(_E2M1_PTX, "=r,=r,=r,=r,r", [packed], dtype=(tl.float16, tl.float16), is_pure=True,
                                           pack=4)
        return lo.to(tl.float32), hi.to(tl.float32)
    else:
        p = packed.to(tl.int32)
        return _e2m1(p & 15), _e2m1(p >> 4)


@triton.jit
def _chunk_loads(x_row, w_base, s_base, rows, row_ok, blk, b_ok, stride_bo, stride_so):
    """One K chunk's operands: packed bytes [R, B, 16] (16 contiguous bytes per row and block), scale bytes [R, B],
    activation pairs [B, 16, 2] (elements 2j, 2j+1 of each block). Masked chunks past K load nothing."""
    j = tl.arange(0, 16)
    packed = tl.load(w_base + rows[:, None, None] * stride_bo + (blk * 16)[None, :, None] + j[None, None, :],
                     mask=row_ok[:, None, None] & b_ok[None, :, None], other=0)
    sbyte = tl.load(s_base + rows[:, None] * stride_so + blk[None, :], mask=row_ok[:, None] & b_ok[None, :], other=0)
    pairs = tl.load(x_row + (blk * 32)[:, None, None] + (2 * j)[None, :, None] + tl.arange(0, 2)[None, None, :],
                    mask=b_ok[:, None, None], other=0.0)
    return packed, sbyte, pairs


@triton.jit
def _chunk_math(packed, sbyte, pairs, ASM: tl.constexpr):
    """Σ over each block's 32 elements of x · E2M1, times the block's scale → [R, B] fp32."""
    x_even, x_odd = tl.split(pairs.to(tl.bfloat16).to(tl.float32))  # [B, 16] each, bf16-rounded as the tl.dot path
    lo, hi = _e2m1_pairs(packed, ASM)
    return tl.sum(lo * x_even[None, :, :] + hi * x_odd[None, :, :], axis=2) * _scale_of(sbyte)


@triton.jit
def _row_dot(x_row, w_base, s_base, rows, row_ok, stride_bo, stride_so,
             NBLK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr, ASM: tl.constexpr):
    """Σ_k x[k] · W[rows, k] in fp32 for one activation row x_row (pointer) → [BLOCK_R].

    W's rows are NBLK blocks of 16 bytes (32 nibbles: element 2j low, 2j+1 high) with one scale byte each.
    The next chunk's loads are issued before the current chunk is decoded: two chunks in flight for a
    few more registers (packed bytes are 4 to a register), where one chunk per round trip left the
    kernels at ~1 TB/s (run 6)."""
    blk_i = tl.arange(0, BLOCK_B)
    acc = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.float32)
    packed, sbyte, pairs = _chunk_loads(x_row, w_base, s_base, rows, row_ok, blk_i, blk_i < NBLK, stride_bo, stride_so)
    for b0 in range(BLOCK_B, NBLK + BLOCK_B, BLOCK_B):  # one iteration per chunk; the last prefetches nothing
        blk = b0 + blk_i
        n_packed, n_sbyte, n_pairs = _chunk_loads(x_row, w_base, s_base, rows, row_ok, blk, blk < NBLK, stride_bo, stride_so)
        acc += _chunk_math(packed, sbyte, pairs, ASM)
        packed, sbyte, pairs = n_packed, n_sbyte, n_pairs
    return tl.sum(acc, axis=1)


@triton.jit
def _norm_logits_kernel(x_ptr, norm_ptr, t_ptr, gate_ptr, gate_bias_ptr, logits_ptr, stride_x, stride_t, stride_g, eps,
                        H: tl.constexpr, H_P: tl.constexpr, E: tl.constexpr, BLOCK_E: tl.constexpr, DEINTERLEAVE: tl.constexpr,
                        PDL: tl.constexpr):
    """Per (token, BLOCK_E experts): RMSNorm of the token (each program recomputes it: 2880 values from L2;
    the first stores it, de-interleaved for `triton_moe_mma` when asked: even elements, then odd ones) and those
    experts' router logits, rounded to the model dtype as F.linear rounds them.
    Several programs a token: one program reading the whole 184 KB router was latency-bound (26 µs, run 1)."""
    pdl_release(PDL)
    tok = tl.program_id(0)
    cols = tl.arange(0, H_P)
    ok = cols < H
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = e < E
    g = tl.load(gate_ptr + e[:, None] * stride_g + cols[None, :], mask=e_ok[:, None] & ok[None, :], other=0.0).to(tl.float32)
    pdl_wait(PDL)  # the router's rows are the model's: on their way before the previous kernel has ended
    x = tl.load(x_ptr + tok * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, 0) / H + eps)
    t = (x * inv * tl.load(norm_ptr + cols, mask=ok, other=0.0)).to(t_ptr.dtype.element_ty)
    if DEINTERLEAVE:
        where = cols // 2 + (cols % 2) * (H // 2)
    else:
        where = cols
    tl.store(t_ptr + tok * stride_t + where, t, mask=ok & (tl.program_id(1) == 0))
    logits = tl.sum(g * t.to(tl.float32)[None, :], axis=1) + tl.load(gate_bias_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
    tl.store(logits_ptr + tok * E + e, logits.to(t_ptr.dtype.element_ty).to(tl.float32), mask=e_ok)


@triton.jit
def _topk_kernel(logits_ptr, experts_ptr, weights_ptr, E: tl.constexpr, E_P: tl.constexpr, K: tl.constexpr, K_P: tl.constexpr,
                 PDL: tl.constexpr):
    """Top-k of a token's logits (highest first, lowest id on ties) and the softmax over those k (`top_k_softmax`)."""
    pdl_release(PDL)
    pdl_wait(PDL)
    tok = tl.program_id(0)
    e = tl.arange(0, E_P)[None, :]
    top_e, w = top_k_softmax(tl.load(logits_ptr + tok * E + e, mask=e < E, other=float("-inf")), E, E_P, K, K_P)
    j = tl.arange(0, K_P)[None, :]
    tl.store(experts_ptr + tok * K + j, top_e, mask=j < K)
    tl.store(weights_ptr + tok * K + j, w.to(weights_ptr.dtype.element_ty), mask=j < K)


@triton.jit
def _mlp1_kernel(t_ptr, h_ptr, blocks_ptr, scales_ptr, bias_ptr, experts_ptr, N_OUT, swiglu_limit,
                 stride_t, stride_h, stride_be, stride_bo, stride_se, stride_so, stride_biase,
                 K: tl.constexpr, ROUTE_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
    pdl_release(PDL)
    pdl_wait(PDL)
    pair = tl.program_id(0)  # fastest axis: the pairs sharing a weight tile run together (L2 serves the repeats)
    expert = tl.load(experts_ptr + pair).to(tl.int64)
    # Output columns c get weight rows 2c (glu) and 2c+1 (linear): one contiguous run of 2·BLOCK_N rows, one loop.
    rows = tl.program_id(1) * (2 * BLOCK_N) + tl.arange(0, 2 * BLOCK_N)
    row_ok = rows < 2 * N_OUT
    x_row = t_ptr + (pair // ROUTE_K) * stride_t
    acc = _row_dot(x_row, blocks_ptr + expert * stride_be, scales_ptr + expert * stride_se, rows, row_ok, stride_bo, stride_so,
                   K // 32, 2 * BLOCK_N, BLOCK_B, ASM)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert * stride_biase + rows, mask=row_ok, other=0.0).to(tl.float32)
    glu, lin = tl.split(tl.reshape(acc, (BLOCK_N, 2)))
    glu = tl.minimum(glu, swiglu_limit)
    lin = tl.minimum(tl.maximum(lin, -swiglu_limit), swiglu_limit)
    out = glu * tl.sigmoid(1.702 * glu) * (lin + 1.0)  # SWIGLU_ALPHA
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(h_ptr + pair * stride_h + cols, out.to(h_ptr.dtype.element_ty), mask=cols < N_OUT)


@triton.jit
def _slot_loads(w_base, s_base, x_base, cols, ok2, slot_ok, blk, b_ok, stride_bo, stride_so):
    """One K chunk of every slot: packed [K_P, N, B, 16], scale bytes [K_P, N, B], h pairs [K_P, B, 16, 2]."""
    j = tl.arange(0, 16)
    packed = tl.load(w_base[:, None, None, None] + cols[None, :, None, None] * stride_bo + (blk * 16)[None, None, :, None]
                     + j[None, None, None, :], mask=ok2[:, :, None, None] & b_ok[None, None, :, None], other=0)
    sbyte = tl.load(s_base[:, None, None] + cols[None, :, None] * stride_so + blk[None, None, :],
                    mask=ok2[:, :, None] & b_ok[None, None, :], other=0)
    pairs = tl.load(x_base[:, None, None, None] + (blk * 32)[None, :, None, None] + (2 * j)[None, None, :, None]
                    + tl.arange(0, 2)[None, None, None, :], mask=slot_ok[:, None, None, None] & b_ok[None, :, None, None], other=0.0)
    return packed, sbyte, pairs


@triton.jit
def _mlp2_kernel(h_ptr, x_ptr, y_ptr, blocks_ptr, scales_ptr, bias_ptr, experts_ptr, weights_ptr, N_OUT,
                 stride_h, stride_x, stride_y, stride_be, stride_bo, stride_se, stride_so, stride_biase,
                 K: tl.constexpr, ROUTE_K: tl.constexpr, K_P: tl.constexpr, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
    """Per token and BLOCK_N outputs, all k slots in one tile [K_P, BLOCK_N, BLOCK_B, 16]: the k experts' bytes are
    in flight together (one slot after another kept ~1 KB in flight a program: 600 GB/s, run 1)."""
    pdl_release(PDL)
    pdl_wait(PDL)
    tok = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N_OUT
    slot = tl.arange(0, K_P)
    slot_ok = slot < ROUTE_K
    pair = tok * ROUTE_K + slot
    expert = tl.load(experts_ptr + pair, mask=slot_ok, other=0).to(tl.int64)
    route_w = tl.load(weights_ptr + pair, mask=slot_ok, other=0.0).to(tl.float32)  # [K_P]
    w_base = blocks_ptr + expert * stride_be  # [K_P] pointers
    s_base = scales_ptr + expert * stride_se
    x_base = h_ptr + pair * stride_h
    NBLK: tl.constexpr = K // 32
    blk_i = tl.arange(0, BLOCK_B)
    ok2 = slot_ok[:, None] & col_ok[None, :]  # [K_P, BLOCK_N]
    acc = tl.zeros((K_P, BLOCK_N, BLOCK_B), dtype=tl.float32)
    packed, sbyte, pairs = _slot_loads(w_base, s_base, x_base, cols, ok2, slot_ok, blk_i, blk_i < NBLK, stride_bo, stride_so)
    for b0 in range(BLOCK_B, NBLK + BLOCK_B, BLOCK_B):  # prefetch the next chunk, as _row_dot
        blk = b0 + blk_i
        n_packed, n_sbyte, n_pairs = _slot_loads(w_base, s_base, x_base, cols, ok2, slot_ok, blk, blk < NBLK, stride_bo, stride_so)
        x_even, x_odd = tl.split(pairs.to(tl.bfloat16).to(tl.float32))  # [K_P, BLOCK_B, 16]
        lo, hi = _e2m1_pairs(packed, ASM)
        part = tl.sum(lo * x_even[:, None, :, :] + hi * x_odd[:, None, :, :], axis=3)  # [K_P, BLOCK_N, BLOCK_B]
        acc += part * _scale_of(sbyte)
        packed, sbyte, pairs = n_packed, n_sbyte, n_pairs
    out = tl.sum(acc, axis=2)  # [K_P, BLOCK_N]
    if HAS_BIAS:
        out += tl.load(bias_ptr + expert[:, None] * stride_biase + cols[None, :], mask=ok2, other=0.0).to(tl.float32)
    total = tl.sum(out * route_w[:, None], axis=0)
    moe = total.to(y_ptr.dtype.element_ty).to(tl.float32)  # the reference rounds the weighted sum before the residual add
    if RESIDUAL:
        moe += tl.load(x_ptr + tok * stride_x + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + tok * stride_y + cols, moe.to(y_ptr.dtype.element_ty), mask=col_ok)


# (experts a program, warps) of the norm + router logits kernel: the first is run 8's (4.6 µs a layer at batch 1, a
# latency-bound chain of two row reductions); bench/gpu_sweep.py times the others.
SWEEP_ROUTER_TILES = [(4, 8), (2, 8), (1, 4), (8, 8), (2, 4)]


def router_tile() -> tuple[int, int]:
    """(BLOCK_E, warps) of `_norm_logits_kernel`; OSSRUN_MOE_ROUTER_TILE="e,w" overrides (bench/gpu_sweep.py)."""
    override = os.environ.get("OSSRUN_MOE_ROUTER_TILE")
    if override:
        block_e, warps = (int(v) for v in override.split(","))
        return block_e, warps
    return SWEEP_ROUTER_TILES[0]


def norm_logits(x: torch.Tensor, norm_scale: torch.Tensor, eps: float, gate_weight: torch.Tensor, gate_bias: torch.Tensor,
                deinterleave: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] → t = RMSNorm(x) [T, H] (x's dtype; with `deinterleave` each row's even elements, then its odd ones)
    and the router logits [T, E] (fp32 holding the model dtype's rounding), in one launch over T × E/BLOCK_E programs."""
    assert not deinterleave or x.shape[1] % 2 == 0
    tokens, hidden = x.shape
    n_experts = gate_weight.shape[0]
    t = torch.empty_like(x)
    logits = torch.empty(tokens, n_experts, dtype=torch.float32, device=x.device)
    if tokens:
        block_e, warps = router_tile()
        _norm_logits_kernel[(tokens, triton.cdiv(n_experts, block_e))](
            x, norm_scale, t, gate_weight, gate_bias, logits, x.stride(0), t.stride(0), gate_weight.stride(0), eps,
            H=hidden, H_P=triton.next_power_of_2(hidden), E=n_experts, BLOCK_E=block_e, DEINTERLEAVE=deinterleave, PDL=pdl(),
            num_warps=warps, **pdl_launch())
    return t, logits


def norm_route(x: torch.Tensor, norm_scale: torch.Tensor, eps: float, gate_weight: torch.Tensor, gate_bias: torch.Tensor,
               k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H] → t = RMSNorm(x) [T, H] (x's dtype), experts [T, k] (int32) and routing weights [T, k] (x's dtype).
    Two launches: `norm_logits`, then top-k and softmax per token."""
    t, logits = norm_logits(x, norm_scale, eps, gate_weight, gate_bias)
    tokens, n_experts = logits.shape
    experts = torch.empty(tokens, k, dtype=torch.int32, device=x.device)
    weights = torch.empty(tokens, k, dtype=x.dtype, device=x.device)
    if tokens:
        _topk_kernel[(tokens,)](logits, experts, weights, E=n_experts, E_P=triton.next_power_of_2(n_experts), K=k,
                                K_P=triton.next_power_of_2(k), PDL=pdl(), num_warps=1, **pdl_launch())
    return t, experts, weights


def mlp1(t: torch.Tensor, experts: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
         swiglu_limit: float) -> torch.Tensor:
    """t [T, H] and experts [T, k] → the clamped SwiGLU of each (token, slot)'s first projection, h [T·k, O/2]."""
    (block_n, block_b, warps), _ = tiles()
    pairs, k = experts.numel(), experts.shape[1]
    n_out = blocks.shape[1] // 2
    h = torch.empty(pairs, n_out, dtype=t.dtype, device=t.device)
    if pairs:
        _mlp1_kernel[(pairs, triton.cdiv(n_out, block_n))](
            t, h, blocks, scales, bias if bias is not None else t, experts, n_out, float(swiglu_limit),
            t.stride(0), h.stride(0), blocks.stride(0), blocks.stride(1), scales.stride(0), scales.stride(1),
            bias.stride(0) if bias is not None else 0,
            K=t.shape[1], ROUTE_K=k, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_B=block_b, ASM=use_asm(), PDL=pdl(),
            num_warps=warps, **pdl_launch())
    return h


def mlp2(h: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
         bias: torch.Tensor | None, residual: torch.Tensor | None) -> torch.Tensor:
    """h [T·k, I] → Σ_slots weight · (h·W2ᵀ + b2) [T, O], rounded to h's dtype, plus `residual` [T, O] when given."""
    _, (block_n, block_b, warps) = tiles()
    tokens, k = experts.shape
    n_out = blocks.shape[1]
    y = torch.empty(tokens, n_out, dtype=h.dtype, device=h.device)
    if tokens:
        x = residual if residual is not None else y
        _mlp2_kernel[(tokens, triton.cdiv(n_out, block_n))](
            h, x, y, blocks, scales, bias if bias is not None else h, experts, weights, n_out,
            h.stride(0), x.stride(0), y.stride(0), blocks.stride(0), blocks.stride(1), scales.stride(0), scales.stride(1),
            bias.stride(0) if bias is not None else 0,
            K=h.shape[1], ROUTE_K=k, K_P=triton.next_power_of_2(k), HAS_BIAS=bias is not None, RESIDUAL=residual is not None,
            BLOCK_N=block_n, BLOCK_B=block_b, ASM=use_asm(), PDL=pdl(), num_warps=warps, **pdl_launch())
    return y


def moe_layer_decode(x: torch.Tensor, norm: tuple[torch.Tensor, float], gate: tuple[torch.Tensor, torch.Tensor], k: int,
                     mlp1_weights: tuple, mlp2_weights: tuple, swiglu_limit: float) -> torch.Tensor:
    """A whole MoE layer with its residual for few tokens: x [T, H] → x + Σ_k weight · expert(RMSNorm(x)), in four launches.

    norm = (scale fp32, eps); gate = (weight [E, H], bias [E]); mlp1/mlp2 = (blocks, scales, bias) as in
    `triton_moe.mxfp4_grouped_matmul`."""
    x = x.contiguous()
    t, experts, weights = norm_route(x, norm[0], norm[1], gate[0], gate[1], k)
    h = mlp1(t, experts, *mlp1_weights, swiglu_limit)
    return mlp2(h, experts, weights, *mlp2_weights, residual=x)
