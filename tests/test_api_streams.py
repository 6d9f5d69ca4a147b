"""Exact result and stream shapes (spec §3, §5) on a scripted engine: reasoning, answers and tool calls.

The real-server tests run the tiny random model, whose gibberish rarely contains a channel header
or a tool call; here the engine "generates" chosen harmony text, so every frame can be checked.
"""

from __future__ import annotations

import json

import openai
import pytest
from fastapi.testclient import TestClient

from ossrun import harmony
from ossrun.api.app import AppSettings, build_app
from tests.api_fakes import FakeEngine

MODEL = "@cf/openai/gpt-oss-20b"
RUN = f"/client/v4/accounts/acct/ai/run/{MODEL}"
THINK_AND_ANSWER = "<|channel|>analysis<|message|>Let me think.<|end|><|start|>assistant<|channel|>final<|message|>Hello world<|return|>"
TOOL_CALL = ("<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather "
             "<|constrain|>json<|message|>{\"city\":\"Paris\"}<|call|>")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(THINK_AND_ANSWER)


@pytest.fixture
def client(engine, tmp_path):
    with TestClient(build_app(engine, AppSettings(data_dir=tmp_path, rate_limit_per_minute=0))) as c:
        yield c


def frames(response) -> list:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def stream(client, url: str, body: dict) -> list:
    with client.stream("POST", url, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return frames(response)


def token_count(text: str) -> int:
    return len(harmony.encode(text, allow_special=True))


# -- Messages (/ai/run) and chat completions ------------------------------------------------------------

def test_messages_sync_separates_reasoning_from_content(client):
    result = client.post(RUN, json={"messages": USER}).json()["result"]
    assert result["object"] == "chat.completion" and result["model"] == MODEL
    choice = result["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["reasoning_content"] == "Let me think."
    assert choice["message"]["content"] == "Hello world"
    assert choice["message"]["tool_calls"] == [] and choice["finish_reason"] == "stop"
    usage = result["usage"]
    assert usage["completion_tokens"] == token_count(THINK_AND_ANSWER)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == token_count("Let me think.")
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}


def test_messages_stream_frames_in_order(client):
    chunks = stream(client, RUN, {"messages": USER})
    assert chunks[-1] == "[DONE]"
    chunks = chunks[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    reasoning = [d["reasoning_content"] for d in deltas if "reasoning_content" in d]
    content = [d["content"] for d in deltas[1:] if "content" in d]
    assert "".join(reasoning) == "Let me think." and "".join(content) == "Hello world"
    # reasoning strictly before the answer, one token per frame
    first_content = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert all("content" not in d for d in deltas[1:first_content])
    assert len(reasoning) == token_count("Let me think.")
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == "stop" and not any(finish[:-1])
    usage = chunks[-1]  # /ai/run always ends with the usage chunk
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == token_count(THINK_AND_ANSWER)


def test_chat_stream_usage_chunk_only_when_asked(client):
    body = {"model": MODEL, "messages": USER}
    without = stream(client, "/v1/chat/completions", body)
    assert all("usage" not in c for c in without[:-1])
    with_usage = stream(client, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    assert with_usage[-2]["usage"]["completion_tokens"] == token_count(THINK_AND_ANSWER) and with_usage[-1] == "[DONE]"


def test_tool_call_sync_and_stream(client, engine):
    engine.script = TOOL_CALL
    body = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS}
    choice = client.post(RUN, json=body).json()["result"]["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("chatcmpl-tool-")
    assert call["function"] == {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}

    chunks = stream(client, RUN, body)[:-1]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    start = calls[0]
    assert start["index"] == 0 and start["type"] == "function" and start["id"].startswith("chatcmpl-tool-")
    assert start["function"] == {"name": "get_weather", "arguments": ""}
    assert all(set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"} for tc in calls[1:])
    assert "".join(tc["function"]["arguments"] for tc in calls) == "{\"city\":\"Paris\"}"
    assert not "".join(d.get("content") or "" for d in deltas)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_forced_tool_call_prefills_the_call_header(client, engine, choice):
    """A named (or the only `required`) tool: the prompt ends inside the call, so content cannot carry it."""
    engine.script = "{\"city\":\"Rome\"}<|call|>"
    body = {"model": MODEL, "messages": USER, "tools": TOOLS, "tool_choice": choice}
    reply = client.post("/v1/chat/completions", json=body).json()
    prompt_tail = harmony.decode(engine.requests[-1].prompt_token_ids[-20:])
    assert prompt_tail.endswith("<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>")
    message = reply["choices"][0]["message"]
    assert message["content"] is None and reply["choices"][0]["finish_reason"] == "tool_calls"
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": "{\"city\":\"Rome\"}"}
    chunks = stream(client, "/v1/chat/completions", body)[:-1]
    calls = [tc for c in chunks if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "get_weather"
    assert "".join(tc["function"]["arguments"] for tc in calls) == "{\"city\":\"Rome\"}"


def test_forced_tool_must_exist(client):
    body = {"model": MODEL, "messages": USER, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and "nope" in response.json()["error"]["message"]


def test_length_finish_when_max_tokens_runs_out(client):
    result = client.post(RUN, json={"messages": USER, "max_tokens": 3}).json()["result"]
    assert result["choices"][0]["finish_reason"] == "length" and result["usage"]["completion_tokens"] == 3


def test_logprobs_cover_answer_tokens(client):
    reply = client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "logprobs": True, "top_logprobs": 2}).json()
    content = reply["choices"][0]["logprobs"]["content"]
    assert "".join(entry["token"] for entry in content) == "Hello world"
    assert all(entry["logprob"] == -0.25 and len(entry["top_logprobs"]) == 2 for entry in content)
    assert all(bytes(entry["bytes"]).decode() == entry["token"] for entry in content)


# -- Prompt ----------------------------------------------------------------------------------------------

def test_prompt_sync_and_stream(client, engine):
    result = client.post(RUN, json={"prompt": "Hi"}).json()["result"]
    assert result["response"] == "Hello world" and "tool_calls" not in result
    assert result["usage"]["completion_tokens"] == token_count(THINK_AND_ANSWER)
    frames_ = stream(client, RUN, {"prompt": "Hi"})
    assert frames_[-1] == "[DONE]"
    assert "".join(f["response"] for f in frames_[:-1]) == "Hello world"
    assert frames_[-2]["response"] == "" and frames_[-2]["usage"] == result["usage"]
    assert all(set(f) == {"response"} for f in frames_[:-2])

    engine.script = TOOL_CALL
    result = client.post(RUN, json={"prompt": "Weather?"}).json()["result"]
    assert result["tool_calls"] == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert stream(client, RUN, {"prompt": "Weather?"})[-2]["tool_calls"] == result["tool_calls"]


# -- Responses -----------------------------------------------------------------------------------------

def test_responses_sync_items(client):
    result = client.post(RUN, json={"input": "Hi"}).json()["result"]
    assert result["object"] == "response" and result["status"] == "completed"
    reasoning, message = result["output"]
    assert reasoning["type"] == "reasoning" and reasoning["content"] == [{"type": "reasoning_text", "text": "Let me think."}]
    assert message["type"] == "message" and message["role"] == "assistant" and message["status"] == "completed"
    assert message["content"] == [{"type": "output_text", "text": "Hello world", "annotations": []}]
    assert result["output_text"] == "Hello world"
    assert result["usage"]["output_tokens"] == token_count(THINK_AND_ANSWER)
    assert result["usage"]["total_tokens"] == result["usage"]["input_tokens"] + result["usage"]["output_tokens"]


def test_responses_stream_event_sequence(client):
    events = stream(client, "/v1/responses", {"model": MODEL, "input": "Hi"})
    assert events[-1] == "[DONE]"
    events = events[:-1]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    collapsed = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]
    assert collapsed == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.reasoning_text.delta", "response.reasoning_text.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done",
        "response.completed",
    ]
    assert events[0]["response"]["status"] == "in_progress"
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == "Hello world"
    for e in events:
        if e["type"].endswith(".delta") or e["type"].endswith("_text.done"):
            assert e["item_id"] and e["content_index"] == 0 and e["output_index"] in (0, 1)
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["output_text"] == "Hello world"
    assert [item["type"] for item in final["output"]] == ["reasoning", "message"]
    added = [e["item"]["id"] for e in events if e["type"] == "response.output_item.added"]
    assert added == [item["id"] for item in final["output"]]


def test_responses_stream_function_call(client, engine):
    engine.script = TOOL_CALL
    tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]
    events = stream(client, "/v1/responses", {"model": MODEL, "input": "Weather?", "tools": tools})[:-1]
    args = [e for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert "".join(e["delta"] for e in args) == "{\"city\":\"Paris\"}"
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert done["arguments"] == "{\"city\":\"Paris\"}"
    final = events[-1]["response"]
    call = final["output"][-1]
    assert call["type"] == "function_call" and call["name"] == "get_weather" and call["arguments"] == "{\"city\":\"Paris\"}"
    assert call["call_id"]


def test_responses_incomplete_on_length(client):
    result = client.post("/v1/responses", json={"model": MODEL, "input": "Hi", "max_output_tokens": 2}).json()
    assert result["status"] == "incomplete" and result["incomplete_details"] == {"reason": "max_output_tokens"}
    events = stream(client, "/v1/responses", {"model": MODEL, "input": "Hi", "max_output_tokens": 2})
    assert events[-2]["type"] == "response.incomplete" and events[-2]["response"]["status"] == "incomplete"


# -- the official client over the scripted engine -------------------------------------------------------

def test_openai_sdk_parses_our_frames(client, engine):
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client)
    reply = sdk.chat.completions.create(model=MODEL, messages=USER)
    assert reply.choices[0].message.content == "Hello world"
    engine.script = TOOL_CALL
    chunks = list(sdk.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather"
    events = list(sdk.responses.create(model=MODEL, input="Weather?", stream=True))
    assert events[-1].type == "response.completed"
    assert events[-1].response.output[-1].type == "function_call"


# -- robustness --------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", [
    "<|message|><|message|>oops<|end|><|end|>",
    "<|start|><|start|>assistant<|channel|>final<|constrain|><|return|>",
    "<|channel|>commentary to=functions.x <|constrain|>json<|message|>{not json<|return|>",
    "<|call|>",
    "plain text with no header at all",
])
def test_malformed_model_output_is_never_a_500(client, engine, script):
    engine.script = script
    for body in ({"prompt": "x"}, {"messages": USER}, {"input": "x"}):
        assert client.post(RUN, json=body).status_code == 200
        assert stream(client, RUN, body)[-1] == "[DONE]"


