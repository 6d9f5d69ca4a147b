"""Each surface builds its sync answer and its stream from the same outcome, so the two agree on every
script, including ones a model should not write (two reasoning segments, calls after text, a cut-off).

On the scripted engine: the same script is answered sync and streamed, and the stream, folded the
way a client folds it, must give exactly the sync answer (ids and timestamps aside).
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from ossrun.api.app import AppSettings, build_app
from tests.api_fakes import FakeEngine

MODEL = "@cf/openai/gpt-oss-20b"
RUN = f"/client/v4/accounts/acct/ai/run/{MODEL}"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]

SCRIPTS = {
    "think-answer": "<|channel|>analysis<|message|>Hmm.<|end|><|start|>assistant<|channel|>final<|message|>Paris.<|return|>",
    "two-thoughts": ("<|channel|>analysis<|message|>One.<|end|><|start|>assistant<|channel|>analysis<|message|>Two.<|end|>"
                     "<|start|>assistant<|channel|>final<|message|>Done.<|return|>"),
    "preamble-calls": ("<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather "
                       '<|constrain|>json<|message|>{"city":"Oslo"}<|call|>'),
    "only-thinking": "<|channel|>analysis<|message|>Still thinking about it",
    "cut-call": '<|channel|>commentary to=functions.search <|constrain|>json<|message|>{"query":"long',
    "no-header": "Just text without any header.<|return|>",
    "header-salvaged": " hi<|channel|> x<|return|>",  # no <|message|>: the header's ordinary text is the answer
}


@pytest.fixture
def app(tmp_path):
    engine = FakeEngine()
    with TestClient(build_app(engine, AppSettings(data_dir=tmp_path, rate_limit_per_minute=0))) as client:
        yield engine, client


def frames(response) -> list:
    out = []
    for block in response.text.split("\n\n"):
        data = [line[len("data: "):] for line in block.splitlines() if line.startswith("data: ")]
        if data and data[0] != "[DONE]":
            out.append(json.loads(data[0]))
    return out


def both(client, path: str, body: dict) -> tuple[dict, list]:
    sync = client.post(path, json=body).json()
    streamed = client.post(path, json={**body, "stream": True})
    assert streamed.status_code == 200
    return sync, frames(streamed)


@pytest.mark.parametrize("script", SCRIPTS)
def test_chat_stream_folds_to_the_sync_message(app, script):
    engine, client = app
    engine.script = SCRIPTS[script]
    sync, chunks = both(client, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                        "tools": TOOLS, "max_tokens": 400})
    message, calls = {"content": "", "reasoning_content": ""}, {}
    for chunk in chunks[:-1] if not chunks[-1]["choices"] else chunks:
        delta = chunk["choices"][0]["delta"]
        for key in ("content", "reasoning_content"):
            message[key] += delta.get(key) or ""
        for call in delta.get("tool_calls") or []:
            entry = calls.setdefault(call["index"], {"id": call.get("id"), "name": "", "arguments": ""})
            entry["name"] += call["function"].get("name") or ""
            entry["arguments"] += call["function"]["arguments"]
    choice = sync["choices"][0]
    assert (choice["message"]["content"] or "") == message["content"]
    assert (choice["message"]["reasoning_content"] or "") == message["reasoning_content"]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in choice["message"]["tool_calls"]] == \
        [(c["name"], c["arguments"]) for c in calls.values()]  # call ids are fresh per request
    assert all(c["id"] for c in calls.values())
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert chunks[0]["id"] == chunks[-1]["id"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_responses_stream_ends_with_the_sync_response(app, script):
    engine, client = app
    engine.script = SCRIPTS[script]
    body = {"model": MODEL, "input": "x", "tools": [{"type": "function", "name": "get_weather"}, {"type": "function", "name": "search"}],
            "max_output_tokens": 400}
    sync, events = both(client, "/v1/responses", body)
    final = events[-1]["response"]
    strip = lambda items: [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in items]  # noqa: E731
    assert strip(final["output"]) == strip(sync["output"]) and final["status"] == sync["status"]
    assert final["output_text"] == sync["output_text"] and final["usage"] == sync["usage"]
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert done == final["output"]  # every item of the final object was announced, and closed as it ends


@pytest.mark.parametrize("script", SCRIPTS)
def test_prompt_stream_folds_to_the_sync_result(app, script):
    engine, client = app
    engine.script = SCRIPTS[script]
    sync, chunks = both(client, RUN, {"prompt": "x", "tools": TOOLS, "max_tokens": 400})
    result = sync["result"]
    assert "".join(c["response"] for c in chunks) == result["response"]
    assert chunks[-1].get("tool_calls") == result.get("tool_calls") and chunks[-1]["usage"] == result["usage"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_completions_stream_folds_to_the_sync_text(app, script):
    engine, client = app
    engine.script = SCRIPTS[script]
    sync, chunks = both(client, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 400, "logprobs": 1})
    choice = sync["choices"][0]
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    streamed_tokens = [t for c in chunks if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["tokens"]]
    assert streamed_tokens == choice["logprobs"]["tokens"]
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]


def test_a_salvaged_header_shows_no_special_token_on_any_chat_surface(app):
    """The text of a header that never got its <|message|> is the answer, without harmony's specials (and with the
    leading space the model wrote after the prompt's `assistant`); only /v1/completions shows every token (as ROUTES.md says)."""
    engine, client = app
    engine.script = SCRIPTS["header-salvaged"]
    chat, chat_chunks = both(client, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert chat["choices"][0]["message"]["content"] == " hi x"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chat_chunks if c["choices"]) == " hi x"
    responses, events = both(client, "/v1/responses", {"model": MODEL, "input": "x"})
    assert responses["output_text"] == events[-1]["response"]["output_text"] == " hi x"
    prompt, prompt_chunks = both(client, RUN, {"prompt": "x"})
    assert prompt["result"]["response"] == "".join(c["response"] for c in prompt_chunks) == " hi x"
    raw = client.post(RUN, json={"prompt": "<|start|>user<|message|>x<|end|><|start|>assistant", "raw": True}).json()
    assert raw["result"]["response"] == " hi x"
    completion = client.post("/v1/completions", json={"model": MODEL, "prompt": "x"}).json()
    assert completion["choices"][0]["text"] == " hi<|channel|> x"



