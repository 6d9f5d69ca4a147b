"""Decode steps as CUDA graph replays: the whole forward of a pure-decode step is one launch.

A decode step of B sequences runs hundreds of small kernels (24 layers of norms, projections,
routing, the two kernels of each MoE and attention); launched one by one from Python they cost
more than the arithmetic at small B. One graph per padded batch size is captured when the engine
starts, over static input buffers whose block tables are as wide as the longest context needs;
a step writes its inputs into a pinned host twin of those buffers, copies it over in one transfer and replays. Padding rows read token 0 at position 0 with an empty context and
write their k/v into the null block, which every table masks out, so they change nothing.

Only steps where every sequence decodes one token, without LoRA, take this path (prefill chunks
have data-dependent shapes); the runner falls back to the eager forward otherwise.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ossrun.model.attention import PagedAttention, PagedGroup
from ossrun.model.gpt_oss import GptOss

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256)
GROUPS = ("full", "sliding")


class HostGroup(NamedTuple):
    """A layer type's slots and block tables for a step, still in host int64 arrays (see `PagedGroup`)."""

    slots: array
    tables: array  # [B × width], row-major
    firsts: array
    context: array
    width: int


@dataclass(slots=True)
class _Graph:
    replay: Callable[[], None]  # a CUDA graph's replay; on the CPU (tests) the same forward, launched eagerly
    inputs: torch.Tensor  # every static input, flat int64 on the device: the views below are slices of it
    host: torch.Tensor  # its host twin (pinned on CUDA): a step fills it and copies it over in one transfer
    host_views: tuple  # (token_ids, positions, {name: PagedGroup}) over `host`
    copied: torch.cuda.Event | None  # the last transfer out of `host`: wait for it before writing `host` again
    logits: torch.Tensor  # [Bp, V], written by each replay
    attention: PagedAttention  # holds the launch tensors the graph reads: must live as long as the graph


def _views(flat: torch.Tensor, batch: int, widths: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor, dict[str, PagedGroup]]:
    """token_ids [Bp], positions [Bp] and per group slots, tables [Bp, W], first blocks, context lengths: slices of `flat`."""
    parts = iter(flat.split([batch, batch] + [n for name in GROUPS for n in (batch, batch * widths[name], batch, batch)]))
    token_ids, positions = next(parts), next(parts)
    groups = {}
    for name in GROUPS:
        slots, tables, firsts, context = next(parts), next(parts), next(parts), next(parts)
        groups[name] = PagedGroup(slots, tables.view(batch, widths[name]), firsts, context)
    return token_ids, positions, groups


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

    def fits(self, batch: int, widths: dict[str, int]) -> bool:
        """Whether a decode step of `batch` sequences with these table widths fits the captured graphs."""
        return batch <= self.sizes[-1] and all(widths[name] <= width for name, width in self.widths.items())

    def forward(self, token_ids: list[int], positions: list[int], groups: dict[str, HostGroup]) -> torch.Tensor:
        """One decode step of B sequences (B ≤ the largest size) → logits [B, V] (a view of the graph's output).

        The inputs are written into the graph's pinned host buffer, padding rows zero (token 0, position 0,
        null slot, empty context), and copied to the device in one transfer: one copy instead of ~30 small
        copies and fills a step (bench/GPU_NOTES.md: the engine's host work was ~0.4 ms of a 2.9 ms step)."""
        batch = len(token_ids)
        padded = next(b for b in self.sizes if b >= batch)
        if padded not in self.graphs:
            self.graphs[padded] = self._capture(padded)
        g = self.graphs[padded]
        if g.copied is not None:
            g.copied.synchronize()
        g.host.zero_()
        tokens, pos, views = g.host_views
        tokens[:batch] = torch.tensor(token_ids, dtype=torch.long)
        pos[:batch] = torch.tensor(positions, dtype=torch.long)
        for name, host in groups.items():
            view = views[name]
            view.slot_mapping[:batch] = torch.frombuffer(host.slots, dtype=torch.int64)
            view.first_block[:batch] = torch.frombuffer(host.firsts, dtype=torch.int64)
            view.context_lens[:batch] = torch.frombuffer(host.context, dtype=torch.int64)
            view.block_tables[:batch, :host.width] = torch.frombuffer(host.tables, dtype=torch.int64).view(batch, host.width)
        g.inputs.copy_(g.host, non_blocking=True)
        if g.copied is not None:
            g.copied.record()
        g.replay()
        return g.logits[:batch]

    def _capture(self, batch: int) -> _Graph:
        device = self.model.device
        size = 2 * batch + sum(batch * (3 + width) for width in self.widths.values())
        inputs = torch.zeros(size, dtype=torch.long, device=device)
        host = torch.zeros(size, dtype=torch.long, pin_memory=device.type == "cuda")
        token_ids, positions, groups = _views(inputs, batch, self.widths)
        host_views = _views(host, batch, self.widths)
        attention = PagedAttention(self.caches, self.block_size, groups, list(range(batch)), [1] * batch, positions, triton=True)
        attention.prepare()
        if device.type != "cuda":  # what a replay computes, without a graph: lets CPU tests check the padding
            logits = torch.empty(batch, self.model.config.vocab_size, device=device)
            return _Graph(lambda: logits.copy_(self.model(token_ids, positions, attention)), inputs, host, host_views, None, logits,
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
        return _Graph(graph.replay, inputs, host, host_views, torch.cuda.Event(), logits, attention)
