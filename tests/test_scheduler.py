"""The scheduler on its own (no model): exact token counts per step for a long prefill among short work."""

from __future__ import annotations

from collections import Counter

from ossrun.engine.kv_cache import KVCacheManager
from ossrun.engine.request import Priority, Request
from ossrun.engine.scheduler import BATCH_CHUNK_BESIDE_INTERACTIVE, Scheduler, fair_shares
from ossrun.engine.sequence import Sequence


def sequence(name: str, prompt_len: int) -> Sequence:
    return Sequence.from_request(Request(name, [1 + i % 50 for i in range(prompt_len)]))


def run(scheduler: Scheduler) -> dict[str, int]:
    """One step as the engine does it (bookkeeping only): {request id: tokens computed this step};
    a sequence whose prompt is done gets one sampled token."""
    step = scheduler.schedule()
    sampled = [item.seq for item in step.scheduled if item.samples]
    for item in step.scheduled:
        item.seq.num_computed += item.num_new_tokens
    for seq in sampled:
        seq.append(7)
    return {item.seq.request_id: item.num_new_tokens for item in step.scheduled}


def scheduler(budget: int = 64) -> Scheduler:
    return Scheduler(KVCacheManager(4096, 4096, 16, 128, prefix_caching=False), max_num_seqs=8, max_tokens_per_step=budget)


def test_a_long_prefill_alone_gets_the_whole_budget():
    s = scheduler()
    s.add(sequence("long", 1000))
    assert run(s) == {"long": 64} and run(s) == {"long": 64}


def test_new_requests_are_admitted_while_a_long_prompt_is_prefilled():
    s = scheduler()
    s.add(sequence("long", 1000))
    run(s)
    s.add(sequence("short", 10))
    assert run(s) == {"long": 32, "short": 10}  # the long chunk is capped at half the budget: "short" is admitted
    assert run(s) == {"short": 1, "long": 32}  # the short request decodes first, every step
    assert run(s) == {"short": 1, "long": 32}


def test_decodes_go_first_and_several_prompts_share_a_step():
    s = scheduler()
    s.add(sequence("long", 1000))
    run(s)
    for name in ("a", "b", "c"):
        s.add(sequence(name, 20))
    assert run(s) == {"long": 32, "a": 20, "b": 12}  # b's prompt is chunked: the budget is 64
    assert run(s) == {"a": 1, "long": 32, "b": 8, "c": 20}  # a decodes first; long keeps its half of the step
    assert run(s) == {"a": 1, "b": 1, "c": 1, "long": 32}


def small_cache_scheduler() -> Scheduler:
    """8 full blocks of 16 tokens: block 0 is the null block, so one sequence holds at most 112 tokens."""
    return Scheduler(KVCacheManager(8, 64, 16, 128, prefix_caching=False), max_num_seqs=8, max_tokens_per_step=64)


def test_a_prompt_the_whole_cache_cannot_hold_is_taken_out_and_does_not_block_the_queue():
    s = small_cache_scheduler()
    s.add(sequence("huge", 200))
    s.add(sequence("short", 10))
    unfit, short_steps = [], 0
    for _ in range(30):
        step = s.schedule()
        unfit += [seq.request_id for seq in step.unfit]
        short_steps += any(item.seq.request_id == "short" for item in step.scheduled)
        for item in step.scheduled:
            item.seq.num_computed += item.num_new_tokens
            if item.samples:
                item.seq.append(7)
    assert unfit == ["huge"]  # taken out before any of it is computed, not preempted over and over
    assert short_steps == 30 and [seq.request_id for seq in s.running] == ["short"]


def test_a_sequence_that_outgrows_the_whole_cache_alone_is_taken_out_instead_of_spinning():
    s = small_cache_scheduler()
    s.add(sequence("grows", 100))
    for _ in range(40):
        step = s.schedule()
        if step.unfit:
            break
        assert not step.preempted  # never preempting itself, step after step
        for item in step.scheduled:
            item.seq.num_computed += item.num_new_tokens
            if item.samples:
                item.seq.append(7)
    assert [seq.request_id for seq in step.unfit] == ["grows"] and len(step.unfit[0].tokens) == 113
    assert len(s) == 0 and s.kv.full.num_used == 0


# -- batch work yields to interactive work -------------------------------------------------------------