@pytest.mark.parametrize("script", ["<|channel|>final Hello there<|return|>", "\tnull cilind<|return|>", "<|channel|>final to=x"
                                    " Hi<|end|>", SCRIPTS["header-salvaged"], SCRIPTS["no-header"]])
def test_chat_logprobs_of_a_salvaged_header_spell_only_text_the_answer_has(app, script):
    """ROUTES.md: the entries are those of the tokens whose whole text is in the answer. A header without
    <|message|> is read as text after its pieces: the tokens that spelled a piece (`final`) or straddle the
    text's start (` Hello`, whose space separated it from the piece) are not listed; a model that wrote no
    piece has its whole text as the answer and every token listed (the whitespace it began with, the first word
    that followed the prompt's `assistant`)."""
    engine, client = app
    engine.script = script
    sync, chunks = both(client, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                          "logprobs": True})
    content = sync["choices"][0]["message"]["content"] or ""
    spelled = "".join(entry["token"] for entry in (sync["choices"][0]["logprobs"] or {}).get("content") or [])
    streamed = "".join(e["token"] for c in chunks if c["choices"] and c["choices"][0].get("logprobs")
                       for e in c["choices"][0]["logprobs"]["content"])
    assert content.endswith(spelled) and streamed == spelled, (content, spelled, streamed)
    if "<|channel|>" not in script or script == SCRIPTS["header-salvaged"]:
        assert spelled == content


def _spelled(entries: list) -> str:
    return b"".join(bytes(entry["bytes"]) for entry in entries).decode("utf-8", "replace")


@pytest.mark.parametrize("script", [SCRIPTS["header-salvaged"], " hi<|channel|> x<|constrain|>, y<|channel|>", " hi<|start|>",
                                    "<|channel|>final<|message|>A<|end|><|channel|>xyz<|channel|> b<|return|>"])
def test_logprobs_of_a_salvaged_header_hold_the_text_on_both_sides_of_its_special_tokens(app, script):
    """Hunt round 17 B-F1: a special token inside a header without <|message|> (a stray `<|channel|>` or
    `<|constrain|>`) cleared the tokens waiting for their text, so the entries spelled only the answer's text after its last
    special token (` x` of ` hi x`), on every surface that lists them: chat, /ai/run's Prompt shape and Responses'
    `output_text.logprobs`, sync and streamed. The answer's text is the ordinary text on both sides of it."""
    engine, client = app
    engine.script = script
    chat, chunks = both(client, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                         "logprobs": True})
    joined = chat["choices"][0]["message"]["content"]
    content = joined.replace("\n", "")  # the "\n" joining two messages' texts (B-F4) is no token's
    assert content and _spelled(chat["choices"][0]["logprobs"]["content"]) == content
    assert _spelled([e for c in chunks if c["choices"] and c["choices"][0].get("logprobs")
                     for e in c["choices"][0]["logprobs"]["content"]]) == content
    prompt, frames_ = both(client, RUN, {"prompt": "x", "logprobs": True})
    assert prompt["result"]["response"] == joined and _spelled(prompt["result"]["logprobs"]["content"]) == content
    assert _spelled([e for f in frames_ if f.get("logprobs") for e in f["logprobs"]["content"]]) == content
    responses, events = both(client, "/v1/responses", {"model": MODEL, "input": "x", "include": ["message.output_text.logprobs"]})
    parts = [part for item in responses["output"] if item["type"] == "message" for part in item["content"]]
    assert "".join(part["text"] for part in parts) == content
    assert _spelled([e for part in parts for e in part["logprobs"]]) == content
    assert _spelled([e for ev in events if ev["type"] == "response.output_text.delta" for e in ev["logprobs"]]) == content

