"""Paged attention with sinks and sliding windows in Triton: the CUDA drop-in behind `PagedAttention`.

One kernel serves decode and varlen (chunked) prefill. A program takes one sequence, a tile of
its query tokens and one KV head; the GQA group's query heads are folded into the tile's rows
(row = token · group + head), so each key is read once per KV head. Keys are gathered straight
from the block pool through the sequence's block table, only over the positions the tile can
see (causal, and for sliding layers the window), and the softmax runs online in fp32 starting
from the sink: m = sink, l = 1 is exactly the sink's column already counted, so no extra pass
and no −inf arithmetic. The same arithmetic as `attention_with_sinks`, the reference.

Launch shape: (sequences, query tiles of the longest sequence, KV heads); tiles past a shorter
sequence's end return at once, so no per-sequence Python runs.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ossrun.model.kernels.triton_moe import interpreting, pdl, pdl_launch, pdl_release, pdl_wait


@triton.jit
def _dot(a, b, EMULATE: tl.constexpr, IEEE: tl.constexpr):
    """fp32-accumulated a·b; widened to fp32 under the interpreter (its bf16 dot is wrong, see triton_moe.mma).
    IEEE: fp32 caches multiply in full fp32 (a GPU's default for an fp32 dot is tf32, 1e-3 off)."""
    if EMULATE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _key_tile(start, q, q_pos, m_i, l_i, acc, k_ptr, v_ptr, table, first_block, n_table, hi, window, scale, kvh,
              stride_kb, stride_ks, stride_kh,
              HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, SLIDING: tl.constexpr, EMULATE: tl.constexpr,
              IEEE: tl.constexpr):
    """One online-softmax update over keys start … start+BLOCK_N−1, gathered through the block table."""
    d = tl.arange(0, HEAD_DIM)
    k_pos = start + tl.arange(0, BLOCK_N)
    logical = k_pos // PAGE - first_block
    k_ok = (k_pos < hi) & (logical < n_table)
    block = tl.load(table + logical, mask=k_ok, other=0).to(tl.int64)
    slot = block * stride_kb + (k_pos % PAGE) * stride_ks + kvh * stride_kh
    k_t = tl.load(k_ptr + slot[None, :] + d[:, None], mask=k_ok[None, :], other=0.0)  # [D, N]
    s = _dot(q, k_t, EMULATE, IEEE) * scale
    allowed = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
    if SLIDING:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptr + slot[:, None] + d[None, :], mask=k_ok[:, None], other=0.0)  # [N, D]
    acc = acc * alpha[:, None] + _dot(p.to(v_ptr.dtype.element_ty), v, EMULATE, IEEE)
    return m_new, l_i, acc


