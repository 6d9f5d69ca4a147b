"""Exact result and stream shapes (spec §3, §5) through the real server and engine on the demo model:
reasoning and answers, tool calls, stops, usage and SSE framing on every surface, sync and streamed.

Nothing is scripted: each frame is what the trained demo weights write at temperature 0, and each
expected count is derived from the answer that came back (its tokens, re-encoded), so a frame that
drops, repeats or misplaces a token fails. The last tests keep the scripted engine
(`tests/api_fakes.py`); their docstrings say why.
"""

from __future__ import annotations

import codecs
import json
import os
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from ossrun import harmony
from ossrun.api.app import AppSettings, build_app
from ossrun.api.metering import PRICES
from tests.api_fakes import FakeEngine
from tests.server_util import MODEL, post_json

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
PARIS = "The capital of France is Paris."
WEATHER_IN = "What is the weather in {}?"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
RESPONSES_TOOLS = [{"type": "function", **TOOLS[0]["function"]}]


@pytest.fixture(scope="module")
def server(demo_server):
    return demo_server


def run_path(server) -> str:
    return server.run_url()[len(server.base):]


def stream(server, path: str, body: dict) -> list:
    """Every `data:` payload in order (JSON objects, and the final "[DONE]")."""
    out = []
    with httpx.stream("POST", server.base + path, json={"temperature": 0, **body, "stream": True},
                      headers=server.headers, timeout=120) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                payload = line[len("data: "):]
                out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def token_count(text: str) -> int:
    return len(harmony.encode(text, allow_special=True))


def completion_text(reasoning: str, answer: str) -> str:
    """The harmony completion behind a reasoned answer, as the model wrote it after `<|start|>assistant`."""
    return (f"<|channel|>analysis<|message|>{reasoning}<|end|><|start|>assistant"
            f"<|channel|>final<|message|>{answer}<|return|>")


def prompt_tokens(body: dict) -> int:
    return len(harmony.render_request(body).token_ids)


# -- Messages (/ai/run) and chat completions ------------------------------------------------------------

def test_messages_sync_separates_reasoning_from_content(server):
    result = post_json(server, run_path(server), {"messages": FRANCE})["result"]
    assert result["object"] == "chat.completion" and result["model"] == MODEL
    choice = result["choices"][0]
    message = choice["message"]
    assert message["role"] == "assistant" and message["content"] == PARIS
    assert "France" in message["reasoning_content"]
    assert message["tool_calls"] == [] and choice["finish_reason"] == "stop"
    usage = result["usage"]
    assert usage["prompt_tokens"] == prompt_tokens({"messages": FRANCE})
    assert usage["completion_tokens"] == token_count(completion_text(message["reasoning_content"], PARIS))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == token_count(message["reasoning_content"])
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] <= usage["prompt_tokens"]