def test_engine_error_mid_stream_ends_the_stream_cleanly(client, engine):
    engine.fail_after = 3
    frames_ = stream(client, RUN, {"messages": USER})
    assert frames_[-1] == "[DONE]" and "error" in frames_[-2]
    assert client.post(RUN, json={"messages": USER}).status_code == 500  # sync: the envelope, not a crash
    assert client.post(RUN, json={"messages": USER}).json()["success"] is False


def test_completions_return_every_token(client):
    reply = client.post("/v1/completions", json={"model": MODEL, "prompt": "Once", "max_tokens": 50}).json()
    assert reply["object"] == "text_completion"
    tokens = [t for t in harmony.encode(THINK_AND_ANSWER, allow_special=True) if t not in harmony.STOP_TOKENS]
    assert reply["choices"][0]["text"] == harmony.decode(tokens)
    assert reply["choices"][0]["finish_reason"] == "stop"


def test_completions_stream_equals_sync(client):
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 50}
    sync = client.post("/v1/completions", json=body).json()
    chunks = stream(client, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert chunks[-1] == "[DONE]" and all(c["object"] == "text_completion" for c in chunks[:-1])
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1] if c["choices"]) == sync["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1] if c["choices"]][-1] == "stop"
    assert chunks[-2]["usage"]["completion_tokens"] == sync["usage"]["completion_tokens"]
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client)
    text = "".join(c.choices[0].text for c in sdk.completions.create(model=MODEL, prompt="Once", max_tokens=3, stream=True))
    assert text == harmony.decode(harmony.encode(THINK_AND_ANSWER, allow_special=True)[:3])


