"""Where the server plans requests (render, tokenize, check the grammar): on worker threads, and batch items never
in front of interactive requests."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

from ossrun.api.service import Service
from ossrun.engine.request import Priority


class SlowBatchPlans(Service):
    """A service whose batch plans block until released (as 16 items' grammar checks did for seconds each)."""

    def __init__(self, data_dir):
        super().__init__(engine=None, settings=SimpleNamespace(data_dir=data_dir), metering=None)
        self.release = threading.Event()

    def plan(self, ask, openai: bool = False, priority: Priority = Priority.INTERACTIVE):
        if priority == Priority.BATCH:
            assert self.release.wait(30)
        return ask


def test_an_interactive_plan_does_not_queue_behind_batch_plans(tmp_path):
    """Before: every batch item's plan went to asyncio's default thread pool (os.cpu_count() + 4 threads), so 16
    items with slow grammar checks took every thread and an interactive request's plan waited behind them (its
    answer took 15 s instead of 0.05 s). Now batch plans go one at a time."""
    service = SlowBatchPlans(tmp_path)

    async def scenario() -> str:
        batch = [asyncio.create_task(service.plan_off_loop(f"item {i}", priority=Priority.BATCH)) for i in range(40)]
        await asyncio.sleep(0.1)
        try:
            return await asyncio.wait_for(service.plan_off_loop("Hello"), 10)
        finally:
            service.release.set()
            assert len(await asyncio.gather(*batch)) == 40

    assert asyncio.run(scenario()) == "Hello"


def test_truncation_finds_the_fewest_items_to_drop_from_any_guess():
    """`truncation: "auto"` searches the fewest items to drop (a render per try) from a guess: whatever the guess,
    the answer is the fewest that fit, or all of them when none does, and each count is tried at most once."""
    from ossrun.api.service import _fewest

    for total in range(1, 40):
        for needed in range(1, total + 2):  # total + 1: even dropping all does not fit
            for guess in range(1, total + 1):
                tries: list[int] = []

                def fits(count: int) -> bool:
                    tries.append(count)
                    return count >= needed

                assert _fewest(fits, total, guess) == min(needed, total)
                assert 1 <= min(tries) and max(tries) <= total and len(tries) == len(set(tries))
                assert len(tries) <= 2 * total.bit_length() + 2