def test_messages_stream_frames_in_order(server):
    sync = post_json(server, run_path(server), {"messages": FRANCE})["result"]
    chunks = stream(server, run_path(server), {"messages": FRANCE})
    assert chunks[-1] == "[DONE]"
    chunks = chunks[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    reasoning = [d["reasoning_content"] for d in deltas if "reasoning_content" in d]
    content = [d["content"] for d in deltas[1:] if "content" in d]
    assert "".join(reasoning) == sync["choices"][0]["message"]["reasoning_content"] and "".join(content) == PARIS
    # reasoning strictly before the answer, one token per frame
    first_content = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert all("content" not in d for d in deltas[1:first_content])
    assert not any("reasoning_content" in d for d in deltas[first_content:])
    assert len(reasoning) == sync["usage"]["completion_tokens_details"]["reasoning_tokens"]
    assert len(content) == token_count(PARIS)
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == "stop" and not any(finish[:-1])
    usage = chunks[-1]  # /ai/run always ends with the usage chunk
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == sync["usage"]["completion_tokens"]
    # The other chunks have no `usage` key: Cloudflare's LangChain package (langchain-cloudflare 0.4) reads a present
    # one as an object, and a `null` on each chunk (OpenAI's convention, which this client did not ask for) broke it.
    assert all("usage" not in c for c in chunks[:-1])
    asked = stream(server, run_path(server), {"messages": FRANCE, "stream_options": {"include_usage": True}})[:-1]
    assert asked[-1]["usage"] is not None and all("usage" in c and c["usage"] is None for c in asked[:-1])


@pytest.mark.parametrize("accept, streamed", [("application/json", False), ("application/json, text/event-stream", True),
                                              ("text/event-stream", True), ("*/*", True), (None, True)])
def test_a_client_that_accepts_only_json_gets_json_for_stream_true(server, accept, streamed):
    """Hunt round 13: Cloudflare's SDKs send `Accept: application/json` on every call, and the hosted API answers their
    `stream: true` with the JSON envelope; on ossrun `client.ai.run(..., stream=True)` raised (Python: 'str' object has
    no attribute 'result') or gave undefined (Node) on the stream. A client that admits event streams gets one."""
    headers = {**server.headers, **({"Accept": accept} if accept else {})}
    request = httpx.Request("POST", server.run_url(), json={"prompt": "What is the capital of France?", "stream": True,
                                                             "temperature": 0}, headers=headers)
    assert ("accept" in request.headers) == (accept is not None)  # a bare Request has no default Accept
    with httpx.Client(timeout=120) as client:
        response = client.send(request)
    assert response.status_code == 200
    if streamed:
        assert response.headers["content-type"].startswith("text/event-stream") and response.text.rstrip().endswith("[DONE]")
    else:
        assert response.headers["content-type"] == "application/json"
        assert response.json()["success"] and response.json()["result"]["response"] == PARIS


# U+1F99C (a parrot) is three o200k tokens, none a whole character: 4103 = F0 9F, 99 = A6, 250 = 9C. A bias on
# them makes the demo model write characters split over tokens, as the real gpt-oss often does for CJK and emoji.
SPLIT_CHARACTER_BIAS = {"4103": 26, "99": 26, "250": 26}


def test_reasoning_tokens_count_tokens_that_hold_part_of_a_character(server):
    """Every token of the reasoning message is a reasoning token, though a split character shows no text
    until its last piece (they were counted only when they produced text: 21-26 of 37)."""
    body = {"max_tokens": 40, "logit_bias": SPLIT_CHARACTER_BIAS, "temperature": 1, "seed": 2}  # sampled: pieces in order
    chat = post_json(server, "/v1/chat/completions", {"model": MODEL, "messages": FRANCE, **body})
    prompt = harmony.decode(harmony.render_request({"messages": FRANCE}).token_ids)
    raw = post_json(server, "/v1/completions", {"model": MODEL, "prompt": prompt, "logprobs": 0, **body})
    tokens = raw["choices"][0]["logprobs"]["tokens"]
    assert tokens[:3] == ["<|channel|>", "analysis", "<|message|>"]
    reasoning = tokens[3:tokens.index("<|end|>")] if "<|end|>" in tokens else tokens[3:]
    shown = chat["choices"][0]["message"]["reasoning_content"]
    assert any(c == "\ufffd" or ord(c) > 0xFFFF for c in shown), "the bias no longer splits characters in the reasoning"
    assert chat["usage"]["completion_tokens_details"]["reasoning_tokens"] == len(reasoning)
    # /v1/completions shows the text as is, and counts the same tokens as reasoning (it counted none).
    assert raw["usage"]["completion_tokens_details"]["reasoning_tokens"] == len(reasoning)


def test_completions_logprobs_spell_split_characters_as_bytes(server):
    """A token holding part of a character is `bytes:\\xf0\\x9f` (OpenAI's legacy spelling), so the alternatives
    keep distinct keys, and `text_offset` indexes the text: the pieces of one character share its offset.
    Streamed chunks carry the same entries and offsets."""
    for seed in range(1, 41):  # sampled, so that the pieces come in every order; some seed spells a whole parrot
        body = {"model": MODEL, "prompt": "x", "max_tokens": 6, "logprobs": 2, "temperature": 1, "seed": seed,
                "logit_bias": {"4103": 100, "99": 100, "250": 100}}
        choice = post_json(server, "/v1/completions", body)["choices"][0]
        logprobs, text = choice["logprobs"], choice["text"]
        if "\U0001F99C" in text:
            break
    assert "\U0001F99C" in text
    spelled = b"".join(bytes.fromhex(t[len("bytes:"):].replace("\\x", "")) if t.startswith("bytes:") else t.encode()
                       for t in logprobs["tokens"])
    # A cut (max_tokens) inside a character drops its incomplete bytes from the text, not from the entries (B-F2).
    assert codecs.getincrementaldecoder("utf-8")("replace").decode(spelled) == text
    # Distinct keys: the 2 best and the sampled token (OpenAI's legacy completions add it when it is not among them).
    assert all(len(top) == 2 + (token not in list(top)[:2]) and token in top
               for token, top in zip(logprobs["tokens"], logprobs["top_logprobs"]))
    parrot = text.index("\U0001F99C")
    assert logprobs["text_offset"][parrot:parrot + 4] == [parrot] * 3 + [parrot + 1]
    chunks = [c["choices"][0]["logprobs"] for c in stream(server, "/v1/completions", body)[:-1]
              if c["choices"] and c["choices"][0]["logprobs"]]
    assert [t for c in chunks for t in c["tokens"]] == logprobs["tokens"]
    assert [o for c in chunks for o in c["text_offset"]] == logprobs["text_offset"]


def test_chat_stream_usage_chunk_only_when_asked(server):
    body = {"model": MODEL, "messages": FRANCE}
    sync = post_json(server, "/v1/chat/completions", body)
    assert sync["object"] == "chat.completion" and sync["choices"][0]["message"]["content"] == PARIS
    without = stream(server, "/v1/chat/completions", body)
    assert without[-1] == "[DONE]" and all("usage" not in c or c["usage"] is None for c in without[:-1])
    with_usage = stream(server, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    assert with_usage[-1] == "[DONE]" and with_usage[-2]["choices"] == []
    assert with_usage[-2]["usage"]["completion_tokens"] == sync["usage"]["completion_tokens"]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in with_usage[:-2]) == PARIS
    # OpenAI: "All other chunks will also include a usage field, but with a null value" (before: no key at all)
    assert all("usage" in c and c["usage"] is None for c in with_usage[:-2])


def test_tool_call_sync_and_stream(server):
    body = {"messages": [{"role": "user", "content": WEATHER_IN.format("Paris")}], "tools": TOOLS}
    choice = post_json(server, run_path(server), body)["result"]["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert "Paris" in choice["message"]["reasoning_content"]
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("chatcmpl-tool-")
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}

    chunks = stream(server, run_path(server), body)[:-1]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    start = calls[0]
    assert start["index"] == 0 and start["type"] == "function" and start["id"].startswith("chatcmpl-tool-")
    assert start["function"] == {"name": "get_weather", "arguments": ""}
    assert all(set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"} for tc in calls[1:])
    assert len(calls) > 3  # the arguments arrive token by token
    assert "".join(tc["function"]["arguments"] for tc in calls) == call["function"]["arguments"]
    assert not "".join(d.get("content") or "" for d in deltas)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_forced_tool_call_prefills_the_call_header(server, choice):
    """A named (or the only `required`) tool: the prompt ends inside the call, so content cannot carry it and
    the model writes only the arguments (the prompt is longer by exactly the header, the completion holds no reasoning)."""
    messages = [{"role": "user", "content": WEATHER_IN.format("Rome")}]
    body = {"model": MODEL, "messages": messages, "tools": TOOLS, "tool_choice": choice}
    reply = post_json(server, "/v1/chat/completions", body)
    header = harmony.tool_call_prefix("get_weather")
    assert reply["usage"]["prompt_tokens"] == prompt_tokens({"messages": messages, "tools": TOOLS}) + len(header)
    message = reply["choices"][0]["message"]
    assert message["content"] is None and reply["choices"][0]["finish_reason"] == "tool_calls"
    assert not message.get("reasoning_content")
    (call,) = message["tool_calls"]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Rome"}
    assert reply["usage"]["completion_tokens"] == token_count(call["function"]["arguments"] + "<|call|>")
    chunks = stream(server, "/v1/chat/completions", body)[:-1]
    calls = [tc for c in chunks if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "get_weather"
    assert "".join(tc["function"]["arguments"] for tc in calls) == call["function"]["arguments"]


def test_forced_tool_must_exist(server):
    body = {"model": MODEL, "messages": FRANCE, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}
    assert "nope" in post_json(server, "/v1/chat/completions", body, status=400)["error"]["message"]


def test_length_finish_when_max_tokens_runs_out(server):
    result = post_json(server, run_path(server), {"messages": FRANCE, "max_tokens": 3})["result"]
    assert result["choices"][0]["finish_reason"] == "length" and result["usage"]["completion_tokens"] == 3
    assert result["choices"][0]["message"]["content"] is None or result["choices"][0]["message"]["content"] == ""


def test_logprobs_cover_answer_tokens(server):
    body = {"model": MODEL, "messages": FRANCE, "logprobs": True, "top_logprobs": 2}
    content = post_json(server, "/v1/chat/completions", body)["choices"][0]["logprobs"]["content"]
    assert "".join(entry["token"] for entry in content) == PARIS and len(content) == token_count(PARIS)
    for entry in content:
        first, second = entry["top_logprobs"]
        # temperature 0: the chosen token is the most likely one
        assert first["token"] == entry["token"] and first["logprob"] == pytest.approx(entry["logprob"])
        assert 0 >= first["logprob"] >= second["logprob"] and second["token"] != first["token"]
        assert bytes(entry["bytes"]).decode() == entry["token"]


# -- Prompt ----------------------------------------------------------------------------------------------

def test_prompt_sync_and_stream(server):
    question = "What is the capital of France?"
    result = post_json(server, run_path(server), {"prompt": question})["result"]
    assert result["response"] == PARIS and "tool_calls" not in result
    assert result["usage"]["prompt_tokens"] == prompt_tokens({"prompt": question})
    frames = stream(server, run_path(server), {"prompt": question})
    assert frames[-1] == "[DONE]"
    assert "".join(f["response"] for f in frames[:-1]) == PARIS
    assert frames[-2]["response"] == "" and frames[-2]["usage"] == result["usage"]
    assert all(set(f) == {"response"} for f in frames[:-2]) and len(frames) - 2 == token_count(PARIS)

    body = {"prompt": WEATHER_IN.format("Paris"), "tools": TOOLS}
    result = post_json(server, run_path(server), body)["result"]
    assert result["tool_calls"] == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert stream(server, run_path(server), body)[-2]["tool_calls"] == result["tool_calls"]


# -- Responses -----------------------------------------------------------------------------------------

def test_responses_sync_items(server):
    result = post_json(server, run_path(server), {"input": "What is the capital of France?"})["result"]
    assert result["object"] == "response" and result["status"] == "completed"
    reasoning, message = result["output"]
    assert reasoning["type"] == "reasoning" and "France" in reasoning["content"][0]["text"]
    assert reasoning["content"] == [{"type": "reasoning_text", "text": reasoning["content"][0]["text"]}]
    assert message["type"] == "message" and message["role"] == "assistant" and message["status"] == "completed"
    assert message["content"] == [{"type": "output_text", "text": PARIS, "annotations": [], "logprobs": []}]
    assert result["output_text"] == PARIS
    usage = result["usage"]
    assert usage["output_tokens"] == token_count(completion_text(reasoning["content"][0]["text"], PARIS))
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_responses_stream_event_sequence(server):
    events = stream(server, "/v1/responses", {"model": MODEL, "input": "What is the capital of France?"})
    assert events[-1] == "[DONE]"
    events = events[:-1]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    collapsed = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]
    assert collapsed == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta", "response.reasoning_text.done",
        "response.content_part.done", "response.output_item.done",  # the reasoning item's part too (before: none)
        "response.output_item.added", "response.content_part.added", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done",
        "response.completed",
    ]
    parts = [(e["type"], e["part"]["type"]) for e in events if e["type"].startswith("response.content_part.")]
    assert parts == [("response.content_part.added", "reasoning_text"), ("response.content_part.done", "reasoning_text"),
                     ("response.content_part.added", "output_text"), ("response.content_part.done", "output_text")]
    assert events[0]["response"]["status"] == "in_progress"
    text = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert "".join(text) == PARIS and len(text) == token_count(PARIS)
    for e in events:
        if e["type"].endswith(".delta") or e["type"].endswith("_text.done"):
            assert e["item_id"] and e["content_index"] == 0 and e["output_index"] in (0, 1)
    thought = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    assert next(e["text"] for e in events if e["type"] == "response.reasoning_text.done") == thought
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["output_text"] == PARIS
    assert [item["type"] for item in final["output"]] == ["reasoning", "message"]
    assert final["output"][0]["content"][0]["text"] == thought
    added = [e["item"]["id"] for e in events if e["type"] == "response.output_item.added"]
    assert added == [item["id"] for item in final["output"]]


def test_responses_stream_function_call(server):
    body = {"model": MODEL, "input": WEATHER_IN.format("Paris"), "tools": RESPONSES_TOOLS}
    events = stream(server, "/v1/responses", body)[:-1]
    args = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert len(args) > 3 and json.loads("".join(args)) == {"city": "Paris"}
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert done["arguments"] == "".join(args)
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.completed"
    call = final["output"][-1]
    assert call["type"] == "function_call" and call["name"] == "get_weather" and call["arguments"] == done["arguments"]
    assert call["call_id"] and call["status"] == "completed"


def test_responses_incomplete_on_length(server):
    body = {"model": MODEL, "input": "What is the capital of France?", "max_output_tokens": 2}
    result = post_json(server, "/v1/responses", body)
    assert result["status"] == "incomplete" and result["incomplete_details"] == {"reason": "max_output_tokens"}
    assert result["usage"]["output_tokens"] == 2
    events = stream(server, "/v1/responses", body)
    assert events[-2]["type"] == "response.incomplete" and events[-2]["response"]["status"] == "incomplete"


def test_a_cut_off_function_call_is_incomplete(server):
    body = {"model": MODEL, "input": WEATHER_IN.format("Paris"), "tools": RESPONSES_TOOLS}
    whole = post_json(server, "/v1/responses", body)
    assert whole["status"] == "completed" and whole["output"][-1]["status"] == "completed"
    cut = {**body, "max_output_tokens": whole["usage"]["output_tokens"] - 3}  # inside the arguments
    response = post_json(server, "/v1/responses", cut)
    assert response["status"] == "incomplete"
    assert [(i["type"], i.get("status")) for i in response["output"]][-1] == ("function_call", "incomplete")
    events = [f for f in stream(server, "/v1/responses", cut) if f != "[DONE]"]
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert done[-1]["type"] == "function_call" and done[-1]["status"] == "incomplete"
    assert events[-1]["response"]["output"][-1]["status"] == "incomplete"


def test_previous_response_id_continues_the_conversation(server):
    """The tool's result is sent alone; only the stored first turn says which city it was about."""
    first = post_json(server, "/v1/responses", {"model": MODEL, "input": WEATHER_IN.format("Tokyo"), "tools": RESPONSES_TOOLS})
    call = first["output"][-1]
    assert call["type"] == "function_call" and json.loads(call["arguments"]) == {"city": "Tokyo"}
    result = {"type": "function_call_output", "call_id": call["call_id"],
              "output": json.dumps({"temperature_c": 21, "condition": "cloudy"})}
    second = post_json(server, "/v1/responses", {"model": MODEL, "input": [result], "tools": RESPONSES_TOOLS,
                                            "previous_response_id": first["id"]})
    assert second["output_text"] == "It is 21°C and cloudy in Tokyo."
    assert second["usage"]["input_tokens"] > first["usage"]["input_tokens"] + first["usage"]["output_tokens"]
    # a streamed response can continue it too, and a continuation can be continued (the demo model was not
    # trained on such long histories: what it answers is not checked, only that the history is in the prompt)
    events = stream(server, run_path(server), {"input": "What is the capital of France?", "tools": RESPONSES_TOOLS,
                                               "previous_response_id": second["id"]})
    third = events[-2]["response"]
    assert third["status"] == "completed" and third["usage"]["input_tokens"] > second["usage"]["input_tokens"]
    fourth = post_json(server, "/v1/responses", {"model": MODEL, "input": "Hello", "tools": RESPONSES_TOOLS,
                                            "previous_response_id": third["id"]})
    assert fourth["status"] == "completed" and fourth["usage"]["input_tokens"] > third["usage"]["input_tokens"]


def test_previous_response_id_unknown_or_not_stored(server):
    unknown = post_json(server, "/v1/responses", {"model": MODEL, "input": "x", "previous_response_id": "resp-nope"}, status=400)
    assert unknown["error"]["code"] == "5006" and "previous_response_id" in unknown["error"]["message"]
    private = post_json(server, "/v1/responses", {"model": MODEL, "input": "Hello", "store": False})
    post_json(server, "/v1/responses", {"model": MODEL, "input": "x", "previous_response_id": private["id"]}, status=400)


def test_usage_carries_cost_on_every_result(server):
    bodies = [(run_path(server), {"prompt": "Hello"}), (run_path(server), {"messages": FRANCE}),
              ("/v1/chat/completions", {"model": MODEL, "messages": FRANCE})]
    for path, body in bodies:
        reply = post_json(server, path, body)
        usage = (reply.get("result") or reply)["usage"]
        usd, neurons = PRICES[MODEL].cost(usage["prompt_tokens"], usage["completion_tokens"])
        assert usage["cost_usd"] == usd and usage["neurons"] == neurons and usage["completion_tokens"] > 10
    response = post_json(server, "/v1/responses", {"model": MODEL, "input": "Hello"})
    assert response["usage"]["cost_usd"] == PRICES[MODEL].cost(response["usage"]["input_tokens"], response["usage"]["output_tokens"])[0]
    text = httpx.get(server.base + "/metrics", timeout=10).text
    assert 'ossrun_tokens_total{kind="prompt"}' in text and "ossrun_neurons_total" in text
    assert "ossrun_queue_depth" in text and "ossrun_request_seconds_bucket" in text


# -- the official client over the real frames ----------------------------------------------------------

def test_openai_sdk_parses_our_frames(server):
    sdk = openai.OpenAI(base_url=server.base + "/v1", api_key=server.token)
    reply = sdk.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0)
    assert reply.choices[0].message.content == PARIS
    chunks = list(sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": WEATHER_IN.format("Lima")}],
                                              tools=TOOLS, temperature=0, stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather"
    assert json.loads("".join(tc.function.arguments for tc in calls)) == {"city": "Lima"}
    events = list(sdk.responses.create(model=MODEL, input=WEATHER_IN.format("Lima"), tools=RESPONSES_TOOLS,
                                       temperature=0, stream=True))
    assert events[-1].type == "response.completed"
    assert events[-1].response.output[-1].type == "function_call"


def test_chat_reasoning_also_under_the_name_reasoning(server):
    """OpenAI's Agents SDK (chat-completions model) and vLLM's clients read `reasoning`, the contract names
    `reasoning_content`: both carry the same text, sync and streamed (hunt_js M2: the Agents SDK saw no reasoning)."""
    sdk = openai.OpenAI(base_url=server.base + "/v1", api_key=server.token)
    message = sdk.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0).choices[0].message
    assert "France" in message.reasoning_content and message.reasoning == message.reasoning_content
    deltas = [c.choices[0].delta for c in sdk.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, stream=True)
              if c.choices]
    streamed = [(getattr(d, "reasoning_content", None), getattr(d, "reasoning", None)) for d in deltas]
    assert all(a == b for a, b in streamed)
    assert "".join(a or "" for a, _ in streamed) == message.reasoning
    run = post_json(server, run_path(server), {"messages": FRANCE, "temperature": 0})["result"]["choices"][0]["message"]
    assert run["reasoning"] == run["reasoning_content"] == message.reasoning


