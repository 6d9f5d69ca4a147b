"""64 concurrent mixed requests against the real server on the tiny model, bounded in time.

Streamed and sync requests on every surface, clients that leave early (a stream closed after its
first frame, sync requests timing out) and one 200 KB single-word prompt. Every request whose client
stays gets a complete answer, `/health` answers in under a second throughout, nothing keeps running
after its client left, and SIGTERM with requests in flight ends the server in under 5 s.

The 200 KB prompt's client gives up after LONG_PATIENCE_S: prefilling its 25 000 tokens takes
minutes with the tiny model's plain CPU attention; what matters here is that it freezes nothing.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.server_util import MODEL, start_server

LONG_PATIENCE_S = 8.0
RUN = f"/client/v4/accounts/acct/ai/run/{MODEL}"
CHAT = [{"role": "user", "content": "Tell me about the sea"}]


WATCH = """
import sys, time, httpx
base, stop = sys.argv[1], sys.argv[2]
slowest = 0.0
with httpx.Client(timeout=30) as client:
    while True:
        started = time.monotonic()
        client.get(base + "/health").raise_for_status()
        slowest = max(slowest, time.monotonic() - started)
        if open(stop).read():
            break
        time.sleep(0.2)
print(slowest)
"""


class HealthWatch:
    """Polls /health from its own process (this one is busy being 64 clients); remembers the slowest answer."""

    def __init__(self, base: str, folder):
        self.stop_file = folder / "stop-watch"
        self.stop_file.write_text("")
        self.process = subprocess.Popen([sys.executable, "-c", WATCH, base, str(self.stop_file)], stdout=subprocess.PIPE, text=True)

    def slowest(self) -> float:
        self.stop_file.write_text("stop")
        out, _ = self.process.communicate(timeout=60)
        assert self.process.returncode == 0
        return float(out)


def plan(i: int) -> tuple[str, str, dict]:
    """(kind, path, body) of request i: 56 that stay, 7 that leave, 1 long prompt (index 0)."""
    n = 8 + i % 5
    if i == 0:
        return "long", RUN, {"prompt": "x" * 200_000, "max_tokens": 2}
    if i % 9 == 1:
        return "leave-stream", "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 2000, "stream": True}
    if i % 9 == 5:
        return "leave-sync", RUN, {"prompt": "Tell me everything", "max_tokens": 2000}
    kinds = [
        ("sync", RUN, {"prompt": f"Question {i}", "max_tokens": n}),
        ("stream", RUN, {"prompt": f"Question {i}", "max_tokens": n, "stream": True}),
        ("sync", "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": n}),
        ("stream", "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": n, "stream": True}),
        ("sync", "/v1/completions", {"model": MODEL, "prompt": f"Once {i}", "max_tokens": n}),
        ("stream", "/v1/completions", {"model": MODEL, "prompt": f"Once {i}", "max_tokens": n, "stream": True}),
        ("sync", "/v1/responses", {"model": MODEL, "input": f"Question {i}", "max_output_tokens": n}),
        ("stream", "/v1/responses", {"model": MODEL, "input": f"Question {i}", "max_output_tokens": n, "stream": True}),
    ]
    return kinds[i % len(kinds)]


async def one(client: httpx.AsyncClient, kind: str, path: str, body: dict) -> str:
    """What happened to the request: 'ok', 'left', or a description of what went wrong."""
    if kind == "long":
        try:
            await client.post(path, json=body, timeout=LONG_PATIENCE_S)
            return "long prompt answered (unexpectedly fast)"
        except httpx.ReadTimeout:
            return "left"
    if kind == "leave-sync":
        try:
            await client.post(path, json=body, timeout=2.0)
            return "a 2000-token answer came in 2 s"
        except httpx.ReadTimeout:
            return "left"
    if kind == "leave-stream":
        async with client.stream("POST", path, json=body, timeout=60) as response:
            async for _ in response.aiter_lines():
                return "left"  # the first frame, then the client goes
    if kind == "sync":
        response = await client.post(path, json=body, timeout=120)
        return "ok" if response.status_code == 200 else f"{path}: {response.status_code} {response.text[:200]}"
    async with client.stream("POST", path, json=body, timeout=120) as response:
        lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    if response.status_code != 200 or not lines or lines[-1] != "data: [DONE]":
        return f"{path} stream: {response.status_code}, ended with {lines[-1:]}"
    errors = [line for line in lines[:-1] if '"error"' in line and "error" in json.loads(line[6:])]
    return f"{path} stream error: {errors[0]}" if errors else "ok"


async def storm(base: str) -> list[str]:
    async with httpx.AsyncClient(base_url=base, limits=httpx.Limits(max_connections=128)) as client:
        return await asyncio.gather(*(one(client, *plan(i)) for i in range(64)))


def test_64_mixed_concurrent_requests(checkpoints, tmp_path):
    server = start_server(checkpoints["original"], tmp_path / "data", "--rate-limit", "100000")
    watch = HealthWatch(server.base, tmp_path)
    try:
        started = time.monotonic()
        outcomes = asyncio.run(storm(server.base))
        elapsed = time.monotonic() - started
        assert [o for o in outcomes if o not in ("ok", "left")] == []
        assert outcomes.count("left") == 1 + sum(1 for i in range(64) if i % 9 in (1, 5))
        deadline = time.monotonic() + 3
        while (server.health()["running"] or server.health()["waiting"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        stats = server.health()
        assert stats["running"] == 0 and stats["waiting"] == 0, f"orphans keep running: {stats}"
        slowest_health = watch.slowest()
        assert slowest_health < 1.0, f"/health took {slowest_health:.2f}s under load"

        # SIGTERM with requests in flight
        in_flight = [threading.Thread(target=lambda: httpx.post(server.base + RUN, json={"prompt": "Hi", "max_tokens": 3000},
                                                                timeout=60), daemon=True) for _ in range(4)]
        for thread in in_flight:
            thread.start()
        deadline = time.monotonic() + 20
        while server.health()["running"] < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        term = time.monotonic()
        server.process.terminate()
        server.process.wait(timeout=30)
        assert time.monotonic() - term < 5.0
        print(f"64 requests in {elapsed:.1f}s, slowest /health {slowest_health:.2f}s, SIGTERM exit {time.monotonic() - term:.2f}s")
    finally:
        if watch.process.poll() is None:
            watch.process.kill()
        server.stop()
