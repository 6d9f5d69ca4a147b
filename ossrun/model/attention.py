"""Attention with sinks over a flat batch, and the two ways the model gets its keys and values.

The model computes q, k, v for the step's tokens and hands them to an `AttentionBackend`; the
backend decides where keys come from: the step itself (`DenseAttention`, no cache: tests and
one-shot scoring) or a paged KV cache (`PagedAttention`, the engine). Both end in
`attention_with_sinks`, so the sink/window arithmetic exists once; on the fast precision a fused
kernel (the C one on the CPU, `paged_kernel`; Triton on CUDA, `kernels.gpu.triton_available`) reads
the paged cache itself instead, and `attention_with_sinks` stays the reference it is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


def attention_with_sinks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, allowed: torch.Tensor, scale: float
) -> torch.Tensor:
    """Softmax attention where each query head has one extra learned logit (its sink).

    q [B, T, Hq, D], k/v [B, S, Hkv, D], sinks [Hq], allowed [B, T, S] → [B, T, Hq, D].
    The sink joins the softmax as a column with no value and is dropped afterwards, so a head can
    put weight "nowhere". Softmax runs in fp32 whatever the compute dtype.
    """
    batch, n_q, n_heads, dim = q.shape
    n_kv = k.shape[2]
    group = n_heads // n_kv
    qg = q.view(batch, n_q, n_kv, group, dim)
    scores = torch.einsum("btkgd,bskd->bkgts", qg, k).float() * scale  # [B, Hkv, G, T, S]
    scores = scores.masked_fill(~allowed[:, None, None, :, :], float("-inf"))
    sink = sinks.float().view(1, n_kv, group, 1, 1).expand(batch, n_kv, group, n_q, 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    out = torch.einsum("bkgts,bskd->btkgd", probs.to(v.dtype), v)
    return out.reshape(batch, n_q, n_heads, dim)


def visibility(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal (and, for sliding layers, windowed) mask: key k visible to query q iff q−window < k ≤ q.

    query_pos [..., T], key_pos [..., S] → allowed [..., T, S].
    """
    allowed = key_pos.unsqueeze(-2) <= query_pos.unsqueeze(-1)
    if window:
        allowed &= key_pos.unsqueeze(-2) > query_pos.unsqueeze(-1) - window
    return allowed


class AttentionBackend(Protocol):
    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, window: int | None, scale: float
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] for the step's tokens → attention output [T, Hq, D]."""
        ...


@dataclass(slots=True)
class DenseAttention:
    """No cache: every sequence is whole in the step. `seq_ids` [T] says which sequence a token is of."""

    seq_ids: torch.Tensor
    positions: torch.Tensor

    def __call__(self, layer, q, k, v, sinks, window, scale):
        allowed = visibility(self.positions, self.positions, window)
        allowed &= self.seq_ids.unsqueeze(-1) == self.seq_ids.unsqueeze(-2)
        return attention_with_sinks(q[None], k[None], v[None], sinks, allowed[None], scale)[0]


class PagedKernel(Protocol):
    def __call__(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, query_starts: torch.Tensor,
        query_lens: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor, first_block: torch.Tensor,
        context_lens: torch.Tensor, sinks: torch.Tensor, window: int | None, scale: float,
    ) -> torch.Tensor:
        """Every sequence of the step in one call: q [T, Hq, D] (sequence b: rows query_starts[b] … + query_lens[b])
        against caches [blocks, block_size, Hkv, D] through the `PagedGroup` tables → [T, Hq, D]."""
        ...


def paged_kernel(device: torch.device, precision: str) -> PagedKernel | None:
    """The CPU's fused paged-attention kernel for this device and precision; None → the reference path
    (or, on CUDA, the Triton launch that `kernels.gpu.triton_available` selects). Exact always takes the reference."""
    if precision != "fast":
        return None
    if device.type == "cpu":
        from ossrun.model.kernels.attention_cpu import attention_kernel_available, paged_attention_cpu

        return paged_attention_cpu if attention_kernel_available(device) else None
    return None