# -- /v1/completions: the raw harmony text ------------------------------------------------------------

def test_completions_return_every_token(server):
    """A rendered harmony prompt sent raw: the text is the completion as the model wrote it, special tokens spelled."""
    prompt = harmony.decode(harmony.render_request({"messages": FRANCE}).token_ids)
    reply = post_json(server, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 200})
    assert reply["object"] == "text_completion" and reply["choices"][0]["finish_reason"] == "stop"
    text = reply["choices"][0]["text"]
    reasoning = text[len("<|channel|>analysis<|message|>"):text.index("<|end|>")]
    assert text == completion_text(reasoning, PARIS)[:-len("<|return|>")] and "France" in reasoning
    assert reply["usage"]["completion_tokens"] == token_count(text) + 1  # and the <|return|> that stopped it


def test_completions_stream_equals_sync(server):
    prompt = harmony.decode(harmony.render_request({"messages": FRANCE}).token_ids)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 200}
    sync = post_json(server, "/v1/completions", body)
    chunks = stream(server, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert chunks[-1] == "[DONE]" and all(c["object"] == "text_completion" for c in chunks[:-1])
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1] if c["choices"]) == sync["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1] if c["choices"]][-1] == "stop"
    assert chunks[-2]["usage"]["completion_tokens"] == sync["usage"]["completion_tokens"]
    assert all("usage" in c and c["usage"] is None for c in chunks[:-2])  # as on chat
    sdk = openai.OpenAI(base_url=server.base + "/v1", api_key=server.token)
    text = "".join(c.choices[0].text for c in sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=3,
                                                                      temperature=0, stream=True))
    assert text == harmony.decode(harmony.encode(sync["choices"][0]["text"], allow_special=True)[:3])


