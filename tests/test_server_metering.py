"""/metrics against what the answers reported, through the real server: a request with n choices (or a list of
prompts) is counted as its usage counts it, and a request whose client left is metered for every token the
engine generated for it."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from ossrun import harmony
from ossrun.api.metering import PRICES
from ossrun.model.resolve import resolve_model
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


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory):
    """The demo model, one request at a time, sync requests cut at 3 s: a long stream holds the slot, others queue."""
    server = start_server(resolve_model("demo"), tmp_path_factory.mktemp("data-one-slot"), "--max-num-seqs", "1",
                          "--request-timeout", "3", "--rate-limit", "0")
    try:
        yield server
    finally:
        server.stop()


def test_a_request_that_never_left_the_queue_is_not_metered(one_slot):
    """Hunt round 20 B-F1: a request whose client left while it waited behind another (499), one past
    `--request-timeout` while it waited (408) and a background response cancelled before it ran were each metered for
    their whole prompt (tokens, cost, neurons), and the cancelled response said `input_tokens: 137`. The engine never
    read those prompts: nothing is metered for them, and the response says 0. The request holding the slot, cut once
    they are done, keeps its prompt metered."""
    server = one_slot
    banned = {str(token): -100 for token in (*harmony.STOP_TOKENS, harmony.tokenizer.END, harmony.tokenizer.ENDOFTEXT)}
    holder = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4000, "logit_bias": banned, "stream": True}
    holder_prompt = httpx.post(server.base + "/v1/completions", json={**holder, "max_tokens": 1, "stream": False},
                               timeout=60).json()["usage"]["prompt_tokens"]
    probe = "Tell me about the capital of France. " * 10
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="x", max_retries=0)
    server.wait_idle()
    before = metrics(server)
    with httpx.stream("POST", server.base + "/v1/completions", json=holder, timeout=120) as held:
        assert held.status_code == 200, held.read()
        lines = held.iter_lines()  # kept: a dropped iterator would close the stream
        next(lines)  # the holder runs: the probes wait behind it
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.run_url(), json={"prompt": probe, "max_tokens": 50}, timeout=1.5)
        with pytest.raises(openai.APIStatusError) as timed_out:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": probe}], max_tokens=50)
        assert timed_out.value.status_code == 408
        queued = client.responses.create(model=MODEL, input=probe, background=True, max_output_tokens=50)
        time.sleep(0.5)
        cancelled = client.responses.cancel(queued.id)
        assert cancelled.status == "cancelled" and cancelled.usage.input_tokens == cancelled.usage.output_tokens == 0
        stats = server.health()
        assert stats["running"] == 1 and stats["waiting"] == 0  # the probes left without ever running
        assert delta(before, metrics(server))["prompt"] == 0
    server.wait_idle()
    got = delta(before, settled_metrics(server, 1, before))
    assert got["prompt"] == holder_prompt and got["cached"] == 0
    assert got["cost"] == pytest.approx(PRICES[MODEL].cost(holder_prompt, int(got["completion"]))[0], rel=1e-6)


def gauges(server) -> dict[str, float]:
    names = ("ossrun_running_requests", "ossrun_queue_depth", "ossrun_running_sequences", "ossrun_waiting_sequences")
    lines = (line.rpartition(" ") for line in httpx.get(server.base + "/metrics", timeout=10).text.splitlines())
    return {name: float(value) for name, _, value in lines if name in names}


def test_the_request_gauges_count_requests_and_the_sequence_gauges_their_choices(one_slot):
    """Hunt round 21 A-F1: `ossrun_running_requests` and `ossrun_queue_depth` counted the engine's sequences, so one
    `n=3` request on one slot showed 1 running and 2 queued while nobody waited. A request runs once any of its choices
    runs and is queued while none does; `ossrun_running_sequences` and `ossrun_waiting_sequences` count the choices."""
    server = one_slot
    banned = {str(token): -100 for token in (*harmony.STOP_TOKENS, harmony.tokenizer.END, harmony.tokenizer.ENDOFTEXT)}
    holder = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4000, "logit_bias": banned, "stream": True, "n": 3}
    server.wait_idle()
    with httpx.stream("POST", server.base + "/v1/completions", json=holder, timeout=120) as held:
        assert held.status_code == 200, held.read()
        lines = held.iter_lines()  # kept: a dropped iterator would close the stream
        next(lines)  # one choice holds the only slot, the other two wait
        assert gauges(server) == {"ossrun_running_requests": 1, "ossrun_queue_depth": 0,
                                  "ossrun_running_sequences": 1, "ossrun_waiting_sequences": 2}
    stats = server.wait_idle()
    assert stats["running"] == stats["waiting"] == 0
    assert gauges(server) == dict.fromkeys(("ossrun_running_requests", "ossrun_queue_depth", "ossrun_running_sequences",
                                            "ossrun_waiting_sequences"), 0)
