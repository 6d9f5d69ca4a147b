"""A client that leaves a stream cancels every engine request of it at once, however the leaving lands.

The app is called as uvicorn calls it (ASGI spec 2.3), on the real engine and the tiny random model
(it never stops by itself): the client reads some frames, its socket stops draining (the server's
`send` of the next frame waits), and then it disconnects. Starlette cancels the response's writer
while it waits in that `send`, with the body generator suspended at a `yield`; unless the server
closes the body itself, only the garbage collector would ever run its `finally` (which aborts the
engine requests). The garbage collector is off here, so the test sees only what is deterministic.
"""

from __future__ import annotations

import asyncio
import gc
import json

import pytest

from ossrun import harmony
from ossrun.api import ask as asks
from ossrun.api import choices, schemas, surfaces
from ossrun.api.app import AppSettings, build_app
from ossrun.engine.async_engine import AsyncEngine
from tests.server_util import MODEL

RUN = f"/client/v4/accounts/a/ai/run/{MODEL}"
LONG = 3000  # far more tokens than the tiny model makes in the seconds the test waits
MESSAGES = [{"role": "user", "content": "Hi"}]
CASES = {
    "chat": ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": LONG, "stream": True}),
    "chat-n3": ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": LONG, "stream": True, "n": 3}),
    "completions-n3": ("/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": LONG, "stream": True, "n": 3}),
    "responses": ("/v1/responses", {"model": MODEL, "input": "Hi", "max_output_tokens": LONG, "stream": True}),
    "ai-run": (RUN, {"prompt": "Hi", "max_tokens": LONG, "stream": True}),
}


@pytest.fixture(scope="module")
def served(checkpoints, tmp_path_factory):
    engine = AsyncEngine.from_model(checkpoints["original"], "float32", precision="exact", decode_token=harmony.token_bytes,
                                    kv_cache_bytes=64 * 1024**2)
    app = build_app(engine, AppSettings(data_dir=tmp_path_factory.mktemp("disconnect-data"), rate_limit_per_minute=0))
    yield engine, app
    engine.shutdown()


def scope(path: str, body: bytes) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}


async def leave_while_a_send_waits(app, path: str, body: dict, frames: int) -> None:
    """The client reads `frames` body frames; the next one's `send` waits (the socket no longer drains)
    while the engine makes more tokens, so the response's writer is parked in `send`, not in the body;
    then the client disconnects, and that `send` (and every later one) returns, as uvicorn's do."""
    raw, left, sent = json.dumps(body).encode(), asyncio.Event(), 0
    pending = [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive() -> dict:
        if pending:
            return pending.pop()
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal sent
        if message["type"] != "http.response.body" or not message.get("body") or left.is_set():
            return
        sent += 1
        if sent > frames:
            await asyncio.sleep(0.3)  # the body makes its next frame meanwhile and waits to hand it over
            left.set()
            await asyncio.sleep(0.1)  # Starlette sees the disconnect and cancels the writer inside this send

    await asyncio.wait_for(app(scope(path, raw), receive, send), timeout=30)


async def idle_within(engine: AsyncEngine, seconds: float) -> dict:
    """The engine's stats once nothing runs and no KV block is held, or the last ones seen after `seconds`."""
    for _ in range(int(seconds / 0.02)):
        stats = engine.stats()
        if stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_blocks_used"] == 0:
            break
        await asyncio.sleep(0.02)
    return stats


@pytest.mark.parametrize("case", CASES)
def test_leaving_a_stream_while_its_send_waits_aborts_every_engine_request(served, case):
    engine, app = served
    path, body = CASES[case]

    async def scenario() -> tuple[dict, int]:
        await leave_while_a_send_waits(app, path, body, frames=3)
        stats = await idle_within(engine, 2.0)
        before = stats["generated_tokens_total"]
        await asyncio.sleep(0.2)
        return stats, engine.stats()["generated_tokens_total"] - before

    gc.collect()
    gc.disable()  # what only the collector would close stays open: the test sees it
    try:
        stats, more = asyncio.run(scenario())  # (asyncio.run's own clean-up closes leftovers only after the check)
    finally:
        gc.enable()
    assert stats["running"] == 0 and stats["kv_blocks_used"] == 0 and stats["kv_sliding_blocks_used"] == 0, \
        f"the engine still serves a client that left: {stats}"
    assert more == 0, f"{more} tokens generated after the client left"


@pytest.mark.parametrize("n", [1, 3])
def test_closing_a_stream_has_aborted_every_engine_request_when_close_returns(served, n):
    """Each link of the chain (merged choices → surface stream → drive → service → engine stream) closes the
    one it reads: by the time the outer body's `aclose()` returns, every engine request has been told to
    abort, not merely handed to the event loop's finaliser of dropped generators."""
    engine, app = served
    service, aborted = app.state.service, []
    engine.abort = lambda request_id: (aborted.append(request_id), AsyncEngine.abort(engine, request_id))[-1]
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": LONG, "stream": True, "n": n}

    async def scenario() -> tuple[list[str], dict]:
        plan = await service.plan_off_loop(asks.from_messages(schemas.parse(schemas.ChatCompletionRequest, body)), openai=True)
        streams = [surfaces.stream(service, one, surfaces.for_plan(service, one, MODEL, True)) for one in service.choice_plans(plan)]
        stream = streams[0] if n == 1 else choices.merged_stream(streams, dict)
        for _ in range(4 * n):
            await anext(stream)
        await stream.aclose()
        told = list(aborted)
        return told, await idle_within(engine, 2.0)

    gc.collect()
    gc.disable()
    try:
        told, stats = asyncio.run(scenario())
    finally:
        gc.enable()
        del engine.abort
    assert len(set(told)) == n, f"{len(set(told))} of {n} engine requests aborted when the stream's close returned"
    assert stats["running"] == 0 and stats["kv_blocks_used"] == 0, stats