# -- what the trained model cannot be made to do: the scripted engine -------------------------------

SCRIPTED_RUN = f"/client/v4/accounts/acct/ai/run/{MODEL}"


def scripted_stream(client: TestClient, body: dict) -> list[str]:
    """The raw `data:` payloads of a streamed /ai/run answer from the in-process app."""
    with client.stream("POST", SCRIPTED_RUN, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine("<|channel|>analysis<|message|>Let me think.<|end|><|start|>assistant<|channel|>final<|message|>Hi<|return|>")


@pytest.fixture
def client(engine, tmp_path):
    with TestClient(build_app(engine, AppSettings(data_dir=tmp_path, rate_limit_per_minute=0))) as c:
        yield c


@pytest.mark.parametrize("script", [
    "<|message|><|message|>oops<|end|><|end|>",
    "<|start|><|start|>assistant<|channel|>final<|constrain|><|return|>",
    "<|channel|>commentary to=functions.x <|constrain|>json<|message|>{not json<|return|>",
    "<|call|>",
    "plain text with no header at all",
])
def test_malformed_model_output_is_never_a_500(client, engine, script):
    """Scripted: the trained model writes well-formed harmony at every temperature we can pin, so broken
    headers, stray stop tokens and unparsable arguments can only be produced on demand by a script."""
    engine.script = script
    for body in ({"prompt": "x"}, {"messages": FRANCE}, {"input": "x"}):
        assert client.post(SCRIPTED_RUN, json=body).status_code == 200
        assert scripted_stream(client, body)[-1] == "[DONE]"


def test_engine_error_mid_stream_ends_the_stream_cleanly(client, engine):
    """Scripted: the real engine fails mid-generation only on a bug or a dead device; the script fails on cue."""
    engine.fail_after = 3
    payloads = scripted_stream(client, {"messages": FRANCE})
    assert payloads[-1] == "[DONE]" and "error" in json.loads(payloads[-2])
    assert client.post(SCRIPTED_RUN, json={"messages": FRANCE}).status_code == 500  # sync: the envelope, not a crash
    assert client.post(SCRIPTED_RUN, json={"messages": FRANCE}).json()["success"] is False


def test_a_batch_item_that_fails_mid_generation_reports_the_tokens_it_was_billed(client, engine):
    """Scripted, for the same reason. Before: a failed item's usage was 0 and left out of the batch's total, while
    /metrics billed every token it had generated."""
    import time

    def billed() -> float:
        lines = client.get("/metrics").text.splitlines()
        return sum(float(line.rpartition(" ")[2]) for line in lines if line.startswith('ossrun_tokens_total{kind="completion"}'))

    engine.fail_after = 3
    before = billed()
    request_id = client.post(SCRIPTED_RUN, json={"requests": [{"prompt": "x"}, {"messages": FRANCE}]}).json()["result"]["request_id"]
    for _ in range(200):
        polled = client.post(SCRIPTED_RUN, json={"request_id": request_id}).json()["result"]
        if polled["status"] == "done":
            break
        time.sleep(0.05)
    items = polled["responses"]
    assert [(i["success"], i["errors"][0]["code"]) for i in items] == [(False, 3000)] * 2
    assert [i["usage"]["completion_tokens"] for i in items] == [3, 3] and all(i["usage"]["prompt_tokens"] > 0 for i in items)
    assert polled["usage"] == {key: sum(i["usage"][key] for i in items) for key in ("prompt_tokens", "completion_tokens", "total_tokens")}
    assert billed() - before == 6


@pytest.mark.parametrize("path,body", [
    (SCRIPTED_RUN, {"prompt": "x"}),
    (SCRIPTED_RUN, {"messages": FRANCE}),
    (SCRIPTED_RUN, {"input": "x"}),
    ("/v1/chat/completions", {"model": MODEL, "messages": FRANCE}),
    ("/v1/chat/completions", {"model": MODEL, "messages": FRANCE, "n": 2}),  # the merged stream of n choices
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 2}),
], ids=["prompt", "messages", "responses", "v1-chat", "v1-chat-n2", "v1-completions-n2"])
def test_line_separators_in_generated_text_stay_in_their_frame(client, engine, path, body):
    """Scripted: the demo model never writes U+2028 on demand. httpx's `iter_lines` splits as `str.splitlines` does,
    so a raw U+2028, U+2029 or U+0085 in a frame would cut it in two and the JSON would not parse."""
    engine.script = "<|channel|>final<|message|>a\u2028b\u2029c\x85d<|return|>"
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith(("data: ", "event: ")) for line in lines), lines
    payloads = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]
    parsed = json.dumps(payloads, ensure_ascii=False)
    assert all(char in parsed for char in "\u2028\u2029\x85")  # the text itself, unchanged once parsed


