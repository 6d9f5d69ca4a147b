"""/metrics against what the answers reported, through the real server: a request with n choices (or a list of
prompts) is counted as its usage counts it, and a request whose client left is metered for every token the
engine generated for it."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from ossrun.api.metering import PRICES
from tests.server_util import MODEL, start_server

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Write a line"}], "max_tokens": 12, "temperature": 1.0, "seed": 3}
TEXT = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.0, "seed": 5}
LONG = 4000


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    s = start_server(checkpoints["original"], tmp_path_factory.mktemp("data-metering"), "--rate-limit", "100000")
    yield s
    s.stop()


def metrics(server) -> dict[str, float]:
    wanted = {'ossrun_tokens_total{kind="prompt"}': "prompt", 'ossrun_tokens_total{kind="completion"}': "completion",
              'ossrun_tokens_total{kind="cached"}': "cached", 'ossrun_tokens_total{kind="reasoning"}': "reasoning",
              "ossrun_cost_usd_total": "cost", "ossrun_neurons_total": "neurons", "ossrun_request_seconds_count": "requests"}
    values = dict.fromkeys(wanted.values(), 0.0)
    for line in httpx.get(server.base + "/metrics", timeout=10).text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in wanted:
            values[wanted[name]] = float(value)
    return values


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in before}


def sse_usage(server, path: str, body: dict) -> dict:
    with httpx.stream("POST", server.base + path, json=body, timeout=60) as response:
        frames = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    return [f for f in frames if f.get("usage")][-1]["usage"]


def assert_metered_as(before: dict[str, float], after: dict[str, float], usages: list[dict]) -> None:
    got = delta(before, after)
    want = {"prompt": sum(u["prompt_tokens"] for u in usages), "completion": sum(u["completion_tokens"] for u in usages),
            "cached": sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages),
            "reasoning": sum(u["completion_tokens_details"]["reasoning_tokens"] for u in usages),
            "cost": sum(u["cost_usd"] for u in usages), "neurons": sum(u["neurons"] for u in usages), "requests": len(usages)}
    assert {k: got[k] for k in ("prompt", "completion", "cached", "reasoning", "requests")} == \
        {k: want[k] for k in ("prompt", "completion", "cached", "reasoning", "requests")}
    assert got["cost"] == pytest.approx(want["cost"], rel=1e-6) and got["neurons"] == pytest.approx(want["neurons"], rel=1e-6)


@pytest.mark.parametrize("n", [2, 3])
def test_chat_with_n_choices_is_metered_as_its_usage(server, n):
    before = metrics(server)
    sync = httpx.post(server.base + "/v1/chat/completions", json={**CHAT, "n": n}, timeout=60).json()["usage"]
    streamed = sse_usage(server, "/v1/chat/completions", {**CHAT, "n": n, "stream": True, "stream_options": {"include_usage": True}})
    assert sync["completion_tokens"] == streamed["completion_tokens"] == n * CHAT["max_tokens"]
    assert_metered_as(before, metrics(server), [sync, streamed])


@pytest.mark.parametrize("prompt", ["Once upon a time", ["Once upon a time", "A long way", "Hi"]])
def test_completions_with_n_choices_and_prompt_lists_are_metered_as_their_usage(server, prompt):
    before = metrics(server)
    body = {**TEXT, "prompt": prompt, "n": 2}
    sync = httpx.post(server.base + "/v1/completions", json=body, timeout=60).json()["usage"]
    streamed = sse_usage(server, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert sync == streamed
    assert_metered_as(before, metrics(server), [sync, streamed])
    cost, neurons = PRICES[MODEL].cost(sync["prompt_tokens"], sync["completion_tokens"])
    assert sync["cost_usd"] == cost and sync["neurons"] == neurons


# A raw prompt that leaves the analysis header open: the random model never writes its <|message|>.
ANALYSIS_OPEN = {"prompt": "<|start|>user<|message|>hi<|end|><|start|>assistant<|channel|>analysis", "max_tokens": 8, "seed": 1,
                 "temperature": 1.0}


def test_reasoning_read_from_a_header_without_its_message_token_is_counted(server):
    """Hunt round 17 B-F3: a header left without `<|message|>` becomes message text, here reasoning (its channel
    is `analysis`): all 8 tokens (` Mannheim-Net sprak…`) went to it, and `reasoning_tokens` said 0, since they were
    fed while the parser was in the header. On /ai/run (sync and streamed), on /v1/completions (whose text shows the
    message as is) and on /metrics, they are the reasoning message's tokens."""
    server.wait_idle()
    before, run = metrics(server), server.run_url()[len(server.base):]
    raw = httpx.post(server.base + run, json={**ANALYSIS_OPEN, "raw": True}, timeout=60).json()["result"]
    streamed = sse_usage(server, run, {**ANALYSIS_OPEN, "raw": True, "stream": True})
    text = httpx.post(server.base + "/v1/completions", json={"model": MODEL, **ANALYSIS_OPEN}, timeout=60).json()
    assert raw["response"] == "" and text["choices"][0]["text"].startswith(" Mannheim-Net")
    for usage in raw["usage"], streamed, text["usage"]:
        assert usage["completion_tokens"] == usage["completion_tokens_details"]["reasoning_tokens"] == 8
    assert_metered_as(before, metrics(server), [raw["usage"], streamed, text["usage"]])


def settled_metrics(server, generated: int, before: dict[str, float]) -> dict[str, float]:
    """/metrics once the completion tokens metered reach `generated` more than `before` (or after 5 s)."""
    deadline = time.monotonic() + 5
    while True:
        now = metrics(server)
        if now["completion"] - before["completion"] >= generated or time.monotonic() > deadline:
            return now
        time.sleep(0.1)


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"model": MODEL, "prompt": "go on", "max_tokens": LONG, "stream": True}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "go on"}], "max_tokens": LONG, "stream": True}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "go on"}], "max_tokens": LONG, "stream": True,
                              "n": 2}),
])
def test_a_stream_left_early_is_metered_for_every_token_generated(server, path, body):
    server.wait_idle()
    before, generated_before = metrics(server), server.health()["generated_tokens_total"]
    with httpx.stream("POST", server.base + path, json=body, timeout=60) as response:
        for seen, _ in enumerate(response.iter_lines()):
            if seen >= 20:
                break
    stats = server.wait_idle()
    generated = stats["generated_tokens_total"] - generated_before
    assert generated > 5
    assert settled_metrics(server, generated, before)["completion"] - before["completion"] == generated


def test_a_sync_request_left_early_is_metered_for_every_token_generated(server):
    server.wait_idle()
    for seed in range(8):
        before, generated_before = metrics(server), server.health()["generated_tokens_total"]
        try:
            httpx.post(server.base + "/v1/completions", json={"model": MODEL, "prompt": "go on", "max_tokens": LONG, "seed": seed},
                       timeout=0.5)
        except httpx.ReadTimeout:
            break
    else:
        pytest.fail("every request ended before its client's timeout: nothing left early")
    stats = server.wait_idle()
    generated = stats["generated_tokens_total"] - generated_before
    assert generated > 5
    assert settled_metrics(server, generated, before)["completion"] - before["completion"] == generated