@triton.jit
def _paged_attention_kernel(
    q_ptr, out_ptr, k_ptr, v_ptr, sinks_ptr,
    tables_ptr, first_block_ptr, context_ptr, q_start_ptr, q_len_ptr, positions_ptr, seqs_ptr,
    n_table, window, scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_tb,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, SLIDING: tl.constexpr, EMULATE: tl.constexpr, IEEE: tl.constexpr,
    PDL: tl.constexpr):
    pdl_release(PDL)
    pdl_wait(PDL)
    seq = tl.load(seqs_ptr + tl.program_id(0))  # which sequence of the step (row of the block tables)
    t0 = tl.program_id(1) * BLOCK_T
    kvh = tl.program_id(2)
    q_len = tl.load(q_len_ptr + seq)
    if t0 >= q_len:
        return
    q_start = tl.load(q_start_ptr + seq)
    BLOCK_M: tl.constexpr = BLOCK_T * GROUP_P
    r = tl.arange(0, BLOCK_M)
    tok = t0 + r // GROUP_P
    head = kvh * GROUP + r % GROUP_P
    row_ok = (tok < q_len) & (r % GROUP_P < GROUP)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :], mask=row_ok[:, None], other=0.0)
    q_pos = tl.load(positions_ptr + q_start + tok, mask=row_ok, other=-1)
    # The keys this tile can see: causal up to its last query, windowed from its first.
    first = tl.load(first_block_ptr + seq) * PAGE
    hi = tl.minimum(tl.max(q_pos, 0) + 1, tl.load(context_ptr + seq))
    lo = first
    if SLIDING:
        lo = tl.maximum(tl.min(tl.where(row_ok, q_pos, 1 << 30), 0) - window + 1, first)
    m_i = tl.load(sinks_ptr + head, mask=row_ok, other=0.0).to(tl.float32)  # the sink is the first column
    l_i = tl.full((BLOCK_M,), 1.0, tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    q = q.to(k_ptr.dtype.element_ty)
    table = tables_ptr + seq.to(tl.int64) * stride_tb
    if EMULATE:  # the interpreter cannot take tensors as range() bounds (Triton 3.6 with NumPy 2)
        start = lo
        while start < hi:
            m_i, l_i, acc = _key_tile(start, q, q_pos, m_i, l_i, acc, k_ptr, v_ptr, table, first // PAGE, n_table, hi, window,
                                      scale, kvh, stride_kb, stride_ks, stride_kh, HEAD_DIM, PAGE, BLOCK_N, SLIDING, EMULATE, IEEE)
            start += BLOCK_N
    else:
        for start in range(lo, hi, BLOCK_N):
            m_i, l_i, acc = _key_tile(start, q, q_pos, m_i, l_i, acc, k_ptr, v_ptr, table, first // PAGE, n_table, hi, window,
                                      scale, kvh, stride_kb, stride_ks, stride_kh, HEAD_DIM, PAGE, BLOCK_N, SLIDING, EMULATE, IEEE)
    out = acc / l_i[:, None]
    tl.store(out_ptr + (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _decode_split_kernel(
    q_ptr, part_ptr, stats_ptr, k_ptr, v_ptr,
    tables_ptr, first_block_ptr, context_ptr, q_start_ptr, positions_ptr, seqs_ptr,
    n_table, window, scale,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_tb,
    GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr, SLIDING: tl.constexpr, EMULATE: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr):
    """Decode (one query a sequence), split along the keys: program (i, KV head, split) takes the split-th of SPLITS
    equal runs of the keys its query sees and leaves the unnormalised (max, sum, P·V) of its GROUP query heads;
    `_decode_combine_kernel` merges the runs with the sink. Rows past GROUP pad the tile to the 16 a dot needs."""
    pdl_release(PDL)
    pdl_wait(PDL)
    i = tl.program_id(0)
    seq = tl.load(seqs_ptr + i)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    r = tl.arange(0, ROWS)
    row_ok = r < GROUP
    head = kvh * GROUP + tl.minimum(r, GROUP - 1)
    q_start = tl.load(q_start_ptr + seq)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + q_start * stride_qt + head[:, None] * stride_qh + d[None, :], mask=row_ok[:, None], other=0.0)
    pos = tl.load(positions_ptr + q_start)
    q_pos = tl.zeros((ROWS,), tl.int64) + pos
    first = tl.load(first_block_ptr + seq) * PAGE
    hi = tl.minimum(pos + 1, tl.load(context_ptr + seq))
    lo = first
    if SLIDING:
        lo = tl.maximum(pos - window + 1, first)
    chunk = tl.cdiv(tl.cdiv(hi - lo, SPLITS), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    end = tl.minimum(start + chunk, hi)
    m_i = tl.full((ROWS,), -1.0e30, tl.float32)  # finite: an empty run must not make exp(−inf − (−inf))
    l_i = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, HEAD_DIM), dtype=tl.float32)
    q = q.to(k_ptr.dtype.element_ty)
    table = tables_ptr + seq.to(tl.int64) * stride_tb
    while start < end:  # a while loop: tensor bounds (the interpreter takes no tensor range() bounds either)
        m_i, l_i, acc = _key_tile(start, q, q_pos, m_i, l_i, acc, k_ptr, v_ptr, table, first // PAGE, n_table, end, window,
                                  scale, kvh, stride_kb, stride_ks, stride_kh, HEAD_DIM, PAGE, BLOCK_N, SLIDING, EMULATE, IEEE)
        start += BLOCK_N
    at = (i * tl.num_programs(1) + kvh) * SPLITS + split
    tl.store(stats_ptr + at * 2 * ROWS + r, m_i)
    tl.store(stats_ptr + at * 2 * ROWS + ROWS + r, l_i)
    tl.store(part_ptr + at * ROWS * HEAD_DIM + r[:, None] * HEAD_DIM + d[None, :], acc)


@triton.jit
def _decode_combine_kernel(part_ptr, stats_ptr, sinks_ptr, out_ptr, q_start_ptr, seqs_ptr, stride_ot, stride_oh,
                           GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr,
                           PDL: tl.constexpr):
    """The runs of one (sequence, KV head) merged with the sink as the first column: out = Σ_s e^(m_s−M)·acc_s / L,
    L = e^(sink−M) + Σ_s e^(m_s−M)·l_s, M the largest of the sink and the m_s (the reference's softmax, regrouped)."""
    pdl_release(PDL)
    pdl_wait(PDL)
    i = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.arange(0, SPLITS)
    r = tl.arange(0, ROWS)
    d = tl.arange(0, HEAD_DIM)
    row_ok = r < GROUP
    head = kvh * GROUP + tl.minimum(r, GROUP - 1)
    at = (i * tl.num_programs(1) + kvh) * SPLITS + s  # [SPLITS]
    m_s = tl.load(stats_ptr + at[:, None] * 2 * ROWS + r[None, :])  # [SPLITS, ROWS]
    l_s = tl.load(stats_ptr + at[:, None] * 2 * ROWS + ROWS + r[None, :])
    sink = tl.load(sinks_ptr + head).to(tl.float32)  # [ROWS]
    big = tl.maximum(sink, tl.max(m_s, 0))
    w = tl.exp(m_s - big[None, :])  # [SPLITS, ROWS]
    total = tl.exp(sink - big) + tl.sum(w * l_s, 0)
    acc = tl.load(part_ptr + at[:, None, None] * ROWS * HEAD_DIM + r[None, :, None] * HEAD_DIM + d[None, None, :])
    out = tl.sum(acc * w[:, :, None], 0) / total[:, None]
    q_start = tl.load(q_start_ptr + tl.load(seqs_ptr + i))
    tl.store(out_ptr + q_start * stride_ot + head[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None])


DECODE_SPLITS = 1  # not yet timed on a GPU: bench/gpu.py's graph replay compares 8 and 16 (bench/GPU_NOTES.md)
SPLIT_BLOCK_N = 64


def decode_splits(programs: int) -> int:
    """Runs the keys of each decode query are split into (a power of two, 1 = the one-pass kernel). A decode launch
    has one program per (sequence, KV head), 8 at batch 1, each walking its whole context: splitting gives the GPU
    more programs where there are few; past 128 programs there are enough. OSSRUN_ATTN_DECODE_SPLITS sets it."""
    splits = _power_of_two_setting("OSSRUN_ATTN_DECODE_SPLITS", DECODE_SPLITS, least=1)
    return splits if programs < 128 else 1


DECODE_BLOCK_N = 128  # run 7's graph replay: 2.41 ms a batch-1 step (64: 2.51, 256: 2.45)


def decode_block_n() -> int:
    """Keys per step of a decode program's walk over its context. A decode launch has one program per
    (sequence, KV head), 8 at batch 1, so its time is the number of serial steps; wider steps mean fewer.
    OSSRUN_ATTN_DECODE_BLOCK_N overrides it (bench/gpu.py's graph replay times the choices)."""
    return _power_of_two_setting("OSSRUN_ATTN_DECODE_BLOCK_N", DECODE_BLOCK_N, least=16)


def _power_of_two_setting(name: str, default: int, least: int) -> int:
    """An integer setting from the environment that the kernels take as a `tl.arange` length (a power of two) or a
    `tl.dot` width (16 at least on a GPU): anything else failed inside Triton at the first decode step."""
    value = os.environ.get(name)
    if value is None:
        return default
    number = int(value) if value.strip().isdigit() else 0
    if number < least or number & (number - 1):
        raise ValueError(f"{name}={value!r}: must be a power of two, at least {least}")
    return number


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, sinks: torch.Tensor, window: int | None, scale: float,
    block_tables: torch.Tensor, first_block: torch.Tensor, context_lens: torch.Tensor,
    q_starts: torch.Tensor, q_lens: torch.Tensor, positions: torch.Tensor, seqs: torch.Tensor, max_q_len: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """Attention of the step's queries for the sequences `seqs` against the paged cache, into `out` [T, Hq, D].

    q [T, Hq, D] (the step's flat queries, cache already written); k/v_cache [blocks, page, Hkv, D];
    block_tables [B, N] from logical block first_block[b]; context_lens [B] (tokens after this step);
    q_starts, q_lens [B]: where each sequence's queries sit in q; positions [T]; seqs [S]: which of the
    B sequences to compute (a launch for the decodes, one for the prefills); max_q_len: the longest of them.
    """
    if len(seqs) == 0:
        return out
    n_heads, dim = q.shape[1], q.shape[2]
    page, n_kv = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv
    group_p = triton.next_power_of_2(group)
    splits = decode_splits(len(seqs) * n_kv) if max_q_len == 1 else 1
    if splits > 1:
        return _split_decode(q, k_cache, v_cache, sinks, window, scale, block_tables, first_block, context_lens, q_starts,
                             positions, seqs, out, splits)
    # Two tile shapes only (each one compile): 16 rows for decodes, 128 rows for prefill chunks; tl.dot needs 16.
    block_t = max(1, (16 if max_q_len == 1 else 128) // group_p)
    block_n = decode_block_n() if max_q_len == 1 else 64
    grid = (len(seqs), triton.cdiv(max_q_len, block_t), n_kv)
    _paged_attention_kernel[grid](
        q, out, k_cache, v_cache, sinks,
        block_tables, first_block, context_lens, q_starts, q_lens, positions, seqs,
        block_tables.shape[1], window or 0, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_P=group_p, HEAD_DIM=dim, PAGE=page,
        BLOCK_T=block_t, BLOCK_N=block_n, SLIDING=bool(window), EMULATE=interpreting(), IEEE=k_cache.dtype == torch.float32,
        PDL=pdl(), **pdl_launch(),
    )
    return out


def _split_decode(q, k_cache, v_cache, sinks, window, scale, block_tables, first_block, context_lens, q_starts, positions, seqs,
                  out, splits: int) -> torch.Tensor:
    """`paged_attention` for decodes in two launches: the key runs (`_decode_split_kernel`), then their merge."""
    n_heads, dim = q.shape[1], q.shape[2]
    page, n_kv = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv
    rows = max(16, triton.next_power_of_2(group))
    runs = len(seqs) * n_kv * splits
    part = torch.empty(runs, rows, dim, dtype=torch.float32, device=q.device)
    stats = torch.empty(runs, 2, rows, dtype=torch.float32, device=q.device)
    common = dict(GROUP=group, ROWS=rows, HEAD_DIM=dim, SPLITS=splits, PDL=pdl(), **pdl_launch())
    _decode_split_kernel[(len(seqs), n_kv, splits)](
        q, part, stats, k_cache, v_cache, block_tables, first_block, context_lens, q_starts, positions, seqs,
        block_tables.shape[1], window or 0, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        PAGE=page, BLOCK_N=SPLIT_BLOCK_N, SLIDING=bool(window), EMULATE=interpreting(), IEEE=k_cache.dtype == torch.float32,
        **common)
    _decode_combine_kernel[(len(seqs), n_kv)](part, stats, sinks, out, q_starts, seqs, out.stride(0), out.stride(1), **common)
    return out
