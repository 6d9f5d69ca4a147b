"""The scheduler on its own (no model): exact token counts per step for a long prefill among short work."""

from __future__ import annotations

from ossrun.engine.kv_cache import KVCacheManager
from ossrun.engine.request import Request
from ossrun.engine.scheduler import Scheduler
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