@pytest.fixture(scope="module")
def one_at_a_time(tmp_path_factory):
    """The demo model serving one request at a time, a stream silent for 0.2 s getting a keep-alive."""
    from ossrun.model.resolve import resolve_model
    from tests.server_util import start_server

    os.environ["OSSRUN_SSE_KEEPALIVE_S"] = "0.2"
    try:
        s = start_server(resolve_model("demo"), tmp_path_factory.mktemp("keepalive"), "--max-num-seqs", "1", "--rate-limit", "0")
    finally:
        del os.environ["OSSRUN_SSE_KEEPALIVE_S"]
    yield s
    s.stop()


def test_a_silent_stream_gets_keep_alive_comments_that_clients_skip(one_at_a_time):
    """Hunt round 10, on the 20b on 2 cores: a 4k-token prompt streamed its role chunk, then nothing for 113 s until
    the first token; the OpenAI SDK with `timeout=60` raised at 60 s (and httpx's default 5 s timeout at 5 s). Now a
    stream that has sent nothing for a while sends an SSE comment, which every SSE parser skips. Here a stream waits
    its turn behind another (one request at a time) long enough for several; the SDK reads it as if they were not there."""
    server = one_at_a_time
    body = {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0}
    alone = post_json(server, "/v1/chat/completions", body)["choices"][0]["message"]["content"]
    # A raw completion that cannot end (its stop tokens banned) holds the only slot for its 600 tokens.
    banned = {str(token): -100 for token in (*harmony.STOP_TOKENS, harmony.tokenizer.END, harmony.tokenizer.ENDOFTEXT)}
    holder = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 600, "logit_bias": banned, "stream": True}
    with httpx.stream("POST", f"{server.base}/v1/completions", json=holder, headers=server.headers, timeout=120):
        time.sleep(0.3)  # the long one holds the only slot
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="x", max_retries=0)
        raw = []
        with httpx.stream("POST", f"{server.base}/v1/chat/completions", json={**body, "stream": True}, headers=server.headers,
                          timeout=120) as waiting:
            for line in waiting.iter_lines():
                raw.append(line)
        streamed = client.chat.completions.create(**body, stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    comments = [line for line in raw if line.startswith(":")]
    assert comments and set(comments) == {": keep-alive"}
    first_data = next(i for i, line in enumerate(raw) if line.startswith("data: "))
    assert any(line.startswith(":") for line in raw[first_data:])  # after the opening chunk, while it waited
    assert text == alone and [line for line in raw if line][-1] == "data: [DONE]"


def _chat_both(client: TestClient, body: dict) -> tuple[dict, list[dict]]:
    """A scripted chat completion, sync and streamed (the streamed chunks, `[DONE]` left out)."""
    body = {"model": MODEL, "messages": FRANCE, **body}
    sync = client.post("/v1/chat/completions", json=body).json()
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    return sync, [c for c in chunks if c["choices"]]


def _streamed(chunks: list[dict], field: str) -> str:
    return "".join(c["choices"][0]["delta"].get(field) or "" for c in chunks)


def test_messages_of_one_field_are_joined_with_a_newline(client, engine):
    """Scripted: the demo model writes one message per channel. Before: a preamble and the final answer, or two
    analysis messages, were glued (`'Let me check.Answer.'`); vLLM's gpt-oss parsing joins them with "\\n" (hunt
    round 21 B-F4). The streamed deltas still add up to the sync text; an empty message adds no separator."""
    engine.script = ("<|channel|>analysis<|message|>First thought.<|end|><|start|>assistant<|channel|>analysis<|message|>"
                     "<|end|><|start|>assistant<|channel|>analysis<|message|>Second thought.<|end|><|start|>assistant"
                     "<|channel|>commentary<|message|>Let me check.<|end|><|start|>assistant<|channel|>final<|message|>"
                     "Answer.<|return|>")
    sync, chunks = _chat_both(client, {})
    message = sync["choices"][0]["message"]
    assert message["content"] == "Let me check.\nAnswer." == _streamed(chunks, "content")
    assert message["reasoning_content"] == "First thought.\nSecond thought." == _streamed(chunks, "reasoning_content")
    assert client.post(SCRIPTED_RUN, json={"prompt": "x"}).json()["result"]["response"] == "Let me check.\nAnswer."
    frames = scripted_stream(client, {"prompt": "x"})
    assert "".join(json.loads(f).get("response", "") for f in frames[:-1]) == "Let me check.\nAnswer."
    output = client.post("/v1/responses", json={"model": MODEL, "input": "x"}).json()["output"]
    assert [item["content"][0]["text"] for item in output if item["type"] == "message"] == ["Let me check.", "Answer."]


@pytest.mark.parametrize("stop, content", [("check.\nAns", "Let me "), ("\nAnswer", "Let me check."), ("k.\n", "Let me chec")])
def test_a_stop_string_spanning_the_join_of_two_messages_cuts_there(client, engine, stop, content):
    """Scripted, as above. Before: the matcher was reset at each message's end, so a stop spanning the join of a
    preamble and the answer was returned to the client (hunt round 21 B-F1). It is matched over the text the client
    gets, the "\\n" between the messages included."""
    engine.script = ("<|channel|>analysis<|message|>plan<|end|><|start|>assistant<|channel|>commentary<|message|>"
                     "Let me check.<|end|><|start|>assistant<|channel|>final<|message|>Answer.<|return|>")
    sync, chunks = _chat_both(client, {"stop": stop})
    choice = sync["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"], choice["stop_reason"]) == (content, "stop", stop)
    assert _streamed(chunks, "content") == content
    assert [c["choices"][0].get("stop_reason") for c in chunks if c["choices"][0]["finish_reason"]] == [stop]
    assert client.post(SCRIPTED_RUN, json={"prompt": "x", "stop": stop}).json()["result"]["response"] == content
    frames = scripted_stream(client, {"messages": FRANCE, "stop": stop})
    assert "".join(json.loads(f)["choices"][0]["delta"].get("content") or "" for f in frames[:-1]
                   if json.loads(f).get("choices")) == content