def test_a_response_has_one_creation_time(app):
    """`created_at` is when the request came: the same in every event and in the stored copy, however long it runs."""
    engine, client = app
    engine.delay = 0.3  # 5 tokens: the answer ends at least a second after it began
    events = frames(client.post("/v1/responses", json={"model": MODEL, "input": "x", "stream": True}))
    stamps = {e["response"]["created_at"] for e in events if "response" in e}
    assert len(stamps) == 1, stamps
    stored = client.get(f"/v1/responses/{events[-1]['response']['id']}").json()
    assert stored["created_at"] == stamps.pop()


def _sdk_event_types() -> dict:
    """The openai SDK's pydantic class of each Responses stream event, by its `type`."""
    from typing import get_args

    from openai.types import responses

    found = {}
    for name in dir(responses):
        kind = getattr(getattr(responses, name), "model_fields", {}).get("type")
        if name.endswith("Event") and kind is not None and len(get_args(kind.annotation)) == 1:
            found[get_args(kind.annotation)[0]] = getattr(responses, name)
    return found


@pytest.mark.parametrize("summary", [None, "auto"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_responses_objects_and_events_validate_as_the_sdk_types(app, script, summary):
    """Strictly, as typed clients deserialize: `parallel_tool_calls` on every response, `logprobs` on answer text events,
    and with `reasoning.summary` the summary parts and their events."""
    from openai.types.responses import Response

    engine, client = app
    engine.script = SCRIPTS[script]
    sdk = _sdk_event_types()
    sync, events = both(client, "/v1/responses", {"model": MODEL, "input": "x", "tools": [{"type": "function", "name": "search"}],
                                                  "max_output_tokens": 400, "reasoning": {"summary": summary}})
    for item in sync["output"]:
        if item["type"] == "reasoning":
            assert item["summary"] == ([{"type": "summary_text", "text": item["content"][0]["text"]}] if summary else [])
    assert sync["parallel_tool_calls"] is True
    for obj in json.loads(json.dumps([sync, *events])):
        response = obj if obj.get("object") == "response" else obj.get("response")
        if response is not None:
            response["usage"] = None  # the SDK's usage now also wants `cache_write_tokens`, which this test is not about
        (Response if obj is response else sdk[obj["type"]]).model_validate(obj, strict=True)
    echoed = client.post("/v1/responses", json={"model": MODEL, "input": "x", "parallel_tool_calls": False}).json()
    assert echoed["parallel_tool_calls"] is False


@pytest.mark.parametrize("tool", [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object"}, "strict": True}},
    {"name": "get_weather", "description": "Weather", "parameters": {"type": "object"}, "strict": True},
    {"type": "function", "name": "get_weather", "description": "Weather", "parameters": {"type": "object"}, "strict": True},
], ids=["chat", "flat", "responses"])
def test_responses_echo_tools_as_the_responses_function_tool(app, tool):
    """A tool sent in chat's spelling or flat without `type` was echoed as sent: the SDK then read `tools[0].name`
    (or `.type`) as None, and `Response` did not validate. Named tool_choice likewise takes the Responses spelling."""
    from openai.types.responses import Response

    engine, client = app
    engine.script = SCRIPTS["think-answer"]
    choice = {"type": "function", "function": {"name": "get_weather"}}
    for response in both(client, "/v1/responses", {"model": MODEL, "input": "x", "tools": [tool], "tool_choice": choice}):
        response = response if isinstance(response, dict) else response[-1]["response"]
        assert response["tools"] == [{"type": "function", "name": "get_weather", "description": "Weather",
                                      "parameters": {"type": "object"}, "strict": True}]
        assert response["tool_choice"] == {"type": "function", "name": "get_weather"}
        Response.model_validate({**response, "usage": None}, strict=True)
    bare = client.post("/v1/responses", json={"model": MODEL, "input": "x", "tools": [{"name": "f"}]}).json()["tools"]
    assert bare == [{"type": "function", "name": "f", "description": None, "parameters": None, "strict": False}]


@pytest.mark.parametrize("summary", [None, "auto"])
@pytest.mark.parametrize("script", ["think-answer", "preamble-calls", "two-thoughts"])
def test_a_failed_response_holds_what_each_item_streamed(app, script, summary):
    """Scripted, cut after every token: the engine fails mid-answer only on a bug or a dead device (the real server's
    shutdown is in test_server_aborts). Before: the item open at the failure was in `response.failed` as it was opened
    (no text, no arguments, `in_progress`). Now it holds every delta, cut as `incomplete`; the event is the SDK's. With
    `reasoning.summary`, a reasoning item's summary holds the same text."""
    from openai.types.responses import ResponseFailedEvent

    from ossrun import harmony

    engine, client = app
    engine.script = SCRIPTS[script]
    body = {"model": MODEL, "input": "x", "tools": [{"type": "function", "name": "get_weather"}], "stream": True,
            "reasoning": {"summary": summary}}
    for cut in range(1, len(harmony.encode(engine.script, allow_special=True))):
        engine.fail_after = cut
        events = frames(client.post("/v1/responses", json=body))
        failed = events[-1]
        assert failed["type"] == "response.failed", cut
        streamed: dict[str, str] = {}
        for event in events:
            if event["type"].endswith(".delta") and "summary" not in event["type"]:  # a summary delta repeats its reasoning's
                streamed[event["item_id"]] = streamed.get(event["item_id"], "") + event["delta"]
        output, done = failed["response"]["output"], {e["item"]["id"] for e in events if e["type"] == "response.output_item.done"}
        for item in output:
            held = item["arguments"] if item["type"] == "function_call" else "".join(p["text"] for p in item["content"])
            assert held == streamed.get(item["id"], ""), (cut, item)
            if item["type"] != "reasoning":
                assert item["status"] == ("completed" if item["id"] in done else "incomplete"), (cut, item)
            elif summary:
                assert item["summary"] == [{"type": "summary_text", "text": held}], (cut, item)
        assert failed["response"]["output_text"] == "".join(streamed.get(i["id"], "") for i in output if i["type"] == "message")
        failed["response"]["usage"] = None  # as above: the SDK's usage wants fields this test is not about
        ResponseFailedEvent.model_validate(failed, strict=True)
    sync = client.post("/v1/responses", json={**body, "stream": False})  # no stream: an error answer, nothing half-made
    assert sync.status_code == 500 and sync.json()["error"]["type"] == "server_error"


def test_a_preamble_is_a_commentary_message_and_continues_as_one(app):
    """B-F1: the text gpt-oss writes on the commentary channel before a call comes out as a message item with OpenAI's
    `phase: "commentary"` (the answer's message is `final_answer`), and comes back as commentary, with its turn's
    reasoning, by `previous_response_id` and by hand (with or without the phase): the prompt chat would render."""
    import openai

    from ossrun import harmony

    engine, client = app
    engine.script = "<|channel|>analysis<|message|>Hmm.<|end|><|start|>assistant" + SCRIPTS["preamble-calls"]
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0)
    tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]
    first = sdk.responses.create(model=MODEL, input="Weather in Oslo?", tools=tools)
    assert [(item.type, getattr(item, "phase", None)) for item in first.output] == \
        [("reasoning", None), ("message", "commentary"), ("function_call", None)]
    with sdk.responses.stream(model=MODEL, input="Weather in Oslo?", tools=tools) as stream:
        added = [e.item for e in stream if e.type == "response.output_item.added" and e.item.type == "message"]
    assert [item.phase for item in added] == ["commentary"]
    call = first.output[2]
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "-3"}
    engine.script = SCRIPTS["think-answer"]
    answer = sdk.responses.create(model=MODEL, previous_response_id=first.id, input=[output], tools=tools)
    assert [item.phase for item in answer.output if item.type == "message"] == ["final_answer"]
    chained = engine.requests[-1].prompt_token_ids
    expected = ("<|channel|>analysis<|message|>Hmm.<|end|><|start|>assistant<|channel|>commentary<|message|>Checking.<|end|>"
                "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json")
    assert expected in harmony.decode(chained)
    by_hand = [{"role": "user", "content": "Weather in Oslo?"}, *(item.model_dump(exclude_none=True) for item in first.output), output]
    sdk.responses.create(model=MODEL, input=by_hand, tools=tools, store=False)
    assert engine.requests[-1].prompt_token_ids == chained
    without_phase = [{k: v for k, v in item.items() if k != "phase"} for item in by_hand]
    sdk.responses.create(model=MODEL, input=without_phase, tools=tools, store=False)
    assert engine.requests[-1].prompt_token_ids == chained
