"""Turns a scheduled step into tensors, runs the model over the paged cache, and samples.

The only engine file that touches tensors: it owns the KV cache memory (one k/v pool per layer,
sliding layers drawing on the smaller sliding pool) and builds each step's flat batch.
"""

from __future__ import annotations

import logging
import math
import mmap
from array import array

import torch

from ossrun.engine.cuda_graphs import DecodeGraphs, HostGroup
from ossrun.engine.kv_cache import NULL_BLOCK, KVCacheManager
from ossrun.engine.lora import AdapterRegistry
from ossrun.engine.sampler import Sampler, SamplerOutput
from ossrun.engine.scheduler import Scheduled
from ossrun.model.attention import PagedAttention, PagedGroup, paged_kernel
from ossrun.model.gpt_oss import GptOss
from ossrun.model.kernels.gpu import triton_available
from ossrun.model.lora import LoraBatch

log = logging.getLogger(__name__)

NON_FINITE = "the model's logits are all NaN or infinite (broken weights?)"


def cache_pool(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A layer's k or v pool, zeros. On the CPU it lies in an anonymous mapping, whose pages the OS hands out zeroed when
    they are first written: the memory a server holds grows with the blocks its sequences have used, up to the plan
    (`--kv-cache-gib`), instead of the whole plan at start (torch.zeros writes every page: a demo server on a tiny
    model held 2.8 GB from its first second)."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)  # the tensor keeps the mapping alive


class ModelRunner:
    def __init__(self, model: GptOss, kv: KVCacheManager, kv_dtype: torch.dtype, sampler: Sampler, adapters: AdapterRegistry,
                 cuda_graphs: bool = True, max_batch: int = 256, max_model_len: int = 4096):
        self.model = model
        self.kv = kv
        self.sampler = sampler
        self.adapters = adapters
        self.device = model.device
        self.reported_non_finite = False
        self.triton_attention = triton_available(model.device, model.precision)
        self.attention_kernel = paged_kernel(model.device, model.precision)
        c = model.config
        shape = (kv.block_size, c.num_key_value_heads, c.head_dim)
        self.caches = []
        for layer in range(c.num_hidden_layers):
            blocks = kv.sliding.num_blocks if c.is_sliding(layer) else kv.full.num_blocks
            self.caches.append(
                (cache_pool((blocks, *shape), kv_dtype, self.device), cache_pool((blocks, *shape), kv_dtype, self.device))
            )
        self.graphs: DecodeGraphs | None = None
        if self.triton_attention and cuda_graphs:
            self.graphs = DecodeGraphs(model, self.caches, kv.block_size, max_batch, max_model_len)
            self.graphs.capture_all()

    @torch.inference_mode()
    def run(self, scheduled: list[Scheduled]) -> tuple[list[Scheduled], SamplerOutput | None]:
        """Compute the step; → the sequences that sampled a token, and the sampler's output for them."""
        token_ids, positions, starts, lens = [], [], [], []
        for item in scheduled:
            seq, begin = item.seq, item.seq.num_computed
            starts.append(len(token_ids))
            lens.append(item.num_new_tokens)
            token_ids.extend(seq.tokens[begin:begin + item.num_new_tokens])
            positions.extend(range(begin, begin + item.num_new_tokens))
        device = self.device
        lora = self._lora(scheduled, starts, lens)
        sampling = [item for item in scheduled if item.samples]
        logits = self._graph_forward(scheduled, token_ids, positions, lens, lora, sampling)
        if logits is None:
            positions_t = torch.tensor(positions, dtype=torch.long, device=device)
            tokens_t = torch.tensor(token_ids, dtype=torch.long, device=device)
            groups = {"full": self._group(scheduled, sliding=False), "sliding": self._group(scheduled, sliding=True)}
            attention = PagedAttention(caches=self.caches, block_size=self.kv.block_size, groups=groups, query_starts=starts,
                                       query_lens=lens, positions=positions_t, triton=self.triton_attention,
                                       kernel=self.attention_kernel)
            attention.prepare()
            if not sampling:
                self.model(tokens_t, positions_t, attention, torch.empty(0, dtype=torch.long, device=device), lora)
                return [], None
            last = [starts[i] + lens[i] - 1 for i, item in enumerate(scheduled) if item.samples]
            logits = self.model(tokens_t, positions_t, attention, torch.tensor(last, device=device), lora)
        self._refuse_non_finite(logits, sampling)
        masks = [self._mask(item) for item in sampling]
        # Rows whose constraint checks the sampled token keep their logits, to sample again if it is refused.
        kept = {i: logits[i].clone() for i, item in enumerate(sampling) if masks[i] is not None and self._guarding(item)}
        output = self._sample(logits, sampling, masks if any(m is not None for m in masks) else None)
        for i, row in kept.items():
            self._keep_budget(sampling[i], row, output, i)
        return sampling, output

    def _refuse_non_finite(self, logits: torch.Tensor, sampling: list[Scheduled]) -> None:
        """A row with no finite logit (NaN weights, an overflow) would be sampled as noise, or as token 0 by greedy
        argmax: its request ends with an error instead, logged once. One reduction over the batch; the row is zeroed
        so that sampling it does not fail and overwrite the error."""
        finite = torch.isfinite(logits).any(-1)
        if bool(finite.all()):
            return
        for i in (~finite).nonzero().flatten().tolist():
            sampling[i].seq.error = NON_FINITE
            logits[i] = 0
        if not self.reported_non_finite:
            self.reported_non_finite = True
            log.error("%s: the requests they came for end with an error (logged once)", NON_FINITE)

    @staticmethod
    def _guarding(item: Scheduled) -> bool:
        return item.seq.error is None and getattr(item.seq.request.constraint, "guarding", False)

    def _keep_budget(self, item: Scheduled, logits: torch.Tensor, output: SamplerOutput, i: int) -> None:
        """Near the end of max_tokens the constraint may refuse the sampled token (no complete answer would fit
        after it): the row is sampled again from its logits under the mask it gives, and that token (with its
        logprobs) replaces the first in `output`. `logits`: the row before sampling [V]."""
        if item.seq.error is not None:  # its sampling failed
            return

        def resample(allowed: torch.Tensor) -> int:
            row = self.sampler(logits.unsqueeze(0).clone(), [item.seq.sampling], [allowed])
            output.token_ids[i], output.logprobs[i], output.top_logprobs[i] = row.token_ids[0], row.logprobs[0], row.top_logprobs[0]
            return row.token_ids[0]

        try:
            item.seq.request.constraint.choose(output.token_ids[i], resample)
        except Exception as exc:  # a broken grammar must not take the batch down with it
            item.seq.error = f"structured output failed: {exc}"

    def _sample(self, logits: torch.Tensor, sampling: list[Scheduled], masks: list[torch.Tensor | None] | None) -> SamplerOutput:
        """One sampler call for the batch. If it fails, each row again alone (from a copy: the sampler consumes
        its logits), so only a request whose own sampling fails ends, with an error; the others keep their tokens."""
        states = [item.seq.sampling for item in sampling]
        spare = logits.clone() if len(states) > 1 else None
        try:
            return self.sampler(logits, states, masks)
        except Exception as exc:
            if spare is None:
                return self._failed(sampling[0], exc)
        rows = []
        for i, item in enumerate(sampling):
            try:
                rows.append(self.sampler(spare[i:i + 1], [states[i]], None if masks is None else [masks[i]]))
            except Exception as exc:
                rows.append(self._failed(item, exc))
        return SamplerOutput([r.token_ids[0] for r in rows], [r.logprobs[0] for r in rows], [r.top_logprobs[0] for r in rows])

    @staticmethod
    def _failed(item: Scheduled, exc: Exception) -> SamplerOutput:
        """Mark the request failed (the engine ends it with this error) → a placeholder row nobody reads."""
        item.seq.error = f"sampling failed: {exc}"
        return SamplerOutput([0], [None], [()])

    def _graph_forward(self, scheduled: list[Scheduled], token_ids: list[int], positions: list[int], lens: list[int],
                       lora: LoraBatch | None, sampling: list[Scheduled]) -> torch.Tensor | None:
        """Logits of a step replayed from a CUDA graph: every sequence decodes one token and samples, no LoRA, tables
        within the captured widths. Its inputs go over in one host→device copy. None: the step runs eagerly."""
        if self.graphs is None or lora is not None or len(sampling) != len(scheduled) or any(n != 1 for n in lens):
            return None
        groups = {"full": self._group_arrays(scheduled, sliding=False), "sliding": self._group_arrays(scheduled, sliding=True)}
        if not self.graphs.fits(len(lens), {name: group.width for name, group in groups.items()}):
            return None
        return self.graphs.forward(token_ids, positions, groups)

    def _lora(self, scheduled: list[Scheduled], starts: list[int], lens: list[int]) -> LoraBatch | None:
        """Group the step's rows by adapter; None when every row runs on the base model."""
        rows: dict[str, list[int]] = {}
        for item, start, n in zip(scheduled, starts, lens):
            if item.seq.adapter is not None:
                rows.setdefault(item.seq.adapter, []).extend(range(start, start + n))
        if not rows:
            return None
        adapters = self.adapters.get_many(set(rows))
        return LoraBatch([(torch.tensor(r, dtype=torch.long, device=self.device), adapters[key]) for key, r in rows.items()])

    def _mask(self, item: Scheduled) -> torch.Tensor | None:
        """The constraint's mask for the sampler (`Constraint.mask`); a mask that allows nothing fails that request alone."""
        constraint = item.seq.request.constraint
        if constraint is None or item.seq.error is not None:
            return None
        try:
            mask = constraint.mask()
        except Exception as exc:  # a broken grammar must not take the batch down with it
            item.seq.error = f"structured output failed: {exc}"
            return None
        # Forbidden ids (int64) always leave some token; 40x cheaper than .any() on CPU.
        if mask is not None and mask.dtype == torch.bool and not bool(mask.view(torch.uint8).max()):
            item.seq.error = "structured output: the constraint allows no token"
            return None
        return mask

    def _group(self, scheduled: list[Scheduled], sliding: bool) -> PagedGroup:
        """The step's slots and block tables for one layer type, as tensors on the model's device."""
        host = self._group_arrays(scheduled, sliding)
        return PagedGroup(
            slot_mapping=self._tensor(host.slots),
            block_tables=self._tensor(host.tables).view(len(host.firsts), host.width),
            first_block=self._tensor(host.firsts),
            context_lens=self._tensor(host.context),
        )

    def _group_arrays(self, scheduled: list[Scheduled], sliding: bool) -> HostGroup:
        """The step's slots and block tables for one layer type, built in flat int64 arrays.

        A 32k-token sequence has a 2k-entry table: stdlib `array` and `torch.frombuffer` turn it into
        a tensor ~8× faster than `torch.tensor` on lists, which matters with many long sequences.
        """
        bs = self.kv.block_size
        slots, firsts, context, spans = array("q"), array("q"), array("q"), []
        for item in scheduled:
            seq = item.seq
            table = seq.blocks.sliding if sliding else seq.blocks.full
            begin, end = seq.num_computed, seq.num_computed + item.num_new_tokens
            slots.extend(table[p // bs] * bs + p % bs for p in range(begin, end))
            first = max(0, begin - self.kv.window + 1) // bs if sliding else 0
            spans.append((table, first, (end - 1) // bs + 1))
            firsts.append(first)
            context.append(end)
        width = max(stop - first for _, first, stop in spans)
        tables = array("q")
        for table, first, stop in spans:
            tables.extend(table[first:stop])
            tables.extend(array("q", [NULL_BLOCK]) * (width - (stop - first)))
        return HostGroup(slots, tables, firsts, context, width)

    def _tensor(self, values: array) -> torch.Tensor:
        """int64 array → tensor on the model's device (frombuffer shares the array's memory: no copy on the CPU)."""
        if not values:
            return torch.empty(0, dtype=torch.long, device=self.device)
        return torch.frombuffer(values, dtype=torch.int64).to(self.device)
