"""Which sequences run this step, and how many of their tokens.

There are no prefill and decode phases: every sequence has tokens still to compute (a whole
prompt, the rest of a chunked prompt, or the one token sampled last step), and each step hands
out a token budget, running sequences first, then waiting ones by priority. Chunked prefill
falls out of the budget; when the KV pools run dry the least urgent running sequence is
preempted (its blocks freed, recomputed later; the prefix cache usually gives most back).

A long prompt must not hold the whole budget while it is prefilled (a 200 KB prompt is hundreds of
steps): decoding sequences go first, each prefill chunk gets at most `max_prefill_chunk` tokens,
and new requests are admitted from what is left. A prefill alone in its step still gets the whole
budget; next to others it stays capped, so their steps (and tokens) keep coming.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from ossrun.engine.kv_cache import KVCacheManager
from ossrun.engine.request import Priority
from ossrun.engine.sequence import Sequence, Status


@dataclass(slots=True)
class Scheduled:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this step computes the sequence's last pending token (so it yields logits)."""
        return self.seq.num_computed + self.num_new_tokens == len(self.seq.tokens)


@dataclass(slots=True)
class Step:
    scheduled: list[Scheduled] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # Sequences the whole cache cannot hold even alone: taken out, for the engine to end with an error. The
    # engine's context limit keeps them out; this is the guard that no step ever spins on one again.
    unfit: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int = 64, max_tokens_per_step: int = 512, batch_max_wait_steps: int = 256,
                 max_prefill_chunk: int | None = None):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_tokens_per_step = max_tokens_per_step
        # one prefill chunk's share of a step before the others had theirs (default: half the budget)
        self.max_prefill_chunk = max_prefill_chunk or max(1, max_tokens_per_step // 2)
        self.batch_max_wait_steps = batch_max_wait_steps  # aging: batch work is never starved forever
        self.waiting: list[Sequence] = []  # kept sorted by sort_key
        self.running: list[Sequence] = []
        self.steps = 0
        self._waiting_since: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self._waiting_since.setdefault(id(seq), self.steps)
        bisect.insort(self.waiting, seq, key=self._key)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted) and give its blocks back."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._waiting_since.pop(id(seq), None)
        self.kv.free(seq.blocks)
        seq.status = Status.FINISHED

    def _key(self, seq: Sequence) -> tuple[int, int]:
        priority, arrival = seq.sort_key
        waited = self.steps - self._waiting_since.get(id(seq), self.steps)
        if priority > Priority.INTERACTIVE and waited > self.batch_max_wait_steps:
            priority = int(Priority.INTERACTIVE)  # aged: competes as interactive
        return priority, arrival

    def schedule(self) -> Step:
        self.steps += 1
        step = Step()
        budget = self.max_tokens_per_step
        self.running.sort(key=lambda s: (s.num_to_compute > 1, s.sort_key))  # decodes before prefills
        queue = list(self.running)
        while queue and budget > 0:
            seq = queue.pop(0)
            n = min(seq.num_to_compute, budget, self.max_prefill_chunk)
            if not self.kv.fits_alone(len(seq.tokens)):  # grew past what the whole cache holds
                self._unfit(seq, step)
                continue
            while not self.kv.allocate(seq.blocks, seq.num_computed + n):
                victim = queue.pop() if queue else seq
                self._preempt(victim, step)
                if victim is seq:
                    break
            else:
                step.scheduled.append(Scheduled(seq, n))
                budget -= n
        if not step.preempted:
            budget = self._admit(step, budget)
            if len(step.scheduled) == 1:
                self._top_up(step, budget)
        return step

    def _top_up(self, step: Step, budget: int) -> None:
        """A prefill alone in its step gets the rest of the budget (never preempts). With others in the
        step it stays capped: a step's time grows with its prefill tokens, and theirs is waiting on it."""
        for item in step.scheduled:
            if budget <= 0:
                return
            extra = min(item.seq.num_to_compute - item.num_new_tokens, budget)
            if extra > 0 and self.kv.allocate(item.seq.blocks, item.seq.num_computed + item.num_new_tokens + extra):
                item.num_new_tokens += extra
                budget -= extra

    def _admit(self, step: Step, budget: int) -> int:
        self.waiting.sort(key=self._key)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.kv.fits_alone(len(seq.tokens)):  # never admitted, and never blocking those behind it
                self.waiting.pop(0)
                self._unfit(seq, step)
                continue
            if not seq.blocks.full:
                cached = self.kv.match_prefix(seq.blocks, seq.tokens, seq.adapter)
                seq.num_computed = cached
                if not seq.admitted_once:
                    seq.num_cached_tokens = cached
            n = min(seq.num_to_compute, budget, self.max_prefill_chunk)
            if not self.kv.allocate(seq.blocks, seq.num_computed + n):
                self.kv.free(seq.blocks)  # don't sit on cached blocks while waiting
                seq.num_computed = 0
                break
            self.waiting.pop(0)
            self._waiting_since.pop(id(seq), None)
            seq.status = Status.RUNNING
            seq.admitted_once = True
            self.running.append(seq)
            step.scheduled.append(Scheduled(seq, n))
            budget -= n
        return budget

    def _unfit(self, seq: Sequence, step: Step) -> None:
        if seq in self.running:
            self.running.remove(seq)
        self._waiting_since.pop(id(seq), None)
        self.kv.free(seq.blocks)
        step.unfit.append(seq)

    def _preempt(self, seq: Sequence, step: Step) -> None:
        self.running.remove(seq)
        self.kv.free(seq.blocks)
        seq.num_computed = 0
        step.preempted.append(seq)
        self.add(seq)