def batch_sequence(name: str, prompt_len: int) -> Sequence:
    return Sequence.from_request(Request(name, [1 + i % 50 for i in range(prompt_len)], priority=Priority.BATCH))


def test_without_interactive_work_every_batch_row_runs_every_step():
    s = scheduler()
    for name in "abcd":
        s.add(batch_sequence(name, 5))
    assert run(s) == dict.fromkeys("abcd", 5)
    assert run(s) == dict.fromkeys("abcd", 1)


def test_batch_rows_take_turns_beside_interactive_ones():
    """Before: once admitted, every batch row was in every step, so an interactive request paid for all of them
    each token (their grammar work made a `Hello` 200-500× slower, hunt_batch #2). Now a step holds at most as
    many batch rows as interactive ones, the batch row that ran longest ago first."""
    s = scheduler()
    for name in "abcd":
        s.add(batch_sequence(name, 5))
    run(s)
    s.add(sequence("chat", 5))
    steps = [run(s) for _ in range(8)]
    assert all(step["chat"] >= 1 and len(step) == 2 for step in steps), steps
    turns = [next(name for name in step if name != "chat") for step in steps]
    assert sorted(turns[:4]) == list("abcd") and turns[4:] == turns[:4], turns
    s.remove(next(seq for seq in s.running if seq.request_id == "chat"))
    assert run(s) == dict.fromkeys("abcd", 1)  # alone again: all of them


def test_a_batch_prefill_beside_interactive_work_goes_in_small_chunks():
    s = scheduler()
    s.add(sequence("chat", 5))
    run(s)
    s.add(batch_sequence("long", 1000))
    assert run(s) == {"chat": 1, "long": BATCH_CHUNK_BESIDE_INTERACTIVE}


def test_an_interactive_request_does_not_wait_for_batch_rows_holding_every_slot():
    """Before: with every slot (`max_num_seqs`) held by batch rows, an interactive request waited for one of them
    to finish. Now the batch row that came last is preempted (recomputed later, from the prefix cache mostly)."""
    s = scheduler()
    for i in range(8):
        s.add(batch_sequence(f"b{i}", 5))
    run(s)
    s.add(sequence("chat", 5))
    step = run(s)
    assert step["chat"] == 5 and "b7" not in step
    assert [seq.request_id for seq in s.waiting] == ["b7"]


class GrammarAtWork:
    """Stands for a request's `Constraint` whose next mask is still being computed (`ready` False)."""

    ready = False


def test_a_batch_row_waiting_for_its_grammar_does_not_hold_up_an_interactive_step():
    """Before: a step waited for every sampled row's mask; a batch row's budget search (up to 2 s, queued behind
    the other items' on the grammar threads) held the interactive request's tokens for up to 20 s."""
    s = scheduler()
    for name in "ab":
        s.add(batch_sequence(name, 5))
    run(s)
    s.add(sequence("chat", 5))
    a = next(seq for seq in s.running if seq.request_id == "a")
    a.request.constraint = GrammarAtWork()
    assert run(s) == {"chat": 5, "b": 1} and run(s) == {"chat": 1, "b": 1}
    a.request.constraint = None  # its mask is there
    assert run(s) == {"chat": 1, "a": 1}


# -- the sequences of one client request (a group) share the engine with other requests ------------------------

def grouped(name: str, group: str, prompt_len: int = 5, priority: Priority = Priority.INTERACTIVE) -> Sequence:
    return Sequence.from_request(Request(name, [1 + i % 50 for i in range(prompt_len)], priority=priority, group=group))


def test_a_lone_group_fills_every_slot():
    s = scheduler()
    for i in range(16):
        s.add(grouped(f"big{i}", "big"))
    assert run(s) == {f"big{i}": 5 for i in range(8)}
    assert run(s) == {f"big{i}": 1 for i in range(8)} and len(s.waiting) == 8


def test_a_new_request_gets_a_slot_from_a_group_holding_every_slot():
    """Before: one request's 16 rows (prompts × n) took every slot, and a request sent after them waited for all
    of them (hunt_security #3: 100 s on a server). Now the group over its fair share gives up its youngest row."""
    s = scheduler()
    for i in range(16):
        s.add(grouped(f"big{i}", "big"))
    run(s)
    s.add(grouped("chat", "chat"))
    step = run(s)
    assert step["chat"] == 5 and "big7" not in step and len(step) == 8
    assert [seq.request_id for seq in s.waiting][0] == "big7"  # back in line, ahead of the rows that never ran
    for _ in range(3):  # stable: no more preemption while the new group has its row running
        step = run(s)
        assert len(step) == 8 and "chat" in step and len(s.waiting) == 9


