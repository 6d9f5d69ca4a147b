"""A MoE layer for few tokens on the tensor cores: the expert's weights are the A operand (swap-AB).

At batch 1 the GEMV kernels (`triton_moe_decode`) are bound by instructions, not bytes: per weight
byte they decode two nibbles to fp16, widen them to fp32, scale, multiply-add on the FP32 units and
relay the activations through shared memory, ~17 instructions a byte (bench/GPU_NOTES.md, read off
the sm_90 SASS). Here the decoded weights feed `tl.dot` as its left operand, [rows, K], and the few
tokens' activations are the right one, [K, 16 to 64 columns]: a warpgroup MMA takes A straight from
registers, so a weight costs only its decode, and the multiply-adds go to the tensor cores. K is
reordered (`_mma_order`) so that each thread's share of a tile is one run of memory.

The decode goes straight to bf16, two values per instruction (`_E2M1_BF16_PTX`): a nibble's three
magnitude bits land on bits 6–8 of a bf16 and its sign on bit 15 (one integer multiply places both:
the nibble times 2^6 + 2^12), which is its E2M1 value × 2^-126 (a bf16 subnormal when the exponent
is 0); × 2^126 and × the block's scale 2^(s−127) then give the weight exactly (two bf16 multiplies:
one would overflow for s > 128; checkpoints whose scale bytes are all ≤ 128 take one, by 2^(s−1)).
The multiplies are bf16x2 `fma`s with a −0 addend: Hopper's SASS is the same as for `mul`, and the
PTX also compiles for Ampere. The interpreter (no PTX) takes the fp32 route of `triton_moe`.
Loop instructions a weight byte, against the GEMV kernels' 17.8–20.6: `bench/sass_loop.py`.

Columns are (token, slot) pairs. A program takes one expert and BLOCK_M weight rows, and serves every
pair routed to that expert (the launch has one program per pair; a pair whose expert an earlier pair
already has returns at once), so each expert's weights are read once a step however many tokens chose
it. The activations come de-interleaved (a row's even elements, then its odd ones) so that the low
and high nibbles of a byte multiply contiguous runs: `norm_route(..., deinterleave=True)` writes RMSNorm's
output that way and the first projection writes h that way. The second projection, split along K,
writes each pair's weighted partial outputs in fp32; a small kernel sums a token's slots and runs in
order, rounds the sum to the model dtype as the reference does and adds the residual.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ossrun.model.kernels.triton_moe import _scale_of, interpreting, mma, pdl, pdl_launch, pdl_release, pdl_wait, top_k_softmax
from ossrun.model.kernels.triton_moe_decode import _e2m1, norm_logits

# (BLOCK_M, NB, warps, stages): weight rows a program, 32-element blocks of K an iteration (a power of two), warps,
# software pipeline stages. The first is the default; bench/gpu_sweep.py times them all, tests/triton_sm90_compile.py
# compiles them. BLOCK_M = 64 is one warpgroup's MMA height (32 takes the older MMA: 2.4x the instructions). Read
# off the sm_90 SASS (loop instructions a weight byte a thread, two multiplies, 2026-12-01): 64,2: 11.4; 64,4: 9.6;
# 64,8: 8.3; 128,2: 9.2; the GEMV kernels 17.8–20.6. NB = 4 and 8 leave a masked tail of gpt-oss's 90 blocks.
SWEEP_TILES = [(64, 4, 4, 3), (64, 8, 4, 2), (128, 2, 4, 3), (64, 2, 4, 3), (64, 4, 4, 4), (128, 4, 8, 3)]


def tiles() -> tuple[int, int, int, int]:
    """(BLOCK_M, NB, warps, stages) of both projections; OSSRUN_MOE_MMA_TILE="m,nb,w,s" overrides (bench/gpu_sweep.py)."""
    override = os.environ.get("OSSRUN_MOE_MMA_TILE")
    if override:
        m, nb, w, s = (int(v) for v in override.split(","))
        return m, nb, w, s
    return SWEEP_TILES[0]


MAX_PAIRS = 64  # columns beyond this would hold [BLOCK_M, 128+] fp32 accumulators a program: the grouped kernel's ground


def columns(pairs: int) -> int:
    """Right-operand columns for `pairs` (token, slot) pairs: at least 16 (fewer take more instructions: the 8-wide
    MMA is not the warpgroup one), a power of two."""
    return max(16, triton.next_power_of_2(pairs))


_E2M1_BF16_PTX = tl.constexpr("""{
    .reg .b32 z, nz, c, t0, t1, m;
    mov.b32 z, 0;
    mov.b32 nz, 0x80008000;
    mov.b32 c, 0x7E807E80;
    prmt.b32 t0, $4, z, 0x4140;
    prmt.b32 t1, $4, z, 0x4342;
    and.b32 m, t0, 0x000F000F;
    mul.lo.u32 m, m, 4160;
    and.b32 m, m, 0x81C081C0;
    fma.rn.bf16x2 m, m, c, nz;
    fma.rn.bf16x2 $0, m, $5, nz;
    and.b32 m, t1, 0x000F000F;
    mul.lo.u32 m, m, 4160;
    and.b32 m, m, 0x81C081C0;
    fma.rn.bf16x2 m, m, c, nz;
    fma.rn.bf16x2 $1, m, $6, nz;
    and.b32 m, t0, 0x00F000F0;
    mul.lo.u32 m, m, 260;
    and.b32 m, m, 0x81C081C0;
    fma.rn.bf16x2 m, m, c, nz;
    fma.rn.bf16x2 $2, m, $5, nz;
    and.b32 m, t1, 0x00F000F0;
    mul.lo.u32 m, m, 260;
    and.b32 m, m, 0x81C081C0;
    fma.rn.bf16x2 m, m, c, nz;
    fma.rn.bf16x2 $3, m, $6, nz;
}""")  # a constexpr: jit code reads no other globals

# The same with one multiply: by 2^(s−1) = 2^126 · 2^(s−127), a bf16 while s ≤ 128 (weights' blocks up to 12).
_E2M1_BF16_ONE_MULTIPLY_PTX = tl.constexpr("""{
    .reg .b32 z, nz, t0, t1, m;
    mov.b32 z, 0;
    mov.b32 nz, 0x80008000;
    prmt.b32 t0, $4, z, 0x4140;
    prmt.b32 t1, $4, z, 0x4342;
    and.b32 m, t0, 0x000F000F;
    mul.lo.u32 m, m, 4160;
    and.b32 m, m, 0x81C081C0;
    fma.rn.bf16x2 $0, m, $5, nz;
    and.b32 m, t1, 0x000F000F;
    mul.lo.u32 m, m, 4160;
    and.b32 m, m, 0x81C081C0;
    fma.rn.bf16x2 $1, m, $6, nz;
    and.b32 m, t0, 0x00F000F0;
    mul.lo.u32 m, m, 260;
    and.b32 m, m, 0x81C081C0;
    fma.rn.bf16x2 $2, m, $5, nz;
    and.b32 m, t1, 0x00F000F0;
    mul.lo.u32 m, m, 260;
    and.b32 m, m, 0x81C081C0;
    fma.rn.bf16x2 $3, m, $6, nz;
}""")


@triton.jit
def _decode_bf16(packed, sbyte, ASM: tl.constexpr):
    """Packed bytes (uint8) and their blocks' scale bytes (same shape) → (low nibbles, high nibbles) as bf16 weights, exactly.

    ASM 1: four bytes per PTX block (see the module docstring): prmt spreads bytes 0,1 (then 2,3) to the halves of a
    word; per half-word pair, mask, one multiply placing magnitude and sign, mask, × 2^126, × scale. ASM 2, for
    weights whose scale bytes are all ≤ 128 (`use_asm`): the two bf16 multiplies as one. ASM 0: fp32 (the interpreter)."""
    if ASM == 2:
        scale = ((sbyte.to(tl.int16) + 126) << 7).to(tl.bfloat16, bitcast=True)  # 2^(s−1)
        lo, hi = tl.inline_asm_elementwise(_E2M1_BF16_ONE_MULTIPLY_PTX, "=r,=r,=r,=r,r,r,r", [packed, scale],
                                           dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
        return lo, hi
    elif ASM == 1:
        scale = (sbyte.to(tl.int16) << 7).to(tl.bfloat16, bitcast=True)  # 2^(s−127): the E8M0 byte as a bf16 exponent
        lo, hi = tl.inline_asm_elementwise(_E2M1_BF16_PTX, "=r,=r,=r,=r,r,r,r", [packed, scale],
                                           dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
        return lo, hi
    else:
        p = packed.to(tl.int32)
        scale = _scale_of(sbyte)
        return (_e2m1(p & 15) * scale).to(tl.bfloat16), (_e2m1(p >> 4) * scale).to(tl.bfloat16)


@triton.jit
def _routed_columns(logits_ptr, experts_ptr, weights_ptr, PAIRS, COLS: tl.constexpr, ROUTE_K: tl.constexpr,
                    E: tl.constexpr, E_P: tl.constexpr, K_P: tl.constexpr):
    """`_expert_columns`, with the router's top-k done here rather than in a launch of its own: every program takes
    the top-k of the logits of every token among the columns (a few hundred values); the programs of the first
    row tile store their pair's expert and routing weight for the second projection."""
    c = tl.arange(0, COLS)
    e = tl.arange(0, E_P)[None, :]
    tok = tl.minimum(c, PAIRS - 1) // ROUTE_K
    top_e, top_w = top_k_softmax(tl.load(logits_ptr + tok[:, None] * E + e, mask=e < E, other=float("-inf")), E, E_P,
                                 ROUTE_K, K_P)
    slot = (c % ROUTE_K)[:, None] == tl.arange(0, K_P)[None, :]  # [COLS, K_P]: column c is its token's slot c % k
    ec = tl.where(c < PAIRS, tl.sum(tl.where(slot, top_e, 0), 1), -1)
    mine = c == tl.program_id(0)
    expert = tl.sum(tl.where(mine, ec, 0), 0)
    if tl.program_id(1) == 0:
        tl.store(experts_ptr + tl.program_id(0), expert)
        weight = tl.sum(tl.where(mine, tl.sum(tl.where(slot, top_w, 0.0), 1), 0.0), 0)
        tl.store(weights_ptr + tl.program_id(0), weight.to(weights_ptr.dtype.element_ty))
    served_before = tl.sum(((ec == expert) & (c < tl.program_id(0))).to(tl.int32), 0) > 0
    return expert, served_before, ec == expert, c