def test_previous_response_id_continues_the_conversation(client, engine):
    first = client.post("/v1/responses", json={"model": MODEL, "input": "My name is Ada."}).json()
    second = client.post("/v1/responses", json={"model": MODEL, "input": "What is my name?", "previous_response_id": first["id"]})
    assert second.status_code == 200
    prompt = harmony.decode(engine.requests[-1].prompt_token_ids)
    assert prompt.index("My name is Ada.") < prompt.index("Hello world") < prompt.index("What is my name?")
    # a streamed response can be continued too, and a continuation can be continued
    events = stream(client, RUN, {"input": "And then?", "previous_response_id": second.json()["id"]})
    third = events[-2]["response"]["id"]
    client.post("/v1/responses", json={"model": MODEL, "input": "Last.", "previous_response_id": third})
    prompt = harmony.decode(engine.requests[-1].prompt_token_ids)
    assert all(text in prompt for text in ("My name is Ada.", "What is my name?", "And then?", "Last."))


def test_previous_response_id_unknown_or_not_stored(client):
    unknown = client.post("/v1/responses", json={"model": MODEL, "input": "x", "previous_response_id": "resp-nope"})
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "5006"
    assert "previous_response_id" in unknown.json()["error"]["message"]
    private = client.post("/v1/responses", json={"model": MODEL, "input": "secret", "store": False}).json()
    again = client.post("/v1/responses", json={"model": MODEL, "input": "x", "previous_response_id": private["id"]})
    assert again.status_code == 400


def test_a_cut_off_function_call_is_incomplete(client, engine):
    engine.script = TOOL_CALL
    cut = token_count(TOOL_CALL) - 3  # inside the arguments
    body = {"model": MODEL, "input": "Weather?", "tools": [{"type": "function", **TOOLS[0]["function"]}], "max_output_tokens": cut}
    response = client.post("/v1/responses", json=body).json()
    assert response["status"] == "incomplete"
    assert [(i["type"], i.get("status")) for i in response["output"]][-1] == ("function_call", "incomplete")
    events = [f for f in stream(client, "/v1/responses", body) if f != "[DONE]"]
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert done[-1]["type"] == "function_call" and done[-1]["status"] == "incomplete"
    assert events[-1]["response"]["output"][-1]["status"] == "incomplete"
    engine.script = THINK_AND_ANSWER
    whole = client.post("/v1/responses", json={**body, "max_output_tokens": 500}).json()
    assert whole["status"] == "completed" and whole["output"][-1]["status"] == "completed"