def test_waiting_groups_are_admitted_round_robin_up_to_their_fair_share():
    s = scheduler()
    for i in range(16):
        s.add(grouped(f"a{i}", "a"))
    run(s)
    for i in range(8):
        s.add(grouped(f"b{i}", "b"))
    step = run(s)  # a's 4 youngest rows make room: 8 slots, two groups, 4 each
    assert sorted(step) == sorted([f"a{i}" for i in range(4)] + [f"b{i}" for i in range(4)]), step
    s.add(grouped("c0", "c"))
    step = run(s)  # a third group: one of the groups over 8 // 3 gives up a row
    assert "c0" in step and len(step) == 8


def test_two_groups_prefills_take_the_step_in_turns():
    s = scheduler(budget=64)
    for i in range(2):
        s.add(grouped(f"a{i}", "a", 200))
    run(s)  # a0 takes the first step's prefill chunk (32), a1 the rest
    s.add(grouped("b0", "b", 200))
    run(s)
    step = run(s)  # a0 and b0 first (one turn each), a1 after them: b is not behind all of a's rows
    assert step["b0"] == 32 and step["a0"] == 32 and "a1" not in step, step


def test_a_new_request_is_admitted_before_other_requests_second_prefill_chunks():
    """Hunt round 10 (20b on 2 cores, 12-16 s a step): a `Hello` sent behind four 800-token prompts waited until every
    one of them was read (49-55 s to its first token): two running prefills filled each step, admission came after
    them, so it waited for all four prompts to be read. Now while a request waits, one running prefill takes its chunk,
    the next waiting request (in arrival order) is admitted, the others share the rest: the `Hello` runs as soon as the
    prompts before it have started (here the 4th step, not the 50th)."""
    s = scheduler(budget=64)
    for i in range(4):
        s.add(sequence(f"p{i}", 800))
    assert run(s) == {"p0": 32, "p1": 32}
    s.add(sequence("hi", 5))
    assert run(s) == {"p0": 32, "p2": 32}
    assert run(s) == {"p0": 32, "p3": 32}
    assert run(s) == {"p0": 32, "hi": 5, "p1": 27}
    assert run(s) == {"hi": 1, "p0": 32, "p1": 31}  # it decodes first from then on


# -- clients share the engine first, then each client's requests share its part -----------------------------------

def from_client(name: str, client: str | None, group: str | None = None, prompt_len: int = 5) -> Sequence:
    return Sequence.from_request(Request(name, [1 + i % 50 for i in range(prompt_len)], group=group, client=client))


def rows_by_client(s: Scheduler) -> dict[str, int]:
    return dict(Counter(seq.client for seq in s.running))


def test_fair_shares_are_max_min_fair_whole_slots():
    assert fair_shares({"flood": 250, "b": 1}, 64) == {"flood": 63, "b": 1}
    assert fair_shares({"a": 10, "b": 1, "c": 3}, 8) == {"a": 4, "b": 1, "c": 3}
    assert fair_shares({"a": 5, "b": 5, "c": 5}, 8) == {"a": 3, "b": 3, "c": 2}  # the odd slots to the first listed
    assert fair_shares({f"g{i}": 1 for i in range(10)}, 4) == {f"g{i}": int(i < 4) for i in range(10)}
    assert fair_shares({"a": 2}, 8) == {"a": 2}


def test_one_clients_many_requests_do_not_keep_another_clients_request_waiting():
    """Hunt round 15 B-F2: one client's 250 open streams (each request a group of its own) held every slot, and another
    client's `Hi` came after the flood's ~190 waiting groups: 411 s. Now clients share the slots first: the flood gives
    up its youngest row at once, and the newcomer runs in the next step, however many requests the flood adds."""
    s = scheduler()
    for i in range(30):
        s.add(from_client(f"flood{i}", "10.0.0.1"))
    run(s)
    s.add(from_client("hi", "10.0.0.2"))
    for i in range(30, 40):  # the flood keeps sending
        s.add(from_client(f"flood{i}", "10.0.0.1"))
    step = run(s)
    assert step["hi"] == 5 and len(step) == 8 and "flood7" not in step
    assert rows_by_client(s) == {"10.0.0.1": 7, "10.0.0.2": 1}
    for _ in range(3):  # stable: the flood's waiting requests take no slot back while the newcomer runs
        assert "hi" in run(s) and rows_by_client(s) == {"10.0.0.1": 7, "10.0.0.2": 1}


