"""A 200 KB single-word prompt through the real server: the server keeps answering while it is prefilled.

It once took 337 s, froze `/health` for 20 s and timed out every small request: tokenisation was
quadratic and ran on the event loop, and the long prefill took every step's whole token budget, so
nothing else was admitted until it was done. The long request here is never waited for: once the
small one is answered, its client leaves (which ends it).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.server_util import MODEL, start_server


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    s = start_server(checkpoints["original"], tmp_path_factory.mktemp("data-long"), "--rate-limit", "100000")
    yield s
    s.stop()


def send_raw(server, body: dict) -> socket.socket:
    """POST without waiting for the answer; closing the socket is the client leaving."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(f"POST /client/v4/accounts/a/ai/run/{MODEL} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


class HealthWatch(threading.Thread):
    """Polls /health until stopped; remembers the slowest answer."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.server, self.seconds, self.done = server, [], threading.Event()

    @property
    def slowest(self) -> float:
        return max(self.seconds, default=0.0)

    def run(self):
        while not self.done.is_set():
            started = time.monotonic()
            try:
                httpx.get(self.server.base + "/health", timeout=30)
            except httpx.TimeoutException:  # counted, not lost with the thread: the slowest answer is what is asserted
                pass
            self.seconds.append(time.monotonic() - started)
            time.sleep(0.1)


def posted_at_once(server, bodies: list[tuple[str, bytes]]) -> tuple[list[httpx.Response], HealthWatch]:
    """POST every (path, JSON bytes) at once while `/health` is polled → the answers (in order) and the watch."""
    with ThreadPoolExecutor(len(bodies)) as pool:
        watch = HealthWatch(server)
        watch.start()
        answers = list(pool.map(lambda sent: httpx.post(server.base + sent[0], content=sent[1], timeout=120,
                                                        headers={"Content-Type": "application/json"}), bodies))
    watch.done.set()
    watch.join()
    return answers, watch


def test_small_requests_and_health_are_served_while_a_long_prompt_is_prefilled(server):
    watch = HealthWatch(server)
    watch.start()
    long_client = send_raw(server, {"prompt": "x" * 200_000, "max_tokens": 2})
    try:
        deadline = time.monotonic() + 60
        while server.health()["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.health()["running"] == 1  # the long prompt is being prefilled (minutes on the tiny model)
        small = httpx.post(server.run_url(), json={"prompt": "Hi", "max_tokens": 4, "temperature": 0}, timeout=120)
        assert small.status_code == 200, small.text
        assert small.json()["result"]["usage"]["completion_tokens"] == 4
        assert server.health()["running"] == 1, "the small request was only served after the long prefill"
    finally:
        long_client.close()
    deadline = time.monotonic() + 30
    while server.health()["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    watch.done.set()
    watch.join()
    assert server.health()["running"] == 0
    assert watch.slowest < 1, f"/health took {watch.slowest:.2f}s during the long prefill"


def test_a_request_longer_than_the_kv_cache_holds_is_a_400_and_freezes_nothing(checkpoints, tmp_path):
    """With a small KV cache the served context is what the cache holds. A longer request used to be accepted
    (it fit the context window), then preempt itself every step: every request behind it waited until its
    client left, a stream forever."""
    small = start_server(checkpoints["original"], tmp_path, "--rate-limit", "100000", "--kv-cache-gib", "0.001",
                         "--max-num-seqs", "4")
    try:
        big = httpx.post(small.run_url(), json={"prompt": "What is the capital of France? " * 400, "max_tokens": 8}, timeout=30)
        assert big.status_code == 400 and big.json()["errors"][0]["code"] == 8, big.text
        assert "context window" in big.json()["errors"][0]["message"]
        answer = httpx.post(small.run_url(), json={"prompt": "Hi", "max_tokens": 4}, timeout=30)
        assert answer.status_code == 200 and small.health()["waiting"] == 0
    finally:
        small.stop()


def test_the_served_context_window_is_what_search_states_and_errors_name_the_callers_limit(checkpoints, tmp_path):
    """Before: /ai/models/search said context_window 128000 whatever was served; the code-8 message named
    `max_tokens` when the caller had sent `max_output_tokens` (a name Responses refuses) or `max_completion_tokens`,
    and `max_tokens (1)` when it had sent no limit at all; --max-model-len above the model's context was cut silently."""
    server = start_server(checkpoints["original"], tmp_path / "data", "--rate-limit", "100000", "--max-model-len", "300")
    big = start_server(checkpoints["original"], tmp_path / "data-big", "--rate-limit", "100000", "--max-model-len", "200000")
    try:
        search = httpx.get(f"{server.base}/client/v4/accounts/a/ai/models/search", timeout=30).json()["result"][0]
        assert {"property_id": "context_window", "value": "300"} in search["properties"]
        long_text = "word " * 400

        def refused(path: str, body: dict) -> str:
            response = httpx.post(server.base + path, json={"model": MODEL, **body}, timeout=60)
            assert response.status_code == 400, response.text
            return response.json()["error"]["message"]

        messages = [refused("/v1/responses", {"input": "Hi " * 150, "max_output_tokens": 100}),
                    refused("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi " * 150}], "max_completion_tokens": 200}),
                    refused("/v1/completions", {"prompt": "Hi " * 100, "max_tokens": 250}),
                    refused("/v1/completions", {"prompt": long_text})]
        assert "+ max_output_tokens (100) =" in messages[0] and "+ max_completion_tokens (200) =" in messages[1]
        assert "+ max_tokens (250) =" in messages[2] and "fills the context window of 300 tokens" in messages[3]
        # hunt_py M2, hunt_js L1: the words clients recognise an overflow by (LiteLLM: "this model's maximum context
        # length is"; LangChain.js: "exceeds the context window" or "maximum context length"); before, neither matched.
        assert all(m.startswith("AiError: This model's maximum context length is 300 tokens: ") for m in messages)
        assert all("exceeds the context window" in m for m in messages[:3])
        assert "the model's context is 131072 tokens: requests get at most that, not 200000" in big.log.read_text()
    finally:
        server.stop()
        big.stop()


