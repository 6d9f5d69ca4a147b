"""Decode steps as CUDA graph replays: the whole forward of a pure-decode step is one launch.

A decode step of B sequences runs hundreds of small kernels (24 layers of norms, projections,
routing, the two kernels of each MoE and attention); launched one by one from Python they cost
more than the arithmetic at small B. One graph per padded batch size is captured when the engine
starts, over static input buffers whose block tables are as wide as the longest context needs;
a step copies its inputs into them and replays. Padding rows read token 0 at position 0 with an empty context and
write their k/v into the null block, which every table masks out, so they change nothing.

Only steps where every sequence decodes one token, without LoRA, take this path (prefill chunks
have data-dependent shapes); the runner falls back to the eager forward otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ossrun.model.attention import PagedAttention, PagedGroup
from ossrun.model.gpt_oss import GptOss

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256)


@dataclass(slots=True)
class _Graph:
    replay: Callable[[], None]  # a CUDA graph's replay; on the CPU (tests) the same forward, launched eagerly
    token_ids: torch.Tensor  # [Bp]
    positions: torch.Tensor  # [Bp]
    groups: dict[str, PagedGroup]  # static slot mappings, tables, first blocks, context lengths
    logits: torch.Tensor  # [Bp, V], written by each replay
    attention: PagedAttention  # holds the launch tensors the graph reads: must live as long as the graph


class DecodeGraphs:
    def __init__(self, model: GptOss, caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int, max_batch: int,
                 max_model_len: int):
        self.model = model
        self.caches = caches
        self.block_size = block_size
        self.sizes = sorted({b for b in BATCH_SIZES if b < max_batch} | {max_batch})
        # Table widths: a decode sees at most the whole context (full layers), or the window plus the
        # block being filled and one partly outside it (sliding layers).
        self.widths = {"full": -(-max_model_len // block_size), "sliding": model.config.sliding_window // block_size + 2}
        self.graphs: dict[int, _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle() if model.device.type == "cuda" else None

    def capture_all(self) -> None:
        """Capture every batch size now (at engine start), so no step pays for a capture."""
        for size in self.sizes:
            if size not in self.graphs:
                self.graphs[size] = self._capture(size)

    def fits(self, batch: int, groups: dict[str, PagedGroup]) -> bool:
        return batch <= self.sizes[-1] and all(groups[name].block_tables.shape[1] <= width for name, width in self.widths.items())

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, groups: dict[str, PagedGroup]) -> torch.Tensor:
        """One decode step of B sequences (B ≤ the largest size) → logits [B, V] (a view of the graph's output)."""
        batch = token_ids.shape[0]
        padded = next(b for b in self.sizes if b >= batch)
        if padded not in self.graphs:
            self.graphs[padded] = self._capture(padded)
        g = self.graphs[padded]
        _fill(g.token_ids, token_ids)
        _fill(g.positions, positions)
        for name, group in groups.items():
            static = g.groups[name]
            _fill(static.slot_mapping, group.slot_mapping)
            _fill(static.first_block, group.first_block)
            _fill(static.context_lens, group.context_lens)
            static.block_tables.zero_()
            static.block_tables[:batch, :group.block_tables.shape[1]].copy_(group.block_tables)
        g.replay()
        return g.logits[:batch]

    def _capture(self, batch: int) -> _Graph:
        device = self.model.device
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.long, device=device)  # noqa: E731
        groups = {name: PagedGroup(zeros(batch), zeros(batch, width), zeros(batch), zeros(batch)) for name, width in self.widths.items()}
        token_ids, positions = zeros(batch), zeros(batch)
        attention = PagedAttention(self.caches, self.block_size, groups, list(range(batch)), [1] * batch, positions, triton=True)
        attention.prepare()
        if device.type != "cuda":  # what a replay computes, without a graph: lets CPU tests check the padding
            logits = torch.empty(batch, self.model.config.vocab_size, device=device)
            return _Graph(lambda: logits.copy_(self.model(token_ids, positions, attention)), token_ids, positions, groups, logits,
                          attention)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up off the capture: Triton compiles, allocators settle
            for _ in range(2):
                self.model(token_ids, positions, attention)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.model(token_ids, positions, attention)
        return _Graph(graph.replay, token_ids, positions, groups, logits, attention)


def _fill(static: torch.Tensor, values: torch.Tensor) -> None:
    """The first rows from `values`, the padding rows zero (token 0, position 0, null slot, empty context)."""
    n = values.shape[0]
    static[:n].copy_(values)
    static[n:].zero_()
