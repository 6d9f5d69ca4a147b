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


def test_truncation_drops_the_items_of_a_conversation_too_many_messages_to_render(tmp_path, monkeypatch):
    """Hunt round 15 B-F1: a conversation whose messages alone cannot fit the window is refused before it is rendered
    (`harmony.PromptTooLong`), except under `truncation: "auto"`, where its oldest items go until it fits: the whole is
    never rendered, the shorter tries that still cannot fit are not either, and the answer is the one the search
    finds without the bound; `input_tokens` counts the same prompt."""
    from fastapi.testclient import TestClient

    from ossrun.api.app import AppSettings, build_app
    from ossrun.harmony import render as render_module
    from tests.api_fakes import FakeEngine

    window, count = 512, 2000  # 8000 tokens at least
    rendered: list[int] = []
    library = render_module._render
    monkeypatch.setattr(render_module, "_render", lambda conversation: rendered.append(len(conversation.messages)) or library(conversation))
    items = [{"role": "user", "content": f"turn {i}"} for i in range(count)]
    body = {"model": "@cf/openai/gpt-oss-20b", "input": items, "truncation": "auto", "max_output_tokens": 16}
    with TestClient(build_app(FakeEngine(max_model_len=window), AppSettings(data_dir=tmp_path, rate_limit_per_minute=0))) as c:
        answer = c.post("/v1/responses", json=body)
        assert answer.status_code == 200, answer.text
        counted = c.post("/v1/responses/input_tokens", json=body).json()["input_tokens"]
        refused = c.post("/v1/responses", json={**body, "truncation": "disabled"})
    used = answer.json()["usage"]["input_tokens"]
    assert used == counted and window - 16 - 10 < used <= window - 16  # the fewest dropped: one more would have fit
    assert rendered and max(rendered) <= window // render_module.MIN_MESSAGE_TOKENS + 2  # system, developer: never the whole
    assert refused.status_code == 400 and "at least 8000 tokens: 2000 messages" in refused.json()["error"]["message"]
