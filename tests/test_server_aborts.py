"""A client that leaves ends its request, whatever the route; SIGTERM ends the server promptly.

A sync request has no stream to close: the server must notice the closed connection itself,
or every SDK timeout (and its retry) leaves an orphan generating until `max_tokens`.
"""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from ossrun.batch.store import SQLiteBatchStore
from tests.server_util import MODEL, start_server

LONG = 4000  # far more tokens than the tiny model makes in the client's timeout
CLIENT_TIMEOUT = 0.5  # seconds; the native CPU blocks make the tiny model fast enough to finish 4000 tokens in 1.5 s


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    s = start_server(checkpoints["original"], tmp_path_factory.mktemp("data-aborts"), "--rate-limit", "100000")
    yield s
    s.stop()


def wait_idle(server, within: float) -> dict:
    """The engine's stats once nothing runs or waits, or the last stats seen when `within` runs out."""
    deadline = time.monotonic() + within
    while True:
        stats = server.health()
        if (stats["running"] == 0 and stats["waiting"] == 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def leave_early(server, path: str, body: dict) -> None:
    """Send until one request is still generating when its client gives up (the random model may draw an
    end token early on a quiet machine; a request that ended by itself proves nothing about orphans)."""
    for seed in range(8):
        try:
            httpx.post(server.base + path, json={**body, "seed": seed}, timeout=CLIENT_TIMEOUT)
        except httpx.ReadTimeout:
            return
    pytest.fail("every request ended before its client's timeout: nothing left early")


@pytest.mark.parametrize("route", ["ai-run", "chat", "completions", "responses"])
def test_sync_request_ends_when_its_client_leaves(server, route):
    if route == "ai-run":
        leave_early(server, "/client/v4/accounts/a/ai/run/" + MODEL, {"prompt": "Hi", "max_tokens": LONG})
    elif route == "chat":  # the official client, the same way as leave_early
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="x", timeout=CLIENT_TIMEOUT, max_retries=0)
        for seed in range(8):
            try:
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=LONG, seed=seed + 1)
            except openai.APITimeoutError:
                break
        else:
            pytest.fail("every request ended before its client's timeout: nothing left early")
    elif route == "completions":
        leave_early(server, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": LONG})
    else:
        leave_early(server, "/v1/responses", {"model": MODEL, "input": "Hi", "max_output_tokens": LONG})
    stats = wait_idle(server, within=1.0)
    assert stats["running"] == 0 and stats["waiting"] == 0, f"an orphan still runs after its client left: {stats}"


def test_sigterm_with_requests_in_flight_exits_within_5s(checkpoints, tmp_path):
    server = start_server(checkpoints["original"], tmp_path / "data", "--rate-limit", "100000")
    try:
        def sync():
            try:
                httpx.post(server.run_url(), json={"prompt": "Hi", "max_tokens": LONG}, timeout=60)
            except httpx.HTTPError:
                pass

        def stream():
            try:
                with httpx.stream("POST", server.run_url(), json={"prompt": "Hi", "max_tokens": LONG, "stream": True}, timeout=60) as r:
                    for _ in r.iter_bytes():
                        pass
            except httpx.HTTPError:
                pass

        batch = httpx.post(server.run_url(), params={"queueRequest": "true"}, timeout=30,
                           json={"requests": [{"prompt": f"item {i}", "max_tokens": LONG} for i in range(2)]}).json()["result"]["request_id"]
        threads = [threading.Thread(target=f, daemon=True) for f in (sync, sync, sync, stream, stream)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while server.health()["running"] < len(threads) + 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.health()["running"] == len(threads) + 2
        started = time.monotonic()
        server.process.terminate()
        server.process.wait(timeout=30)
        assert time.monotonic() - started < 5.0
        for t in threads:
            t.join(timeout=5)
            assert not t.is_alive()
        # the batch items were interrupted, not failed: they run again at the next start
        store = SQLiteBatchStore(tmp_path / "data" / "batch.sqlite")
        assert [(item.state, item.success) for item in store.get(batch).items] == [("running", None)] * 2
        store.close()
    finally:
        server.stop()