@dataclass(slots=True)
class PagedGroup:
    """Where one layer type (full or sliding) keeps and finds keys this step.

    `slot_mapping` [T]: the cache slot each new token's k/v is written to.
    `block_tables` [B, N]: per sequence, the physical blocks to read, covering logical blocks
    `first_block[b]` … `first_block[b] + N − 1` (padding points at the null block 0, masked out).
    `context_lens` [B]: tokens of the sequence that exist after this step's writes.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    first_block: torch.Tensor
    context_lens: torch.Tensor


@dataclass(slots=True)
class PagedAttention:
    """Attention over a paged KV cache: one (k, v) pool per layer, `[blocks, block_size, Hkv, D]`.

    With a `kernel` (CPU, fast precision: `kernels.attention_cpu`), one call per layer covers every
    sequence. With `triton` (CUDA, fast precision: see `kernels.gpu`), one Triton launch computes all
    the decodes and one all the prefill chunks. Both read keys in place through the block tables.
    Otherwise (the reference): sequences whose step is one token (decodes) run as one padded batch;
    longer query runs (prefill chunks) run one sequence at a time, so no query is padded to another's length.
    """

    caches: list[tuple[torch.Tensor, torch.Tensor]]
    block_size: int
    groups: dict[str, PagedGroup] = field(default_factory=dict)  # "full" / "sliding"
    query_starts: list[int] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    positions: torch.Tensor | None = None
    triton: bool = False
    kernel: PagedKernel | None = None
    # Filled by `prepare`: the runs as tensors (kernel), or which sequences decode together (reference).
    _starts: torch.Tensor | None = None
    _lens: torch.Tensor | None = None
    _decode_rows: torch.Tensor | None = None
    _decode_tokens: torch.Tensor | None = None
    _prefill_rows: list[int] = field(default_factory=list)
    _launch: object | None = None  # kernels.gpu.PagedLaunch when `triton`

    def prepare(self) -> None:
        """Once per step: the CPU kernel's run tensors, or the split into batched decodes and one-by-one prefills
        (the reference's, which the Triton launch also takes; `triton` wins over `kernel`)."""
        if self.kernel is not None and not self.triton:
            self._starts = torch.tensor(self.query_starts, dtype=torch.long, device=self.positions.device)
            self._lens = torch.tensor(self.query_lens, dtype=torch.long, device=self.positions.device)
            return
        decode = [b for b, n in enumerate(self.query_lens) if n == 1]
        device = self.positions.device
        self._decode_rows = torch.tensor(decode, dtype=torch.long, device=device)
        self._decode_tokens = torch.tensor([self.query_starts[b] for b in decode], dtype=torch.long, device=device)
        self._prefill_rows = [b for b, n in enumerate(self.query_lens) if n > 1]
        if self.triton:
            from ossrun.model.kernels.gpu import PagedLaunch

            self._launch = PagedLaunch.build(self.query_starts, self.query_lens, self._prefill_rows, self.positions)

    def __call__(self, layer, q, k, v, sinks, window, scale):
        group = self.groups["sliding" if window else "full"]
        k_cache, v_cache = self.caches[layer]
        n_kv, dim = k.shape[1], k.shape[2]
        k_cache.view(-1, n_kv, dim)[group.slot_mapping] = k.to(k_cache.dtype)
        v_cache.view(-1, n_kv, dim)[group.slot_mapping] = v.to(v_cache.dtype)
        if self._launch is not None:
            return self._launch(group, q, k_cache, v_cache, sinks, window, scale)
        if self.kernel is not None:
            return self.kernel(q, k_cache, v_cache, self._starts, self._lens, self.positions, group.block_tables,
                               group.first_block, group.context_lens, sinks, window, scale)
        out = torch.empty_like(q)
        if len(self._decode_rows):
            rows, tokens = self._decode_rows, self._decode_tokens
            out[tokens] = self._attend(group, rows, q[tokens].unsqueeze(1), self.positions[tokens].unsqueeze(1), k_cache, v_cache, sinks, window, scale, q.dtype).squeeze(1)
        for b in self._prefill_rows:
            start, n = self.query_starts[b], self.query_lens[b]
            rows = torch.tensor([b], device=q.device)
            out[start:start + n] = self._attend(group, rows, q[start:start + n].unsqueeze(0), self.positions[start:start + n].unsqueeze(0), k_cache, v_cache, sinks, window, scale, q.dtype)[0]
        return out

    def attend_qkv(self, layer: int, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], n_heads: int,
                   sinks: torch.Tensor, window: int | None, scale: float) -> torch.Tensor:
        """The Triton path from the qkv projection [T, (Hq + 2 Hkv)·D]: one kernel applies RoPE (rope = cos, sin)
        and writes k/v into the cache, then the attention launches → [T, Hq, D]."""
        from ossrun.model.kernels.triton_fused import rope_and_cache

        group = self.groups["sliding" if window else "full"]
        k_cache, v_cache = self.caches[layer]
        q = rope_and_cache(qkv, *rope, group.slot_mapping, k_cache, v_cache, n_heads)
        return self._launch(group, q, k_cache, v_cache, sinks, window, scale)

    def _attend(self, group, rows, q, q_pos, k_cache, v_cache, sinks, window, scale, dtype):
        """q [B, T, Hq, D] at positions q_pos [B, T] against the cached keys of sequences `rows`."""
        tables = group.block_tables[rows]  # [B, N]
        batch, n_blocks = tables.shape
        keys = k_cache[tables].reshape(batch, n_blocks * self.block_size, *k_cache.shape[2:]).to(dtype)
        values = v_cache[tables].reshape(batch, n_blocks * self.block_size, *v_cache.shape[2:]).to(dtype)
        offsets = torch.arange(n_blocks * self.block_size, device=q.device)
        key_pos = group.first_block[rows].unsqueeze(-1) * self.block_size + offsets  # [B, S]
        allowed = visibility(q_pos, key_pos, window)  # [B, T, S]
        allowed &= (key_pos < group.context_lens[rows].unsqueeze(-1)).unsqueeze(1)
        return attention_with_sinks(q, keys, values, sinks, allowed, scale)