def test_health_is_answered_while_multi_mb_prompts_are_tokenized(server):
    """hunt_security #8. Planning runs on a worker thread so that the event loop keeps answering, but the harmony
    library tokenized (and rendered) holding the GIL: four 9 MB prompts, each refused as too long, made `/health`
    wait 11 s. Texts are now tokenized by an encoder that lets other threads run, the library renders only the frame
    around them, and a refusal's token lists are freed on the worker thread. Four 8 MB prompts at once (a Prompt, a
    chat system message, a raw completion, Responses instructions) are each refused with their exact token count,
    and `/health` is answered within 2 s meanwhile (6 to 10 s before, under 1 s after, on a busy 2-core machine)."""
    words = 1_400_000
    text = "hello " * words  # 8.4 MB (the cap is 10), one token a word
    requests = [
        ("/client/v4/accounts/a/ai/run/" + MODEL, {"prompt": text, "max_tokens": 1}, f"prompt ({words + 57} tokens)"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "system", "content": text},
                                                               {"role": "user", "content": "Hi"}]},
         f"the prompt ({words + 65} tokens) fills"),
        ("/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 1}, f"prompt ({words + 1} tokens)"),
        ("/v1/responses", {"model": MODEL, "input": "Hi", "instructions": text, "max_output_tokens": 16},
         f"prompt ({words + 65} tokens) + max_output_tokens (16)"),
    ]
    bodies = [(path, json.dumps(body).encode(), says) for path, body, says in requests]
    answers, watch = posted_at_once(server, [(path, data) for path, data, _ in bodies])
    assert [a.status_code for a in answers] == [400] * len(bodies), [a.text[:300] for a in answers]
    messages = " | ".join(a.text for a in answers)
    assert all(says in messages for _, _, says in bodies), messages
    assert watch.slowest < 2, f"/health took {[round(t, 2) for t in watch.seconds]}s while the prompts were tokenized"


