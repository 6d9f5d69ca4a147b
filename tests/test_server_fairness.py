"""Clients share the real server fairly: one client's many long streams do not keep another client's small request
waiting (hunt round 15 B-F2: 250 streams from one client, within the default rate limit, made another client's `Hi`
wait 411 s). The demo model, 4 slots; the two clients are told apart by a trusted proxy's `X-Forwarded-For`."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.server_util import MODEL, start_server

FLOOD = 12  # streams from one client: three times the slots
FLOOD_TOKENS = 400  # each, its end tokens biased away: the first of them ends hundreds of steps from now
NO_END = {"200002": -100, "200007": -100, "200012": -100}  # <|return|>, <|end|>, <|call|>
HI = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from ossrun.model.resolve import resolve_model

    s = start_server(resolve_model("demo"), tmp_path_factory.mktemp("data-fairness"), "--max-num-seqs", "4",
                     "--forwarded-allow-ips", "127.0.0.1", "--rate-limit", "100000")
    yield s
    s.stop()


class Flood:
    """`FLOOD` streams from one client address, each read to its end by a thread of its own; `ended` counts those done."""

    def __init__(self, server, address: str):
        self.ended = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        body = {**HI, "messages": [{"role": "user", "content": "Tell me a joke"}], "max_tokens": FLOOD_TOKENS,
                "logit_bias": NO_END, "stream": True}
        self.threads = [threading.Thread(target=self._read, args=(server, address, body), daemon=True) for _ in range(FLOOD)]
        for thread in self.threads:
            thread.start()

    def _read(self, server, address: str, body: dict) -> None:
        with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, timeout=300,
                          headers={"X-Forwarded-For": address}) as response:
            for _ in response.iter_lines():
                if self.stop.is_set():
                    return  # closing the stream aborts its request
        with self.lock:
            self.ended += 1

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def test_another_clients_small_request_is_answered_while_one_client_holds_many_streams(server):
    """Before: each request was its own share of the engine, and the newcomer came after the flood's 8 waiting
    streams: it waited until 8 of them had generated their 400 tokens. Now it is the one request of a client with no
    slot: a flood stream gives up its slot at once, and the answer comes while every flood stream is still going."""
    flood = Flood(server, "10.0.0.1")
    try:
        deadline = time.monotonic() + 60
        while (stats := server.health())["running"] + stats["waiting"] < FLOOD and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stats["running"] == 4 and stats["waiting"] == FLOOD - 4, stats
        started = time.monotonic()
        response = httpx.post(server.base + "/v1/chat/completions", json=HI, headers={"X-Forwarded-For": "10.0.0.2"},
                              timeout=300)
        seconds = time.monotonic() - started
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] > 0
        assert flood.ended == 0, f"the newcomer waited for {flood.ended} flood streams ({seconds:.1f} s)"
        assert server.health()["waiting"] >= FLOOD - 4  # the flood still queued behind its share
    finally:
        flood.close()
    server.wait_idle(30)
