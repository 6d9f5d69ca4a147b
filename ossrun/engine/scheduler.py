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

Batch-queue work (`Priority.BATCH`) soaks up what interactive work leaves. While both are present, a step
holds the interactive sequences first, then at most as many batch rows (taking turns) and as many tokens: an
interactive request's step costs at most about twice its own, whatever the batch holds (16 structured-output
items, each with its grammar work, once made a `Hello` 200-500× slower). An interactive request never waits
for a slot that batch rows hold: the last batch row is preempted. Alone, the batch runs at full speed.

Within a priority class the engine is shared fairly in two levels: first between clients (`Sequence.client`: who
sent the request, as the API names its callers), then between one client's requests (`Sequence.group`: the prompts ×
`n` choices of one HTTP request). Waiting rows are admitted round-robin across clients, and within a client across its
groups (the client, then the group, with the fewest rows running first); running rows take the step's tokens in the
same turns; and when every slot is held, the group most over its due share (`_slot_targets`: `max_num_seqs` shared
max-min fairly between clients by the rows each has, then each client's part between its groups) gives up its
youngest rows for a waiting group's. One request of 256 choices once held every slot and a `Hi` sent after it waited
for all of them (100 s); one client's 250 streams once kept another client's `Hi` waiting 411 s, since each request
was a group of its own and the newcomer's one group came after the flood's 190 waiting ones. A lone group still gets
every slot, and a client alone shares them all between its requests.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ossrun.engine.kv_cache import KVCacheManager
from ossrun.engine.request import Priority
from ossrun.engine.sequence import Sequence, Status


# Tokens of a batch row's prefill chunk in a step with interactive work (one KV block): the batch's prompts go on
# beside it without making its steps long.
BATCH_CHUNK_BESIDE_INTERACTIVE = 16


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
        self.preemptions = 0  # since start: operators size the KV cache by it (`ossrun_preemptions_total`)
        self._waiting_since: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def requests(self) -> tuple[int, int]:
        """(running, waiting) client requests, where `running` and `waiting` hold their sequences (`n` choices of a
        prompt list each): operators count requests, so one whose choices are partly running is running, not also
        queued. Read from the server's loop while the engine thread steps: copied first, and counted from the copies."""
        running = {seq.group for seq in list(self.running)}
        waiting = {seq.group for seq in list(self.waiting)}
        return len(running), len(waiting - running)

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
        # A decoding row whose grammar searches a complete answer (up to seconds: a budget search) would hold up the
        # whole step: it sits steps out while anything else can run, and runs (the step waiting for it) when nothing can.
        held = [seq for seq in self.running if seq.num_to_compute == 1 and seq.grammar_searching]
        everyone = (*self.running, *self.waiting)
        if all(self._interactive(seq) for seq in everyone) or not any(self._interactive(seq) for seq in everyone):
            self._share_slots(step, lambda seq: True)
            shared = len(step.preempted)
            budget = self._run_then_admit(step, [seq for seq in self.running if seq not in held], [], lambda seq: True)
            if len(step.preempted) == shared and len(step.scheduled) == 1:  # the KV pools did not run dry
                self._top_up(step, budget)
        else:
            self._schedule_beside_interactive(step, held)
        if not step.scheduled and not step.preempted:
            self._schedule_running(step, [seq for seq in held if seq.status is Status.RUNNING], [], self.max_tokens_per_step)
        return step

    def _schedule_beside_interactive(self, step: Step, held: list[Sequence]) -> Step:
        """Interactive work first (running, then admitted); then batch rows share the step, at most as many as
        the interactive rows and as many tokens (or BATCH_CHUNK_BESIDE_INTERACTIVE), taking turns: the one that
        ran longest ago first. So an interactive request pays for a bounded share of the batch each token, not
        for all of its rows (their grammar work, their prefill chunks), and the batch still moves. `held`: rows
        that sit this step out (see `schedule`)."""
        idle = sorted((seq for seq in self.running if not self._interactive(seq) and seq not in held), key=lambda s: s.sort_key)
        self._free_slots_for_interactive(step, idle)
        self._share_slots(step, self._interactive)
        budget = self._run_then_admit(step, [seq for seq in self.running if self._interactive(seq) and seq not in held], idle,
                                      self._interactive)
        rows = len(step.scheduled)
        if rows == 0:  # none of it can run now: the batch goes on as if alone (and may free room for it)
            self._schedule_running(step, idle, [], budget)
            return step
        room = min(budget, max(BATCH_CHUNK_BESIDE_INTERACTIVE, step.num_tokens))
        # A row whose grammar mask is still being computed would hold the step up (a budget search takes up to
        # seconds, and the grammar threads may have a queue): it waits for a later step.
        turns = sorted((seq for seq in idle if not (seq.num_to_compute == 1 and seq.grammar_pending)),
                       key=lambda s: (s.last_scheduled_step, s.sort_key))[:rows]
        preempted = len(step.preempted)
        room = self._schedule_running(step, turns, [s for s in idle if s not in turns], room, BATCH_CHUNK_BESIDE_INTERACTIVE)
        if len(step.preempted) == preempted and len(step.scheduled) < 2 * rows:
            self._admit(step, room, [], most=2 * rows - len(step.scheduled), chunk=BATCH_CHUNK_BESIDE_INTERACTIVE)
        if len(step.scheduled) == 1 and not step.preempted:
            self._top_up(step, self.max_tokens_per_step - step.num_tokens)
        return step

    def _run_then_admit(self, step: Step, queue: list[Sequence], spare: list[Sequence], only: Callable[[Sequence], bool]) -> int:
        """The running sequences of `queue`, then waiting ones that `only` accepts (unless the KV pools ran dry), in
        one step's budget; `spare` (running, not in this step) is preempted first when the pools run dry, and loses
        those. Returns the budget left. While a group waits with no row running, one running prefill (the most
        urgent: a group's first row before any group's second) takes its chunk, then the newcomer is admitted, then
        the other running prefills share what is left: neither one request's many prompts nor several long prompts
        (each capped at half a step, two fill it) hold a step's every token while a new request waits (four 800-token
        prompts on a CPU once kept a `Hello` waiting 50 s for its first token)."""
        preempted = len(step.preempted)
        turn = self._turns(sorted(queue, key=lambda s: s.sort_key))
        running = {seq.group for seq in self.running}
        later = []
        if any(only(seq) and seq.group not in running for seq in self.waiting):
            later = sorted((s for s in queue if s.num_to_compute > 1), key=lambda s: (turn[id(s)], s.sort_key))[1:]
        budget = self._schedule_running(step, [s for s in queue if s not in later], later + spare, self.max_tokens_per_step)
        spare[:] = [s for s in spare if s.status is Status.RUNNING]
        if len(step.preempted) == preempted:  # the KV pools did not run dry
            budget = self._admit(step, budget, spare, only=only)
        later = [s for s in later if s.status is Status.RUNNING]
        return self._schedule_running(step, later, spare, budget) if later else budget

    def _schedule_running(self, step: Step, queue: list[Sequence], spare: list[Sequence], budget: int,
                          chunk: int | None = None) -> int:
        """Schedule the running sequences of `queue` (decodes first, then by priority) within `budget`, each at
        most `chunk` tokens; when the KV pools run dry, preempt from `spare` (running, not in this step) first,
        then the queue's least urgent. Returns the budget left."""
        turn = self._turns(sorted(queue, key=lambda s: s.sort_key))
        queue = sorted(queue, key=lambda s: (s.num_to_compute > 1, turn[id(s)], s.sort_key))
        chunk = min(chunk or self.max_prefill_chunk, self.max_prefill_chunk)
        while queue and budget > 0:
            seq = queue.pop(0)
            n = min(seq.num_to_compute, budget, chunk)
            if not self.kv.fits_alone(len(seq.tokens)):  # grew past what the whole cache holds
                self._unfit(seq, step)
                continue
            while not self.kv.allocate(seq.blocks, seq.num_computed + n):
                victim = spare.pop() if spare else queue.pop() if queue else seq
                self._preempt(victim, step)
                if victim is seq:
                    break
            else:
                self._put(step, seq, n)
                budget -= n
        return budget

    def _put(self, step: Step, seq: Sequence, n: int) -> None:
        step.scheduled.append(Scheduled(seq, n))
        seq.last_scheduled_step = self.steps

    @staticmethod
    def _interactive(seq: Sequence) -> bool:
        return seq.request.priority == Priority.INTERACTIVE

    def _free_slots_for_interactive(self, step: Step, idle: list[Sequence]) -> None:
        """Interactive requests waiting while every slot (`max_num_seqs`) is taken: batch rows are preempted, the
        last come first, one per waiting request (they are recomputed later, from the prefix cache mostly)."""
        waiting = sum(self._interactive(seq) for seq in self.waiting)
        for _ in range(min(waiting - (self.max_num_seqs - len(self.running)), len(idle))):
            self._preempt(idle.pop(), step)

    @staticmethod
    def _turns(ordered: list[Sequence], running: Iterable[Sequence] = ()) -> dict[int, int]:
        """{id(seq): its turn}, round-robin across clients and, within a client, across its groups: the k-th sequence
        of a group (in the given order) gets group turn k after the group's rows in `running`; a client's sequences,
        taken by group turn, then get turns after the client's rows in `running`. Sorting by turn interleaves the
        clients (one client's 250 requests do not all go before another's one) and a client's own requests (its 256
        choices do not all go before its later `Hi`). Where each client is one group, the two turns are the same."""
        running = list(running)
        in_group = _counted(ordered, lambda seq: seq.group, Counter(seq.group for seq in running))
        by_group_turn = sorted(ordered, key=lambda seq: in_group[id(seq)])  # stable: the given order within a turn
        return _counted(by_group_turn, lambda seq: seq.client, Counter(seq.client for seq in running))

    def _share_slots(self, step: Step, only: Callable[[Sequence], bool]) -> None:
        """Every slot held while a group (among the sequences `only` accepts) waits with fewer rows running than its
        fair share (`_slot_targets`: between clients first, then between a client's groups): the group most over its
        share gives up its youngest row (recomputed later, from the prefix cache mostly), until the waiting groups'
        due rows have room. So neither one client's many requests nor one request's many choices lock out the
        requests sent after them; a group alone keeps every slot."""
        waiting = Counter(seq.group for seq in self.waiting if only(seq))
        free = self.max_num_seqs - len(self.running)
        if sum(waiting.values()) <= free:
            return
        target = self._slot_targets([seq for seq in (*self.running, *self.waiting) if only(seq)])
        running = Counter(seq.group for seq in self.running if only(seq))
        due = sum(min(n, target[group] - running[group]) for group, n in waiting.items() if running[group] < target[group])
        for _ in range(due - free):
            hog = max(running, key=lambda group: running[group] - target[group], default=None)
            if hog is None or running[hog] <= target[hog]:  # none over its share (other classes' rows hold the slots)
                return
            self._preempt(max((seq for seq in self.running if seq.group == hog and only(seq)), key=lambda s: s.arrival), step)
            running[hog] -= 1

    def _slot_targets(self, rows: list[Sequence]) -> dict[str, int]:
        """{group: the slots it is due}: `max_num_seqs` shared max-min fairly (`fair_shares`) between the clients by
        how many rows each has (running or waiting), then each client's part between its groups the same way. A slot
        left over from an even split goes to the client (the group) running the most rows, then the oldest: the one
        already holding it. Given to another, it would be taken from a row that admission (fewest rows running first)
        hands it straight back to, step after step."""
        clients = Counter(seq.client for seq in rows if seq.status is Status.RUNNING)
        groups = Counter(seq.group for seq in rows if seq.status is Status.RUNNING)
        by_client: dict[str, Counter] = {}
        for seq in sorted(rows, key=lambda s: (-clients[s.client], -groups[s.group], s.arrival)):
            by_client.setdefault(seq.client, Counter())[seq.group] += 1
        parts = fair_shares({client: demand.total() for client, demand in by_client.items()}, self.max_num_seqs)
        return {group: n for client, demand in by_client.items() for group, n in fair_shares(demand, parts[client]).items()}

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

    def _admit(self, step: Step, budget: int, spare: list[Sequence], only: Callable[[Sequence], bool] = lambda seq: True,
               most: int | None = None, chunk: int | None = None) -> int:
        """Admit waiting sequences that `only` accepts, in `_admission_order`, at most
        `most` of them. An interactive one that does not fit the KV pools preempts from `spare` (batch rows not in
        this step), else it and those behind it wait."""
        chunk = min(chunk or self.max_prefill_chunk, self.max_prefill_chunk)
        for seq in self._admission_order(only):
            if budget <= 0 or len(self.running) >= self.max_num_seqs or (most is not None and most <= 0):
                break
            if not self.kv.fits_alone(len(seq.tokens)):  # never admitted, and never blocking those behind it
                self.waiting.remove(seq)
                self._unfit(seq, step)
                continue
            if not seq.blocks.full:
                cached = self.kv.match_prefix(seq.blocks, seq.tokens, seq.adapter)
                seq.num_computed = cached
                if not seq.admitted_once:
                    seq.num_cached_tokens = cached
            n = min(seq.num_to_compute, budget, chunk)
            while not self.kv.allocate(seq.blocks, seq.num_computed + n) and spare and self._interactive(seq):
                self._preempt(spare.pop(), step)
            if not self.kv.allocate(seq.blocks, seq.num_computed + n):
                self.kv.free(seq.blocks)  # don't sit on cached blocks while waiting
                seq.num_computed = 0
                break
            self.waiting.remove(seq)
            self._waiting_since.pop(id(seq), None)
            seq.status = Status.RUNNING
            seq.admitted_once = True
            self.running.append(seq)
            self._put(step, seq, n)
            budget -= n
            most = None if most is None else most - 1
        return budget

    def _admission_order(self, only: Callable[[Sequence], bool]) -> list[Sequence]:
        """The waiting sequences `only` accepts, by priority class (aged batch work counts as interactive), then
        round-robin across clients and within a client across its groups (`_turns`: the client, then the group, with
        the fewest rows running first), then arrival."""
        self.waiting.sort(key=self._key)
        candidates = [seq for seq in self.waiting if only(seq)]
        turn = self._turns(candidates, self.running)
        return sorted(candidates, key=lambda seq: (self._key(seq)[0], turn[id(seq)], self._key(seq)[1]))

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
        self.preemptions += 1
        self.add(seq)


def fair_shares(demand: dict[str, int], slots: int) -> dict[str, int]:
    """{key: its whole share of `slots`}, max-min fair: each key gets what it asks (`demand`) or an equal part of what
    the others leave, whichever is less. Slots that do not divide evenly go to the keys first in `demand`'s order."""
    share = dict.fromkeys(demand, 0)
    hungry = [key for key in demand if demand[key] > 0]
    while slots > 0 and hungry:
        each = max(1, slots // len(hungry))
        for key in hungry:
            given = min(each, demand[key] - share[key], slots)
            share[key] += given
            slots -= given
        hungry = [key for key in hungry if share[key] < demand[key]]
    return share


def _counted(ordered: Iterable[Sequence], key: Callable[[Sequence], str], start: Counter) -> dict[int, int]:
    """{id(seq): start[its key] + how many sequences of its key come before it in `ordered`}."""
    seen = Counter(start)
    turn = {}
    for seq in ordered:
        turn[id(seq)] = seen[key(seq)]
        seen[key(seq)] += 1
    return turn