def test_health_is_answered_while_conversations_too_many_messages_to_fit_are_refused(server):
    """Hunt round 15 B-F1. Before: a conversation of many tiny messages was rendered whole by the harmony library,
    which holds the GIL (100,000 one-letter messages: 8.7 s), and only then refused as longer than the window: the
    event loop stood still meanwhile (`/health` 12 s, a small chat 31 s for two such bodies), and `input_tokens`
    counted it. Now a conversation whose messages and tools alone (4 tokens each at least) take more than the window
    is refused before anything renders it, with the context window's 400 (code 8) naming the fewest tokens it takes,
    on every path that renders: chat, `/ai/run`, a batch item, Responses and `input_tokens`. `/health` is answered
    within 2 s meanwhile (each body here stalled it about 5 s before; the JSON is still parsed on the event loop)."""
    count = 60_000  # 240,000 tokens at least: past the window (128,000 here; gpt-oss's 131,072 at most)
    tiny = [{"role": "user", "content": "a"}] * count
    least = f"at least {4 * count} tokens: {count} messages"
    run = "/client/v4/accounts/a/ai/run/" + MODEL
    requests = [
        ("/v1/chat/completions", {"model": MODEL, "messages": tiny, "max_tokens": 8},
         f"prompt ({least}) + max_tokens (8) = at least {4 * count + 8} exceeds the context window of 128000 tokens"),
        (run, {"messages": tiny}, f"the prompt ({least}) fills the context window of 128000 tokens"),
        (run + "?queueRequest=true", {"requests": [{"prompt": "Hi"}, {"messages": tiny}]}, f"({least}) fills"),
        ("/v1/responses", {"model": MODEL, "input": tiny, "max_output_tokens": 16}, f"({least}) + max_output_tokens (16)"),
        ("/v1/responses/input_tokens", {"model": MODEL, "input": tiny}, f"({least}) fills"),
        ("/v1/chat/completions", {"model": MODEL, "messages": tiny[:1],
                                  "tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(count)]},
         f"(at least {4 + 4 * count} tokens: 1 messages and {count} tools) fills"),
    ]
    watch = HealthWatch(server)
    watch.start()
    answers = [httpx.post(server.base + path, content=json.dumps(body).encode(), timeout=120,
                          headers={"Content-Type": "application/json"}) for path, body, _ in requests]
    watch.done.set()
    watch.join()
    for answer, (path, _, says) in zip(answers, requests):
        assert answer.status_code == 400, (path, answer.text[:300])
        error = answer.json()["error"] if "error" in answer.json() else answer.json()["errors"][0]
        assert str(error["code"]) == "8" and error["message"].startswith("AiError: This model's maximum context length is "), error
        assert says in error["message"], (path, error["message"])
    assert "(in requests[1])" in answers[2].text
    assert watch.slowest < 2, f"/health took {[round(t, 2) for t in watch.seconds]}s while the conversations were refused"


def test_preemptions_are_counted_on_metrics_and_health(checkpoints, tmp_path):
    """Before: nothing counted preemptions (not /metrics, /health or the log), so an operator could not tell that
    `--kv-cache-gib` was too small for the load: requests were recomputed, silently slower."""
    small = start_server(checkpoints["original"], tmp_path, "--rate-limit", "100000", "--kv-cache-gib", "0.001",
                         "--max-num-seqs", "4")
    try:
        assert small.health()["preemptions_total"] == 0
        held = small.health()["kv_blocks_total"] * 16  # tokens the whole cache holds (16 a block)
        body = {"prompt": "word " * (held // 3), "max_tokens": held // 5, "temperature": 1.0}  # over half the cache each
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: httpx.post(small.base + "/v1/completions", json={**body, "model": MODEL},
                                                         timeout=120), range(4)))
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        preempted = small.health()["preemptions_total"]
        assert preempted > 0  # two such requests cannot both run to their end at once
        line = [ln for ln in httpx.get(small.base + "/metrics", timeout=10).text.splitlines()
                if ln.startswith("ossrun_preemptions_total ")]
        assert line and float(line[0].split()[1]) == preempted, line
    finally:
        small.stop()


def test_health_is_answered_while_large_bodies_are_parsed(server):
    """Hunt round 15. Before: a body's JSON was parsed, walked and read into its types on the event loop: a 9 MB
    conversation stalled every other request, `/health` included, for about a second (each; ~1.3 s on a quiet 2-core
    machine, 23 s under load). Bodies from 256 KB on are parsed on a worker thread, which lets the loop in every few
    milliseconds. Four such bodies at once, on three surfaces, are each refused (their conversations are far past the
    window) while `/health` stays quick."""
    count = 150_000
    conversation = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"hello there number {i}"} for i in range(count)]
    items = [{"role": m["role"], "content": m["content"]} for m in conversation]
    requests = [
        ("/v1/chat/completions", {"model": MODEL, "messages": conversation, "max_tokens": 8}),
        ("/client/v4/accounts/a/ai/run/" + MODEL, {"messages": conversation}),
        ("/v1/responses", {"model": MODEL, "input": items, "max_output_tokens": 16}),
        ("/v1/chat/completions", {"model": MODEL, "messages": conversation[1:], "max_tokens": 8}),
    ]
    bodies = [(path, json.dumps(body).encode()) for path, body in requests]
    assert all(8_000_000 < len(data) < 10_000_000 for _, data in bodies)  # under the 10 MB cap
    answers, watch = posted_at_once(server, bodies)
    assert [a.status_code for a in answers] == [400] * len(bodies), [a.text[:300] for a in answers]
    assert all("exceeds the context window" in a.text or "fills the context window" in a.text for a in answers), \
        [a.text[:300] for a in answers]
    assert watch.slowest < 3, f"/health took {[round(t, 2) for t in watch.seconds]}s while the bodies were parsed"