def test_without_client_names_each_request_counts_as_a_client():
    """The same load with no client named (the engine's own callers; before B-F2's fix, everyone): each request is a
    group and a client of its own, and the newcomer waits behind the flood's earlier requests, as it always did."""
    s = scheduler()
    for i in range(30):
        s.add(from_client(f"flood{i}", None))
    run(s)
    s.add(from_client("hi", None))
    assert "hi" not in run(s) and len(s.running) == 8


def test_clients_get_equal_shares_of_the_slots_and_a_newcomer_its_own():
    s = scheduler()
    for i in range(30):
        s.add(from_client(f"flood{i}", "a"))
    run(s)
    for i in range(6):
        s.add(from_client(f"b{i}", "b"))
    run(s)
    assert rows_by_client(s) == {"a": 4, "b": 4}  # 8 slots, two clients wanting more than 4 each
    s.add(from_client("c0", "c"))
    assert "c0" in run(s) and sorted(rows_by_client(s).values()) == [1, 3, 4]


def test_within_a_client_its_many_choices_do_not_lock_out_its_own_later_request():
    """The per-request fairness holds inside a client: one request's 16 choices and the same client's later `Hi` share
    the client's part of the slots (here, beside another client's request, 7 of 8)."""
    s = scheduler()
    for i in range(16):
        s.add(from_client(f"big{i}", "a", group="big"))
    s.add(from_client("other", "b"))
    run(s)
    assert rows_by_client(s) == {"a": 7, "b": 1}
    s.add(from_client("hi", "a"))
    step = run(s)
    assert step["hi"] == 5 and "other" in step and rows_by_client(s) == {"a": 7, "b": 1}
    assert sum(seq.group == "big" for seq in s.running) == 6


def test_running_prefills_take_the_step_in_turns_by_client():
    """Two requests of one client and one of another, each a long prompt: the other client's chunk comes in the first
    turn, before the first client's second request (by request alone, both of its prompts came first)."""
    s = scheduler(budget=64)
    for i in range(2):
        s.add(from_client(f"a{i}", "a", prompt_len=200))
    run(s)
    s.add(from_client("b0", "b", prompt_len=200))
    run(s)
    step = run(s)
    assert step == {"a0": 32, "b0": 32}, step


def test_an_uneven_split_leaves_running_rows_where_they_are():
    """4 slots, 3 clients: one of them holds 2. The slot over an even split stays with that client: given to the oldest
    client instead (b, with more waiting), a's second row would be preempted, and admission (fewest rows running first,
    then arrival) would hand it straight back to a's row, its prompt read again every step."""
    s = Scheduler(KVCacheManager(4096, 4096, 16, 128, prefix_caching=False), max_num_seqs=4, max_tokens_per_step=64)
    for name, client in (("b0", "b"), ("a0", "a"), ("a1", "a"), ("c0", "c")):
        s.add(from_client(name, client))
    run(s)
    s.add(from_client("b1", "b"))
    for _ in range(3):
        assert run(s) == {"b0": 1, "a0": 1, "a1": 1, "c0": 1}


def test_requests_count_each_group_once_running_if_any_of_its_sequences_runs():
    """Hunt round 21 A-F1: the request gauges counted sequences (one `n=16` request on 4 slots: 4 running, 12 queued)."""
    s = Scheduler(KVCacheManager(4096, 4096, 16, 128, prefix_caching=False), max_num_seqs=4, max_tokens_per_step=512)
    for i in range(6):
        s.add(from_client(f"wide{i}", "a", group="wide"))
    run(s)
    assert (len(s.running), len(s.waiting)) == (4, 2) and s.requests() == (1, 0)
    s.add(from_client("late", "a", group="late"))
    s.add(from_client("later", "a", group="later"))
    assert s.requests() == (1, 2)