def test_a_finish_inside_a_character_drops_its_incomplete_bytes_on_every_route(client, engine):
    """Scripted: the split `' 🎉'` (b' \\xf0\\x9f\\x8e' + b'\\x89') must fall exactly at max_tokens. Before: the pieces
    became U+FFFD (`'Party �'`), while a failure at the same token already dropped them (hunt round 21 B-F2)."""
    head = "<|channel|>analysis<|message|>plan<|end|><|start|>assistant<|channel|>final<|message|>Party"
    engine.script = head + " 🎉🎉 time<|return|>"
    cut = token_count(head) + 1
    sync, chunks = _chat_both(client, {"max_tokens": cut})
    assert (sync["choices"][0]["message"]["content"], sync["choices"][0]["finish_reason"]) == ("Party ", "length")
    assert _streamed(chunks, "content") == "Party " and sync["usage"]["completion_tokens"] == cut
    assert client.post(SCRIPTED_RUN, json={"prompt": "x", "max_tokens": cut}).json()["result"]["response"] == "Party "
    response = client.post("/v1/responses", json={"model": MODEL, "input": "x", "max_output_tokens": cut}).json()
    assert response["output_text"] == "Party "
    text = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": cut}).json()["choices"][0]["text"]
    assert text.endswith("Party ")
    call = ('<|channel|>analysis<|message|>plan<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather '
            '<|constrain|>json<|message|>{"city":"Bogotá')
    engine.script = call + ' 🎉🎉"}<|call|>'
    sync, chunks = _chat_both(client, {"tools": TOOLS, "max_tokens": token_count(call) + 1})
    assert sync["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == '{"city":"Bogotá '
    assert "".join(c["choices"][0]["delta"]["tool_calls"][0]["function"].get("arguments", "")
                   for c in chunks if c["choices"][0]["delta"].get("tool_calls")) == '{"city":"Bogotá '


def test_logprobs_of_text_held_over_a_message_end_are_listed(client, engine):
    """Scripted. A stop string's partial match held the preamble's tail (" check.") over the message's end; the
    end's special token dropped the waiting entries, so the answer read 'Let me check.\\nAnswer.' but its logprobs
    spelled 'Let meAnswer.' (found merging hunt round 21 B-F1). Every character the client gets but the joining
    "\\n" is spelled by the entries, sync and streamed."""
    engine.script = ("<|channel|>commentary<|message|>Let me check.<|end|><|start|>assistant<|channel|>final"
                     "<|message|>Answer.<|return|>")
    sync, chunks = _chat_both(client, {"stop": "check.\nX", "logprobs": True})
    content = sync["choices"][0]["message"]["content"]
    assert content == "Let me check.\nAnswer."
    assert "".join(e["token"] for e in sync["choices"][0]["logprobs"]["content"]) == content.replace("\n", "")
    streamed = [e for c in chunks if c["choices"][0].get("logprobs") for e in c["choices"][0]["logprobs"]["content"]]
    assert "".join(e["token"] for e in streamed) == content.replace("\n", "")