@triton.jit
def _expert_columns(experts_ptr, PAIRS, COLS: tl.constexpr):
    """This program's expert (that of pair program_id(0)), whether an earlier pair already serves it, the pairs it
    serves [COLS] and the column index c [COLS]."""
    expert = tl.load(experts_ptr + tl.program_id(0))
    c = tl.arange(0, COLS)
    ec = tl.load(experts_ptr + c, mask=c < PAIRS, other=-1)
    served_before = tl.sum(((ec == expert) & (c < tl.program_id(0))).to(tl.int32), 0) > 0
    return expert, served_before, ec == expert, c


@triton.jit
def _expert_dot(x_base, col_ok, w_base, s_base, rows, row_ok, stride_bo, stride_so, K: tl.constexpr, SPLIT_K: tl.constexpr,
                BLOCK_M: tl.constexpr, NB: tl.constexpr, COLS: tl.constexpr, ASM: tl.constexpr, EMULATE: tl.constexpr,
                STAGES: tl.constexpr):
    """W[rows] · X over the program_id(2)-th of SPLIT_K runs of K's blocks → [BLOCK_M, COLS] fp32. X's columns start at
    x_base [COLS] (pointers), de-interleaved: element 2j at j, 2j+1 at K/2 + j. W's rows are K/32 blocks of 16 bytes
    with one scale byte each."""
    NBLK: tl.constexpr = K // 32
    RUN: tl.constexpr = (NBLK + SPLIT_K - 1) // SPLIT_K
    first = tl.program_id(2) * RUN
    last = tl.minimum(first + RUN, NBLK)
    acc = tl.zeros((BLOCK_M, COLS), dtype=tl.float32)
    if EMULATE:  # the interpreter takes no tensor range() bounds (Triton 3.6 with NumPy 2)
        b0 = first
        while b0 < last:
            acc = _dot_step(acc, b0, last, x_base, col_ok, w_base, s_base, rows, row_ok, stride_bo, stride_so, K, BLOCK_M, NB, COLS, ASM,
                            EMULATE)
            b0 += NB
    else:
        for b0 in tl.range(first, last, NB, num_stages=STAGES):
            acc = _dot_step(acc, b0, last, x_base, col_ok, w_base, s_base, rows, row_ok, stride_bo, stride_so, K, BLOCK_M, NB, COLS, ASM,
                            EMULATE)
    return acc


@triton.jit
def _dot_step(acc, b0, last, x_base, col_ok, w_base, s_base, rows, row_ok, stride_bo, stride_so, K: tl.constexpr, BLOCK_M: tl.constexpr,
              NB: tl.constexpr, COLS: tl.constexpr, ASM: tl.constexpr, EMULATE: tl.constexpr):
    """acc + W[rows, blocks b0 … b0+NB−1 (those before `last`)] · X[those blocks]."""
    j = tl.arange(0, 16)
    blk = b0 + tl.arange(0, NB)
    b_ok = blk < last
    packed = tl.load(w_base + rows[:, None, None] * stride_bo + (blk * 16)[None, :, None] + j[None, None, :],
                     mask=row_ok[:, None, None] & b_ok[None, :, None], other=0)
    sbyte = tl.load(s_base + rows[:, None] * stride_so + blk[None, :], mask=row_ok[:, None] & b_ok[None, :], other=0)
    lo, hi = _decode_bf16(packed, sbyte[:, :, None], ASM)
    byte = b0 * 16 + tl.arange(0, NB * 16)  # byte index along the row = index of the even element in the de-interleaved X
    k_ok = byte < K // 2
    x_ok = k_ok[:, None] & col_ok[None, :]  # columns of other experts' pairs (at batch 1, 15 of 16) read nothing
    x_even = tl.load(x_base[None, :] + byte[:, None], mask=x_ok, other=0.0).to(tl.bfloat16)
    x_odd = tl.load(x_base[None, :] + (K // 2 + byte)[:, None], mask=x_ok, other=0.0).to(tl.bfloat16)
    acc += mma(_mma_order(lo, BLOCK_M, NB), tl.trans(_mma_order(tl.trans(x_even), COLS, NB)), EMULATE)
    acc += mma(_mma_order(hi, BLOCK_M, NB), tl.trans(_mma_order(tl.trans(x_odd), COLS, NB)), EMULATE)
    return acc


@triton.jit
def _mma_order(a, R: tl.constexpr, NB: tl.constexpr):
    """[R, NB·16] in memory order → the same values in an order of K whose tensor-core fragments are memory runs.

    A dot's sum over K does not care about K's order, only that both operands share it. An MMA's left operand
    gives each thread of a quad-lane l the K pairs 2l, 2l+1 and 8+2l, 8+2l+1 of every 16: in memory order a
    thread would hold 2-byte pieces (loaded as u16 and repacked, ~3 instructions a byte). Logical k = 16c + 8h
    + 2l + e taken from memory byte l·4NB + 4c + 2h + e hands each thread 4·NB contiguous bytes instead."""
    a = tl.reshape(a, (R, 4, NB, 2, 2))  # memory byte = l·4NB + 4c + 2h + e
    return tl.reshape(tl.permute(a, (0, 2, 3, 1, 4)), (R, NB * 16))  # logical k = 16c + 8h + 2l + e


@triton.jit
def _mlp1_mma_kernel(t_ptr, h_ptr, blocks_ptr, scales_ptr, bias_ptr, experts_ptr, logits_ptr, weights_ptr, PAIRS, N_OUT,
                     swiglu_limit, stride_t, stride_h, stride_be, stride_bo, stride_se, stride_so, stride_biase,
                     K: tl.constexpr, ROUTE_K: tl.constexpr, HAS_BIAS: tl.constexpr, COLS: tl.constexpr,
                     BLOCK_M: tl.constexpr, NB: tl.constexpr, STAGES: tl.constexpr, ASM: tl.constexpr, EMULATE: tl.constexpr,
                     ROUTE: tl.constexpr, E: tl.constexpr, E_P: tl.constexpr, K_P: tl.constexpr, PDL: tl.constexpr):
    """h (de-interleaved, [PAIRS, N_OUT]) = clamped SwiGLU of t · W1[e]ᵀ + b1[e] for the pairs of expert e; the weight
    rows of output column n are 2n (glu) and 2n+1 (linear), one contiguous run of BLOCK_M rows a program. ROUTE: the
    pairs' experts come from the router logits [T, E] (`_routed_columns`, which also writes experts and weights)."""
    pdl_release(PDL)
    pdl_wait(PDL)
    if ROUTE:
        expert, served_before, col_ok, c = _routed_columns(logits_ptr, experts_ptr, weights_ptr, PAIRS, COLS, ROUTE_K, E, E_P, K_P)
    else:
        expert, served_before, col_ok, c = _expert_columns(experts_ptr, PAIRS, COLS)
    if served_before:
        return
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < 2 * N_OUT
    x_base = t_ptr + (tl.minimum(c, PAIRS - 1) // ROUTE_K) * stride_t  # a column past the pairs reads a real row
    acc = _expert_dot(x_base, col_ok, blocks_ptr + expert.to(tl.int64) * stride_be, scales_ptr + expert.to(tl.int64) * stride_se,
                      rows, row_ok, stride_bo, stride_so, K, 1, BLOCK_M, NB, COLS, ASM, EMULATE, STAGES)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert * stride_biase + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    glu, lin = tl.split(tl.reshape(tl.trans(acc), (COLS, BLOCK_M // 2, 2)))  # [COLS, BLOCK_M/2] each
    glu = tl.minimum(glu, swiglu_limit)
    lin = tl.minimum(tl.maximum(lin, -swiglu_limit), swiglu_limit)
    out = glu * tl.sigmoid(1.702 * glu) * (lin + 1.0)  # SWIGLU_ALPHA
    n = tl.program_id(1) * (BLOCK_M // 2) + tl.arange(0, BLOCK_M // 2)
    where = (n // 2) + (n % 2) * (N_OUT // 2)  # de-interleaved for the second projection
    tl.store(h_ptr + c[:, None] * stride_h + where[None, :], out.to(h_ptr.dtype.element_ty),
             mask=col_ok[:, None] & (n < N_OUT)[None, :])


@triton.jit
def _mlp2_mma_kernel(h_ptr, part_ptr, blocks_ptr, scales_ptr, bias_ptr, experts_ptr, weights_ptr, PAIRS, N_OUT,
                     stride_h, stride_p, stride_ps, stride_be, stride_bo, stride_se, stride_so, stride_biase,
                     K: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, COLS: tl.constexpr,
                     BLOCK_M: tl.constexpr, NB: tl.constexpr, STAGES: tl.constexpr, ASM: tl.constexpr, EMULATE: tl.constexpr,
                     PDL: tl.constexpr):
    """part[split, pair] = routing weight · (h[pair] · W2[e]ᵀ over the split's run of K (+ b2[e] in the first)) in fp32,
    for the pairs of expert e. Split along K because this projection has half the first's rows: at batch 1,
    4 experts × 45 tiles of 64 rows leave most SMs one program, too few bytes in flight to fill HBM."""
    pdl_release(PDL)
    pdl_wait(PDL)
    expert, served_before, col_ok, c = _expert_columns(experts_ptr, PAIRS, COLS)
    if served_before:
        return
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N_OUT
    x_base = h_ptr + tl.minimum(c, PAIRS - 1) * stride_h
    acc = _expert_dot(x_base, col_ok, blocks_ptr + expert.to(tl.int64) * stride_be, scales_ptr + expert.to(tl.int64) * stride_se,
                      rows, row_ok, stride_bo, stride_so, K, SPLIT_K, BLOCK_M, NB, COLS, ASM, EMULATE, STAGES)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert * stride_biase + rows, mask=row_ok & (tl.program_id(2) == 0), other=0.0).to(tl.float32)[:, None]
    route_w = tl.load(weights_ptr + c, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(part_ptr + tl.program_id(2) * stride_ps + c[None, :] * stride_p + rows[:, None], acc * route_w[None, :],
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _combine_kernel(part_ptr, x_ptr, y_ptr, N, stride_p, stride_ps, stride_x, stride_y, ROUTE_K: tl.constexpr,
                    SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """y[t] = x[t] + (Σ over t's slots and K runs, in order, of part) rounded to the model dtype (as the reference
    rounds moe(x))."""
    pdl_release(PDL)
    pdl_wait(PDL)
    tok = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    total = tl.zeros((BLOCK,), tl.float32)
    for s in tl.static_range(ROUTE_K):
        for run in tl.static_range(SPLIT_K):
            total += tl.load(part_ptr + run * stride_ps + (tok * ROUTE_K + s) * stride_p + cols, mask=ok, other=0.0)
    moe = total.to(y_ptr.dtype.element_ty).to(tl.float32) + tl.load(x_ptr + tok * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + tok * stride_y + cols, moe.to(y_ptr.dtype.element_ty), mask=ok)


MLP2_SPLIT_K = 2  # not yet timed on a GPU; bench/gpu_sweep.py times 1, 2 and 4 (Little's law: 180 programs × 12 KB in flight < 4.8 MB)


def mlp2_split_k() -> int:
    """Runs of K the second projection is split into (OSSRUN_MOE_MMA_SPLIT_K sets it; bench/gpu_sweep.py)."""
    return int(os.environ.get("OSSRUN_MOE_MMA_SPLIT_K", MLP2_SPLIT_K))


def use_asm(small_scales: bool) -> int:
    """Which decode (`_decode_bf16`): 0 in the interpreter (no PTX); 2 (one multiply) for weights whose scale bytes are
    all ≤ 128 (`small_scales`, known at load); else 1. OSSRUN_MOE_MMA_ONE_MULTIPLY=0 keeps 1 (bench/gpu_sweep.py)."""
    if interpreting():
        return 0
    return 2 if small_scales and os.environ.get("OSSRUN_MOE_MMA_ONE_MULTIPLY", "1") != "0" else 1


def mlp1(t_deinterleaved: torch.Tensor, experts: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
         bias: torch.Tensor | None, swiglu_limit: float, small_scales: bool = False,
         route: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """t [T, H] (de-interleaved rows) and experts [T, k] → h [T·k, O/2], de-interleaved: the clamped SwiGLU of each
    (token, slot)'s first projection. small_scales: every scale byte is ≤ 128 (the one-multiply decode).
    route = (router logits [T, E] fp32, weights [T, k]): the kernel routes, writing `experts` and `weights` (top-k,
    softmax over the k, as `triton_moe_decode.norm_route`), one launch fewer than routing apart."""
    block_m, nb, warps, stages = tiles()
    pairs, k = experts.numel(), experts.shape[1]
    n_out = blocks.shape[1] // 2
    h = torch.empty(pairs, n_out, dtype=t_deinterleaved.dtype, device=t_deinterleaved.device)
    logits, weights = route if route is not None else (h, h)
    if pairs:
        _mlp1_mma_kernel[(pairs, triton.cdiv(2 * n_out, block_m))](
            t_deinterleaved, h, blocks, scales, bias if bias is not None else h, experts, logits, weights, pairs, n_out,
            float(swiglu_limit), t_deinterleaved.stride(0), h.stride(0), blocks.stride(0), blocks.stride(1), scales.stride(0),
            scales.stride(1), bias.stride(0) if bias is not None else 0,
            K=t_deinterleaved.shape[1], ROUTE_K=k, HAS_BIAS=bias is not None, COLS=columns(pairs), BLOCK_M=block_m, NB=nb,
            STAGES=stages, ASM=use_asm(small_scales), EMULATE=interpreting(), ROUTE=route is not None, E=logits.shape[-1],
            E_P=triton.next_power_of_2(logits.shape[-1]), K_P=triton.next_power_of_2(k), PDL=pdl(), num_warps=warps,
            **pdl_launch())
    return h


def mlp2(h_deinterleaved: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, blocks: torch.Tensor,
         scales: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor, small_scales: bool = False) -> torch.Tensor:
    """h [T·k, I] (de-interleaved rows) → residual + Σ_slots weight · (h·W2ᵀ + b2) [T, O], the sum rounded to h's dtype.
    small_scales as in `mlp1`."""
    block_m, nb, warps, stages = tiles()
    tokens, k = experts.shape
    pairs, n_out = experts.numel(), blocks.shape[1]
    y = torch.empty(tokens, n_out, dtype=h_deinterleaved.dtype, device=h_deinterleaved.device)
    if not tokens:
        return y
    split_k = mlp2_split_k()
    part = torch.empty(split_k, pairs, n_out, dtype=torch.float32, device=y.device)
    _mlp2_mma_kernel[(pairs, triton.cdiv(n_out, block_m), split_k)](
        h_deinterleaved, part, blocks, scales, bias if bias is not None else h_deinterleaved, experts, weights, pairs, n_out,
        h_deinterleaved.stride(0), part.stride(1), part.stride(0), blocks.stride(0), blocks.stride(1), scales.stride(0),
        scales.stride(1), bias.stride(0) if bias is not None else 0,
        K=h_deinterleaved.shape[1], SPLIT_K=split_k, HAS_BIAS=bias is not None, COLS=columns(pairs), BLOCK_M=block_m, NB=nb,
        STAGES=stages, ASM=use_asm(small_scales), EMULATE=interpreting(), PDL=pdl(), num_warps=warps, **pdl_launch())
    block = 1024
    _combine_kernel[(tokens, triton.cdiv(n_out, block))](part, residual, y, n_out, part.stride(1), part.stride(0), residual.stride(0),
                                                          y.stride(0), ROUTE_K=k, SPLIT_K=split_k, BLOCK=block, PDL=pdl(), num_warps=4,
                                                          **pdl_launch())
    return y


def moe_layer_mma(x: torch.Tensor, norm: tuple[torch.Tensor, float], gate: tuple[torch.Tensor, torch.Tensor], k: int,
                  mlp1_weights: tuple, mlp2_weights: tuple, swiglu_limit: float, small_scales: bool = False) -> torch.Tensor:
    """`triton_moe_decode.moe_layer_decode` on the tensor cores: x [T, H] → x + Σ_k weight · expert(RMSNorm(x)), in four
    launches (norm and logits; top-k and the first projection; the second; the slot sum with the residual)."""
    x = x.contiguous()
    t, logits = norm_logits(x, norm[0], norm[1], gate[0], gate[1], deinterleave=True)
    experts = torch.empty(x.shape[0], k, dtype=torch.int32, device=x.device)
    weights = torch.empty(x.shape[0], k, dtype=x.dtype, device=x.device)
    h = mlp1(t, experts, *mlp1_weights, swiglu_limit, small_scales=small_scales, route=(logits, weights))
    return mlp2(h, experts, weights, *mlp2_weights, residual=x, small_scales=small_scales)
