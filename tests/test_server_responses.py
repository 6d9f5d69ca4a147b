"""The Responses API on the real server and the demo model, as the openai SDK uses it: an answer cut inside
its reasoning, logprobs of the answer text, and the stored responses' `delete` and `input_items`."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import openai
import pytest
from jsonschema import Draft202012Validator

from tests.server_util import MODEL, post_json

GERMANY = "What is the capital of Germany?"


@pytest.fixture(scope="module")
def server(demo_server):
    return demo_server


def events(server, body: dict) -> list[dict]:
    out = []
    with httpx.stream("POST", f"{server.base}/v1/responses", json={"temperature": 0, **body, "stream": True},
                      headers=server.headers, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[len("data: "):]))
    return out


def test_cut_inside_the_reasoning_outputs_only_the_reasoning(server):
    """As OpenAI answers "ran out of tokens during reasoning": no message the model never started."""
    body = {"model": MODEL, "input": GERMANY, "max_output_tokens": 20}
    result = post_json(server, "/v1/responses", body)
    assert result["status"] == "incomplete" and result["incomplete_details"] == {"reason": "max_output_tokens"}
    assert [item["type"] for item in result["output"]] == ["reasoning"] and result["output_text"] == ""
    streamed = events(server, body)
    kinds = {e["type"] for e in streamed}
    assert "response.output_text.done" not in kinds
    assert {e["part"]["type"] for e in streamed if e["type"].startswith("response.content_part.")} == {"reasoning_text"}
    assert [e["item"]["type"] for e in streamed if e["type"] == "response.output_item.added"] == ["reasoning"]
    assert streamed[-1]["type"] == "response.incomplete"
    assert [item["type"] for item in streamed[-1]["response"]["output"]] == ["reasoning"]
    again = post_json(server, "/v1/responses", {"model": MODEL, "input": "What is 2 + 3?", "previous_response_id": result["id"]})
    assert again["status"] == "completed" and again["output_text"]


def test_a_chain_that_ended_in_a_function_call_needs_its_output(server):
    """A `previous_response_id` whose last item is a function_call, followed by a new question without the call's
    output, was answered with a made-up weather report; OpenAI answers 400 "No tool output found for function call"."""
    tool = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    first = post_json(server, "/v1/responses", {"model": MODEL, "input": "What is the weather in Paris?", "tools": [tool]})
    (call,) = [item for item in first["output"] if item["type"] == "function_call"]
    body = {"model": MODEL, "previous_response_id": first["id"], "tools": [tool]}
    refused = post_json(server, "/v1/responses", {**body, "input": "What is the capital of France?"}, status=400)["error"]
    assert refused["param"] == "input" and f"No tool output found for function call {call['call_id']}" in refused["message"]
    output = {"type": "function_call_output", "call_id": call["call_id"], "output": '{"temperature_c": 7, "condition": "rainy"}'}
    answered = post_json(server, "/v1/responses", {**body, "input": [output]})
    assert answered["output_text"] == "It is 7°C and rainy in Paris."


def test_an_error_names_the_callers_own_item_after_a_previous_response(server):
    """Before: with `previous_response_id`, `input[i]` in an error counted the stored conversation's items too, so
    the caller was pointed at an index its request does not have."""
    first = post_json(server, "/v1/responses", {"model": MODEL, "input": GERMANY, "max_output_tokens": 60})
    stray = {"type": "function_call_output", "call_id": "call_nowhere", "output": "7"}
    body = {"model": MODEL, "previous_response_id": first["id"], "input": [{"role": "user", "content": "Hi"}, stray]}
    refused = post_json(server, "/v1/responses", body, status=400)["error"]
    assert refused["param"] == "input[1].call_id" and "input[1]: call_id 'call_nowhere'" in refused["message"]


def test_output_text_logprobs_sync_and_streamed(server):
    """`include: ["message.output_text.logprobs"]` lists the answer's tokens (spelling its text) with `top_logprobs`
    alternatives in the part, and each delta carries those of its text; without the include, `[]` as on OpenAI."""
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="secret", max_retries=0)
    asked = dict(model=MODEL, input="What is the capital of France?", temperature=0, top_logprobs=3,
                 include=["message.output_text.logprobs"])
    part = client.responses.create(**asked).output[-1].content[0]
    assert part.text == "The capital of France is Paris." and part.logprobs
    assert b"".join(bytes(entry.bytes) for entry in part.logprobs) == part.text.encode()
    for entry in part.logprobs:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
    sync = [entry.model_dump() for entry in part.logprobs]

    streamed = events(server, {k: v for k, v in asked.items() if k != "temperature"})
    deltas = [e for e in streamed if e["type"] == "response.output_text.delta"]
    assert all(e["logprobs"] for e in deltas)  # each delta's own tokens
    assert [entry for e in deltas for entry in e["logprobs"]] == sync
    assert next(e for e in streamed if e["type"] == "response.output_text.done")["logprobs"] == sync
    assert streamed[-1]["response"]["output"][-1]["content"][0]["logprobs"] == sync

    unasked = client.responses.create(**{**asked, "include": None})
    assert unasked.output[-1].content[0].logprobs == []


def test_chat_logprobs_switch_is_refused_naming_the_include(server):
    """Before: chat's `logprobs: true` was accepted and ignored (`output_text` came back with `logprobs: []`), where the
    shape refuses chat's other fields and OpenAI's Responses API has no such parameter (hunt round 19 A-F3). `include`
    is the switch here; `top_logprobs` stays, as OpenAI's."""
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="secret", max_retries=0)
    for value in (True, False):
        with pytest.raises(openai.BadRequestError) as caught:
            client.responses.create(model=MODEL, input="Hi", max_output_tokens=4, top_logprobs=3, extra_body={"logprobs": value})
        assert caught.value.body["param"] == "logprobs"
        assert "logprobs is not a Responses parameter" in caught.value.message and "message.output_text.logprobs" in caught.value.message
    refused = httpx.post(server.run_url(), json={"input": "Hi", "max_output_tokens": 4, "logprobs": True}, headers=server.headers)
    assert refused.status_code == 400 and "at '/logprobs'" in refused.json()["errors"][0]["message"]
    assert client.responses.create(model=MODEL, input="Hi", max_output_tokens=4, extra_body={"logprobs": None}).output


def test_echoes_the_temperature_and_top_p_sampled_with(server):
    """OpenAI's Response object echoes the values used (1.0 and 1.0 when not sent), and `/ai/run` samples at Workers
    AI's 0.6: both were echoed as null. The in-progress shell, the final object and the stored copy agree."""
    body = {"input": "What is the capital of France?", "max_output_tokens": 8}

    def sampling(response: dict) -> tuple:
        return response["temperature"], response["top_p"]

    v1 = httpx.post(f"{server.base}/v1/responses", json={"model": MODEL, **body}, headers=server.headers, timeout=120).json()
    assert sampling(v1) == (1.0, 1.0)
    assert sampling(httpx.get(f"{server.base}/v1/responses/{v1['id']}", headers=server.headers).json()) == (1.0, 1.0)
    run = httpx.post(server.run_url(), json=body, headers=server.headers, timeout=120).json()["result"]
    assert sampling(run) == (0.6, 1.0)
    sent = post_json(server, "/v1/responses", {"model": MODEL, **body, "temperature": 0.25, "top_p": 0.5})
    assert sampling(sent) == (0.25, 0.5)
    streamed = events(server, {"model": MODEL, **body})  # at temperature 0
    assert sampling(streamed[0]["response"]) == sampling(streamed[-1]["response"]) == (0.0, 1.0)


WEATHER = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def test_input_items_and_delete_on_both_prefixes(server):
    """`input_items` lists what a stored response was generated from (a previous response's items included), each
    item with the same id in every response of the conversation; `delete` forgets the response."""
    clients = [openai.OpenAI(base_url=f"{server.base}{prefix}", api_key="secret", max_retries=0)
               for prefix in ("/v1", "/client/v4/accounts/acct/ai/v1")]
    for client in clients:
        first = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[WEATHER], temperature=0)
        call = first.output[-1]
        assert call.type == "function_call"
        second = client.responses.create(model=MODEL, previous_response_id=first.id, tools=[WEATHER], temperature=0,
                                         input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
        items = list(client.responses.input_items.list(second.id, order="asc"))
        assert [item.type for item in items] == ["message", "reasoning", "function_call", "function_call_output"]
        assert items[0].role == "user" and items[0].content[0].text == "What is the weather in Paris?"
        assert [item.id for item in items[1:3]] == [item.id for item in first.output]  # the first answer's own items
        assert items[2].call_id == call.call_id and items[3].output == "sunny" and len({i.id for i in items}) == 4
        assert [item.id for item in client.responses.input_items.list(first.id)] == [items[0].id]
        paged = list(client.responses.input_items.list(second.id, limit=1))  # newest first, one page per item
        assert [item.id for item in paged] == [item.id for item in reversed(items)]

        path = f"{client.base_url}responses/{second.id}"
        page = httpx.get(f"{path}/input_items", params={"limit": 2, "after": items[-1].id}, headers=server.headers).json()
        assert page["object"] == "list" and [i["id"] for i in page["data"]] == [items[2].id, items[1].id] and page["has_more"]
        for bad, param in (({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"order": "up"}, "order"), ({"after": "x"}, "after")):
            refused = httpx.get(f"{path}/input_items", params=bad, headers=server.headers)  # hunt round 23 C-F4: param was null
            assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text
        deleted = httpx.delete(path, headers=server.headers)
        assert deleted.status_code == 200 and deleted.json() == {"id": second.id, "object": "response", "deleted": True}
        for gone in (lambda: client.responses.retrieve(second.id), lambda: client.responses.delete(second.id),
                     lambda: client.responses.input_items.list(second.id)):
            with pytest.raises(openai.NotFoundError):
                gone()
        with pytest.raises(openai.BadRequestError):
            client.responses.create(model=MODEL, input="And tomorrow?", previous_response_id=second.id)
        assert client.responses.retrieve(first.id).id == first.id  # only the one named


def test_a_stateless_client_gets_its_reasoning_back_through_encrypted_content(server):
    """Before: `include: ["reasoning.encrypted_content"]` was ignored, so a store-false client (LangChain's documented
    setup) had no reasoning to send back with the tool result, and the prompt lost the reasoning behind the call."""
    tool = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    ask = {"role": "user", "content": "What is the weather in Paris?"}
    base = {"model": MODEL, "tools": [tool], "store": False, "include": ["reasoning.encrypted_content"]}
    first = post_json(server, "/v1/responses", {**base, "input": [ask]})
    reasoning, call = first["output"]
    assert reasoning["type"] == "reasoning" and call["type"] == "function_call"
    sealed = reasoning["encrypted_content"]
    assert isinstance(sealed, str) and reasoning["content"][0]["text"] not in sealed
    result = {"type": "function_call_output", "call_id": call["call_id"], "output": '{"temperature_c": 7, "condition": "rainy"}'}
    stateless = {"type": "reasoning", "id": reasoning["id"], "summary": [], "encrypted_content": sealed}
    kept = post_json(server, "/v1/responses", {**base, "input": [ask, stateless, call, result]})
    in_clear = post_json(server, "/v1/responses", {**base, "input": [ask, reasoning, call, result]})
    without = post_json(server, "/v1/responses", {**base, "input": [ask, call, result]})
    assert kept["usage"]["input_tokens"] == in_clear["usage"]["input_tokens"] > without["usage"]["input_tokens"]
    assert kept["output_text"] == in_clear["output_text"]
    # A client that kept only the summary (asked with `reasoning.summary`: the reasoning text itself) sends it back alone
    summarized = {"type": "reasoning", "id": reasoning["id"], "summary": [{"type": "summary_text", "text": reasoning["content"][0]["text"]}]}
    by_summary = post_json(server, "/v1/responses", {**base, "input": [ask, summarized, call, result]})
    assert by_summary["usage"]["input_tokens"] == in_clear["usage"]["input_tokens"]
    foreign = {**stateless, "encrypted_content": "gAAAAABo-openai-blob"}
    refused = post_json(server, "/v1/responses", {**base, "input": [ask, foreign, call, result]}, status=400)["error"]
    assert refused["param"] == "input[1].encrypted_content" and "pattern" in refused["message"]
    streamed = events(server, {**base, "input": [ask]})
    (done,) = [e for e in streamed if e["type"] == "response.function_call_arguments.done"]
    assert done["name"] == "get_weather"  # OpenAI's event has it (before: missing)


def test_usage_has_the_cache_writes_the_openai_sdk_requires(server):
    """Before: `input_tokens_details` had no `cache_write_tokens`, a required field of the openai SDK's `ResponseUsage`
    (3.x), so `usage.input_tokens_details.cache_write_tokens` raised. A new prompt writes its full blocks; its repeat
    is served from the prefix cache and writes nothing."""
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="secret", max_retries=0)
    words = " ".join(uuid.uuid4().hex for _ in range(8))  # a prompt no other test sent (the server is shared)
    ask = {"model": MODEL, "input": f"Count these words: {words}", "max_output_tokens": 4, "temperature": 0}
    first = client.responses.create(**ask).usage  # its frame (system message) is cached by earlier requests
    assert first.input_tokens_details.cache_write_tokens > 0
    assert first.input_tokens_details.cached_tokens + first.input_tokens_details.cache_write_tokens == first.input_tokens // 16 * 16
    *_, last = client.responses.create(**ask, stream=True)  # response.incomplete (cut at 4 tokens)
    again = last.response.usage
    assert again.input_tokens_details.cached_tokens == (again.input_tokens - 1) // 16 * 16
    assert again.input_tokens_details.cache_write_tokens == 0



def test_reasoning_summary_carries_the_reasoning_text_sync_streamed_and_stored(server):
    """Before: `reasoning.summary` was accepted and ignored (`summary: []`), so clients that read reasoning only from
    the summary (the AI SDK's `openai()`, LangChain's streamed `useResponsesApi`) showed none. gpt-oss has no
    summariser: the summary is the reasoning text, one `summary_text` part, streamed with OpenAI's summary events."""
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="secret", max_retries=0)
    ask = dict(model=MODEL, input="What is the capital of France?", temperature=0, max_output_tokens=64)
    plain = client.responses.create(**ask).output[0]
    assert plain.type == "reasoning" and plain.summary == []  # not asked: as before
    summed = client.responses.create(**ask, reasoning={"summary": "auto"})
    reasoning = summed.output[0]
    assert [part.model_dump() for part in reasoning.content] == [part.model_dump() for part in plain.content]
    assert [(s.type, s.text) for s in reasoning.summary] == [("summary_text", plain.content[0].text)]
    assert client.responses.retrieve(summed.id).output[0].summary == reasoning.summary
    follow = client.responses.create(**{**ask, "input": "What is 2 + 3?"}, previous_response_id=summed.id)
    listed = [item for item in client.responses.input_items.list(follow.id, order="asc") if item.type == "reasoning"]
    assert [(item.id, item.summary) for item in listed] == [(reasoning.id, reasoning.summary)]  # as it was answered

    streamed = list(client.responses.create(**ask, reasoning={"summary": "detailed"}, stream=True))
    final = streamed[-1].response.output[0]
    assert final.summary == reasoning.summary and final.content == reasoning.content
    summary = [e for e in streamed if "reasoning_summary" in e.type]
    assert [e.type for e in summary] == (["response.reasoning_summary_part.added"]
                                         + ["response.reasoning_summary_text.delta"] * (len(summary) - 3)
                                         + ["response.reasoning_summary_text.done", "response.reasoning_summary_part.done"])
    assert all(type(e).__name__.startswith("ResponseReasoningSummary") for e in summary)  # the SDK's own event types
    assert {(e.item_id, e.output_index, e.summary_index) for e in summary} == {(final.id, 0, 0)}
    assert "".join(e.delta for e in summary[1:-2]) == summary[-2].text == summary[-1].part.text == final.summary[0].text
    assert summary[-1].status is None
    done = next(i for i, e in enumerate(streamed) if e.type == "response.output_item.done")
    assert streamed.index(summary[-1]) < done  # closed before its item, as OpenAI's server does

    cut = list(client.responses.create(**{**ask, "max_output_tokens": 20}, reasoning={"summary": "concise"}, stream=True))
    assert cut[-1].type == "response.incomplete"
    (part_done,) = [e for e in cut if e.type == "response.reasoning_summary_part.done"]
    assert part_done.status == "incomplete"  # max_output_tokens cut the reasoning
    (item,) = cut[-1].response.output
    assert [s.text for s in item.summary] == [part_done.part.text] == [item.content[0].text]


def test_generate_summary_asks_for_the_summary_as_summary_does(server):
    """Hunt round 18 C-F5: `reasoning.generate_summary` (OpenAI's deprecated name of `summary`) was echoed and ignored:
    a client using the old name asked for a summary and got `summary: []`, the echo saying `summary: null`."""
    ask = {"model": MODEL, "input": "What is the capital of France?", "max_output_tokens": 64}
    by_name = post_json(server, "/v1/responses", {**ask, "reasoning": {"summary": "concise"}})
    for reasoning in ({"generate_summary": "concise"}, {"generate_summary": "concise", "summary": "concise"}):
        answer = post_json(server, "/v1/responses", {**ask, "reasoning": reasoning})
        assert answer["output"][0]["summary"] == by_name["output"][0]["summary"] != [], answer["output"][0]
        assert answer["reasoning"] == {"effort": "medium", "summary": "concise", "generate_summary": "concise"}
    two = {**ask, "reasoning": {"summary": "auto", "generate_summary": "detailed"}}
    refused = httpx.post(f"{server.base}/v1/responses", json=two, headers=server.headers, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "reasoning.generate_summary", refused.text
    assert "generate_summary (OpenAI's deprecated name of summary) is 'detailed' but summary is 'auto'" in refused.text
    document = httpx.get(f"{server.base}/openapi.json", headers=server.headers).json()
    accepts = Draft202012Validator({"$ref": "#/components/schemas/ResponsesRequest", "components": document["components"]}).is_valid
    assert not accepts(two) and accepts({**ask, "reasoning": {"summary": "auto", "generate_summary": "auto"}})


def test_a_response_object_always_has_error_incomplete_details_and_text(server):
    """Before: a response left out `error` and `incomplete_details` when unset (OpenAI always sends both, null; openai-
    node types them as required, so `response.error !== null` fired) and echoed `text: null` where OpenAI names the
    format, `{"format": {"type": "text"}}` when none was asked. In every object: sync, stream frames, retrieve."""
    body = {"model": MODEL, "input": "What is the capital of France?", "max_output_tokens": 64, "temperature": 0}
    plain = {"error": None, "incomplete_details": None, "text": {"format": {"type": "text"}}}

    def keys(response: dict) -> dict:
        return {key: response.get(key, "missing") for key in plain}

    sync = post_json(server, "/v1/responses", body)
    assert sync["status"] == "completed" and keys(sync) == plain
    assert keys(httpx.get(f"{server.base}/v1/responses/{sync['id']}", headers=server.headers).json()) == plain
    streamed = [e["response"] for e in events(server, body) if "response" in e]
    assert [r["status"] for r in streamed] == ["in_progress", "in_progress", "completed"]
    assert all(keys(r) == plain for r in streamed)
    run = httpx.post(server.run_url(), json=body, headers=server.headers, timeout=120).json()["result"]
    assert keys(run) == plain
    cut = post_json(server, "/v1/responses", {**body, "max_output_tokens": 8})
    assert keys(cut) == {**plain, "incomplete_details": {"reason": "max_output_tokens"}}

    fmt = {"type": "json_schema", "name": "city", "schema": {"type": "object", "properties": {"city": {"type": "string"}}},
           "strict": True}
    asked = post_json(server, "/v1/responses", {**body, "text": {"format": fmt}})
    assert asked["text"] == {"format": fmt}
    chat_spelled = {"type": "json_schema", "json_schema": {"name": "city", "schema": fmt["schema"]}}
    assert post_json(server, "/v1/responses", {**body, "response_format": chat_spelled})["text"] == {"format": {**fmt, "strict": False}}
    assert post_json(server, "/v1/responses", {**body, "response_format": {"type": "json_object"}})["text"] == {"format": {"type": "json_object"}}


def test_a_completed_response_says_when(server):
    """Hunt round 13 A-F2: `completed_at` was never there; OpenAI sets it (Unix seconds) on a completed response and
    leaves it null otherwise. Every copy of the final object (the answer, the stream's last event, retrieve) says the
    same time."""
    body = {"model": MODEL, "input": "What is the capital of France?", "max_output_tokens": 64, "temperature": 0}
    sync = post_json(server, "/v1/responses", body)
    assert sync["status"] == "completed" and isinstance(sync["completed_at"], int)
    assert sync["created_at"] <= sync["completed_at"] <= time.time() + 1
    assert httpx.get(f"{server.base}/v1/responses/{sync['id']}", headers=server.headers).json()["completed_at"] == sync["completed_at"]
    streamed = [e["response"] for e in events(server, body) if "response" in e]
    assert [r["completed_at"] for r in streamed[:-1]] == [None, None] and isinstance(streamed[-1]["completed_at"], int)
    cut = post_json(server, "/v1/responses", {**body, "max_output_tokens": 8})
    assert cut["status"] == "incomplete" and cut["completed_at"] is None


def test_reasoning_is_echoed_with_the_effort_used_and_the_summary_asked(server):
    """Before: `reasoning` was echoed as sent (null when not sent); OpenAI echoes `{effort, summary}` for a reasoning
    model, the effort it reasoned with included (round 8's fixer noticed)."""
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="secret", max_retries=0)
    ask = {"model": MODEL, "input": GERMANY, "max_output_tokens": 8}
    assert client.responses.create(**ask).reasoning.model_dump(exclude_none=True) == {"effort": "medium"}
    sent = client.responses.create(**ask, reasoning={"effort": "low", "summary": "auto"})
    assert (sent.reasoning.effort, sent.reasoning.summary) == ("low", "auto")
    assert client.responses.retrieve(sent.id).reasoning.effort == "low"
    raw = post_json(server, "/v1/responses", ask)
    assert raw["reasoning"] == {"effort": "medium", "summary": None}


# -- truncation: "auto" ------------------------------------------------------------------------------------------------

WINDOW = 512


@pytest.fixture(scope="module")
def small_window(checkpoints, tmp_path_factory):
    """The real server on the tiny random checkpoint with a 512-token window: a conversation outgrows it in two turns."""
    from tests.server_util import start_server

    s = start_server(checkpoints["original"], tmp_path_factory.mktemp("small-window"), "--rate-limit", "0",
                     "--max-model-len", str(WINDOW))
    yield s
    s.stop()


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="x", max_retries=0, timeout=120)


def _as_input(item) -> dict:
    """An item `input_items` listed, as an input item (the caller sending the same conversation inline)."""
    data = item.model_dump(exclude_none=True, exclude={"id", "status"})
    if data["type"] == "message":
        return {"role": data["role"], "content": "".join(part["text"] for part in data["content"])}
    return data


def test_truncation_auto_drops_the_oldest_turns_of_a_conversation_past_the_window(small_window):
    """hunt_py MEDIUM-3. Before: `truncation` was an unknown field, ignored, so a `previous_response_id` chain that
    outgrew the window was a 400 (code 8) for ever, "auto" or not. Now "auto" drops the oldest items (the first turn's
    question here) until the prompt and `max_output_tokens` fit; the instructions stay; usage counts the prompt read,
    which is the prompt of the kept items sent inline; `input_items` lists what the model read; "disabled" (the
    default) keeps the 400."""
    client = _client(small_window)
    ask = dict(model=MODEL, instructions="Be brief.", max_output_tokens=16, temperature=0)
    first = client.responses.create(**ask, input="hello " * 200)
    question = "hello " * 200 + "Now say hi."
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(**ask, previous_response_id=first.id, input=question)
    assert refused.value.code == "8" and f"context window of {WINDOW} tokens" in refused.value.message
    with pytest.raises(openai.BadRequestError) as disabled:
        client.responses.create(**ask, previous_response_id=first.id, input=question, truncation="disabled")
    assert disabled.value.code == "8"

    second = client.responses.create(**ask, previous_response_id=first.id, input=question, truncation="auto")
    assert second.status in ("completed", "incomplete") and second.truncation == "auto"
    assert second.usage.input_tokens + 16 <= WINDOW
    items = list(client.responses.input_items.list(second.id, order="asc"))
    assert items[-1].type == "message" and items[-1].content[0].text == question  # the newest item stays
    read = [entry.id for entry in items]
    first_items = list(client.responses.input_items.list(first.id))
    assert first_items[0].id not in read  # the first question went
    assert [o.id for o in first.output if o.id in read] == read[:-1]  # its answer stays: it fits
    inline = client.responses.create(**ask, input=[_as_input(item) for item in items])
    assert inline.usage.input_tokens == second.usage.input_tokens and inline.truncation == "disabled"
    assert client.responses.retrieve(second.id).truncation == "auto"
    counted = client.responses.input_tokens.count(model=MODEL, instructions="Be brief.", previous_response_id=first.id,
                                                  input=question, truncation="auto", extra_body={"max_output_tokens": 16})
    assert counted.input_tokens == second.usage.input_tokens  # the count drops what the response would

    third = client.responses.create(**ask, previous_response_id=second.id, input=question, truncation="auto")
    assert third.usage.input_tokens + 16 <= WINDOW  # the chain goes on


def test_truncation_auto_keeps_instructions_and_drops_a_call_with_its_output(small_window):
    """A function_call goes with its function_call_output (the output alone would name no call: a 400), developer and
    system messages stay (they are the instructions), and when even the newest item leaves no room the 400 (code 8)
    is as without truncation."""
    client = _client(small_window)
    developer = {"role": "developer", "content": "Answer in French."}
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
    output = {"type": "function_call_output", "call_id": "call_1", "output": "rainy " * 450}
    question = {"role": "user", "content": "What should I wear?"}
    ask = dict(model=MODEL, tools=[WEATHER], max_output_tokens=16, temperature=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(**ask, input=[developer, call, output, question])
    assert refused.value.code == "8"
    truncated = client.responses.create(**ask, input=[developer, call, output, question], truncation="auto")
    items = list(client.responses.input_items.list(truncated.id, order="asc"))
    assert [(item.type, item.role) for item in items] == [("message", "developer"), ("message", "user")]
    kept = client.responses.create(**ask, input=[developer, question])
    assert truncated.usage.input_tokens == kept.usage.input_tokens

    with pytest.raises(openai.BadRequestError) as too_long:
        client.responses.create(**ask, input=[question, {"role": "user", "content": "hello " * 600}], truncation="auto")
    assert too_long.value.code == "8" and "+ max_output_tokens (16)" in too_long.value.message


def test_truncation_auto_without_max_output_tokens_keeps_room_for_the_default_answer(small_window):
    """Without `max_output_tokens` the room kept for the answer is the surface's default limit (4096 on /v1) but at
    most half the window: the prompt is cut to 256 tokens here, where without truncation it fills the window up to
    what the answer needs (a conversation near the edge would get answers of a token or two)."""
    client = _client(small_window)
    first = client.responses.create(model=MODEL, input="hello " * 200, max_output_tokens=16, temperature=0)
    follow = dict(model=MODEL, previous_response_id=first.id, input="hello " * 100, temperature=0)
    untruncated = client.responses.create(**follow, max_output_tokens=1)
    assert untruncated.usage.input_tokens > WINDOW // 2
    second = client.responses.create(**follow, truncation="auto")
    assert second.usage.input_tokens <= WINDOW // 2


def _collapsed(events_: list[dict]) -> list[dict]:
    """A stream's events without `sequence_number`, the deltas of each kind between two other events as one delta with
    their text joined (the live stream sends a delta per token, each reasoning one followed by its summary's, the
    replay one per part)."""
    out: list[dict] = []
    since = 0  # where the deltas after the last other event start
    for event in events_:
        event = {key: value for key, value in event.items() if key != "sequence_number"}
        same = [i for i in range(since, len(out)) if out[i]["type"] == event["type"]]
        if event["type"].endswith(".delta") and same:
            out[same[0]] = {**out[same[0]], "delta": out[same[0]]["delta"] + event["delta"]}
        else:
            out.append(event)
            since = since if event["type"].endswith(".delta") else len(out)
    return out


def _sse(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream"), response.text
    frames = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    return [json.loads(data) for data in frames[:-1]]


def test_retrieve_with_stream_replays_the_stored_response_as_its_events(server):
    """Before: `GET /v1/responses/{id}?stream=true` ignored `stream` and answered the JSON object, which the SDKs read
    as an SSE stream of no events (`retrieve(id, stream=True)` yielded nothing, `responses.stream(response_id=…)` raised
    "Didn't receive a `response.completed` event"). Now the stored response is replayed as the events the live stream
    sent (one delta per part), from sequence_number 0 or after `starting_after`, on both prefixes."""
    answer = events(server, {"model": MODEL, "input": GERMANY})
    live = events(server, {"model": MODEL, "input": "What is the weather in Paris?", "tools": [WEATHER],
                           "reasoning": {"summary": "auto"}})
    assert [item["type"] for item in answer[-1]["response"]["output"]] == ["reasoning", "message"]
    assert [item["type"] for item in live[-1]["response"]["output"]] == ["reasoning", "function_call"]
    for streamed, prefix in ((answer, "/v1"), (live, "/v1"), (live, "/client/v4/accounts/acct/ai/v1")):
        assert streamed[-1]["type"] == "response.completed"
        rid = streamed[0]["response"]["id"]
        replayed = _sse(httpx.get(f"{server.base}{prefix}/responses/{rid}", params={"stream": "true"}, headers=server.headers))
        assert [e["sequence_number"] for e in replayed] == list(range(len(replayed)))
        assert _collapsed(replayed) == _collapsed(streamed)
        after = _sse(httpx.get(f"{server.base}{prefix}/responses/{rid}", params={"stream": "true", "starting_after": 3},
                               headers=server.headers))
        assert after == replayed[4:]
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="secret", max_retries=0)
    sdk = list(client.responses.retrieve(rid, stream=True, starting_after=2))
    assert [e.sequence_number for e in sdk] == [e["sequence_number"] for e in replayed[3:]]
    with client.responses.stream(response_id=rid) as stream:
        final = stream.get_final_response()
    assert final.id == rid and final.output[-1].arguments == live[-1]["response"]["output"][-1]["arguments"]
    cut = post_json(server, "/v1/responses", {"model": MODEL, "input": GERMANY, "max_output_tokens": 20})
    replay = _sse(httpx.get(f"{server.base}/v1/responses/{cut['id']}", params={"stream": "true"}, headers=server.headers))
    assert replay[-1] == {"type": "response.incomplete", "sequence_number": len(replay) - 1, "response": cut}
    assert replay[0]["response"]["status"] == "in_progress" and replay[0]["response"]["output"] == []
    missing = httpx.get(f"{server.base}/v1/responses/resp_nothing", params={"stream": "true"}, headers=server.headers)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "5006"


def test_background_needs_store_and_cancel_answers_as_openai_does(server):
    """Before: `background: true` with `store: false` was accepted (OpenAI refuses it: a background response must be
    kept to be fetched), and `POST /v1/responses/{id}/cancel` had no route (404 7000). A finished background response
    is returned unchanged; one not created in background mode is a 400; an unknown id the retrieve's 404."""
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="secret", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, input="Hi", max_output_tokens=3, background=True, store=False)
    assert caught.value.body["param"] == "background" and "store" in caught.value.body["message"]
    done = until_ended(client, client.responses.create(model=MODEL, input="Hi", max_output_tokens=8, background=True).id)
    assert done.status in ("completed", "incomplete")
    assert client.responses.cancel(done.id).model_dump() == client.responses.retrieve(done.id).model_dump()
    plain = client.responses.create(model=MODEL, input="Hi", max_output_tokens=8)
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.cancel(plain.id)
    assert caught.value.body["param"] == "response_id" and "background" in caught.value.body["message"]
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.cancel("resp_nothing")
    assert caught.value.body["code"] == "5006"


def test_a_background_body_on_ai_run_is_stored_and_continued(server):
    """Hunt round 20 C-F1: `/ai/run` serves `background: true` as a plain request (sync, streamed or a batch item), and
    its answer said `store: true`, but it was stored only over a background snapshot that `/ai/run` never makes: the
    retrieve was a 404 and `previous_response_id` a 400, the conversation lost without a signal."""
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="secret", max_retries=0)
    body = {"input": "Hi", "max_output_tokens": 8, "background": True}
    sync = httpx.post(server.run_url(), json=body, headers=server.headers, timeout=60).json()["result"]
    with httpx.stream("POST", server.run_url(), json={**body, "stream": True}, headers=server.headers, timeout=60) as r:
        streamed = sse_events(r.iter_lines())[-1]["response"]
    queued = httpx.post(server.run_url(), params={"queueRequest": "true"}, json={"requests": [body]}, headers=server.headers,
                        timeout=60).json()["result"]["request_id"]
    for _ in range(600):
        polled = httpx.post(server.run_url(), json={"request_id": queued}, headers=server.headers, timeout=60).json()["result"]
        if polled["status"] == "done":
            break
        time.sleep(0.05)
    for answer in (sync, streamed, polled["results"][0]):
        assert answer["store"] is True and answer["background"] is True, answer
        assert client.responses.retrieve(answer["id"]).output_text == answer["output_text"]
        assert client.responses.create(model=MODEL, input="More", max_output_tokens=3, previous_response_id=answer["id"]).id


def until_ended(client: openai.OpenAI, rid: str, within: float = 60) -> openai.types.responses.Response:
    """`responses.retrieve(rid)` polled, as an SDK user polls a background response, until it has ended."""
    deadline = time.monotonic() + within
    while True:
        polled = client.responses.retrieve(rid)
        if polled.status not in ("queued", "in_progress") or time.monotonic() > deadline:
            return polled
        time.sleep(0.02)


@pytest.mark.parametrize("prefix", ["/v1", "/client/v4/accounts/acct/ai/v1"], ids=["bare", "account-prefixed"])
def test_a_background_create_without_stream_answers_at_once_and_is_polled(server, prefix):
    """Before (tester, slow CPU): `background: true` without `stream` was served as a plain request: the create
    answered only with the finished response (92 s for a 3000-token prompt on the 20b model), so a client whose timeout
    was shorter got no id to poll, and its leaving cancelled the run. Now it answers at once with the response
    `queued` (OpenAI's status for a just-created background response, as its SDK types it), and the run goes on
    detached as a background stream's does: retrieve answers `in_progress` then the end, `?stream=true` follows it."""
    client = openai.OpenAI(base_url=f"{server.base}{prefix}", api_key="secret", max_retries=0, timeout=60)
    ask = dict(model=MODEL, input=GERMANY, max_output_tokens=400, temperature=0, metadata={"k": "v"})
    created = client.responses.create(**ask, background=True)
    assert created.status == "queued", created.status
    assert created.id.startswith("resp_") and created.background is True and created.metadata == {"k": "v"}
    assert created.output == [] and created.usage is None and created.error is None
    done = until_ended(client, created.id)
    assert done.status in ("completed", "incomplete") and done.usage.output_tokens > 0
    assert (done.id, done.created_at, done.background) == (created.id, created.created_at, True)
    plain = client.responses.create(**ask)  # the same answer a plain request gets
    assert done.status == plain.status and done.output_text == plain.output_text
    assert done.status == "incomplete" or done.output_text

    # Followed live from its start: every event, ending with the stored response.
    followed = client.responses.create(**ask, background=True)
    with httpx.stream("GET", f"{server.base}{prefix}/responses/{followed.id}", params={"stream": "true"},
                      headers=server.headers, timeout=60) as r:
        live = sse_events(r.iter_lines())
    assert [e["sequence_number"] for e in live] == list(range(len(live)))
    assert live[0]["type"] == "response.created" and live[-1]["type"] == f"response.{done.status}"
    stored = httpx.get(f"{server.base}{prefix}/responses/{followed.id}", headers=server.headers).json()
    assert live[-1]["response"] == stored and stored["id"] == followed.id
    assert live[-1]["response"]["output_text"] == plain.output_text


def test_a_non_streamed_background_run_can_be_cancelled_and_a_refused_one_is_never_queued(server):
    """The run a non-streamed background create starts is cancelled as a streamed one is (its engine request aborted,
    kept `cancelled` with the output so far). What refuses the request (here a prompt and `max_output_tokens` past the
    context window) is still its HTTP error, before anything is queued or stored."""
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="secret", max_retries=0, timeout=60)
    for seed in range(8):
        created = client.responses.create(model=MODEL, input="Hi", max_output_tokens=4000, background=True,
                                          extra_body={"seed": seed})
        assert created.status == "queued"
        cancelled = client.responses.cancel(created.id)
        if cancelled.status == "cancelled":
            break
    else:
        pytest.fail("every background run ended before it was cancelled")
    assert cancelled.id == created.id and cancelled.background is True and cancelled.usage is not None
    assert cancelled.usage.output_tokens < 4000
    deadline = time.monotonic() + 5
    while (stats := server.health())["running"] or stats["waiting"]:
        assert time.monotonic() < deadline, f"the cancelled run still runs: {stats}"
        time.sleep(0.05)
    assert client.responses.retrieve(created.id).model_dump() == cancelled.model_dump()
    assert client.responses.cancel(created.id).model_dump() == cancelled.model_dump()

    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=MODEL, input="Hi", max_output_tokens=200000, background=True)
    assert refused.value.code == "8" and "200000" in refused.value.message
    stats = server.health()
    assert stats["running"] == 0 and stats["waiting"] == 0, stats


def test_a_background_run_whose_end_the_disk_refuses_is_polled_to_its_end(tmp_path):
    """Before (session 31's note): a background run whose `in_progress` snapshot was stored, then whose end the data
    directory refused (a disk that filled up while it ran), was retrieved `in_progress` until a restart failed it: a
    poller waited for ever. Its end is now held in memory and retrieved; it cannot be continued (its output is not in
    the file), which is a 400 saying so. The disk refuses for real: RLIMIT_FSIZE 0 on the server while the run runs."""
    import resource

    from ossrun.model.resolve import resolve_model
    from tests.server_util import start_server

    own = start_server(resolve_model("demo"), tmp_path / "data")
    client = openai.OpenAI(base_url=f"{own.base}/v1", api_key="none", max_retries=0, timeout=60)
    _, hard = resource.prlimit(own.process.pid, resource.RLIMIT_FSIZE)
    try:
        for seed in range(8):
            with client.responses.create(model=MODEL, input="Hi", max_output_tokens=4000, background=True, stream=True,
                                         extra_body={"seed": seed}) as events:
                first = next(iter(events))
                resource.prlimit(own.process.pid, resource.RLIMIT_FSIZE, (0, hard))
                running = client.responses.retrieve(first.response.id).status == "in_progress"
                ended = [event for event in events][-1]
            if running:
                break
            resource.prlimit(own.process.pid, resource.RLIMIT_FSIZE, (hard, hard))
        else:
            pytest.fail("every background run ended before the disk filled up")
        assert ended.type in ("response.completed", "response.incomplete")
        polled = client.responses.retrieve(first.response.id)
        assert polled.status == ended.response.status and polled.output_text == ended.response.output_text
        assert polled.model_dump() == ended.response.model_dump()
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(model=MODEL, input="And?", previous_response_id=polled.id)
        assert "its output was not stored" in refused.value.message and refused.value.param == "previous_response_id"
        # Hunt round 23 C-F3: a plain response answered now (200: the answer exists) is not kept, and its continuation
        # said "unknown, or expired". It says why.
        unkept = client.responses.create(model=MODEL, input="Hi", max_output_tokens=4)
        for why in (lambda: client.responses.create(model=MODEL, input="And?", previous_response_id=unkept.id),
                    lambda: client.responses.retrieve(unkept.id)):
            with pytest.raises((openai.BadRequestError, openai.NotFoundError)) as refused:
                why()
            assert "refused writes" in refused.value.message and "not stored" in refused.value.message, refused.value.message
        # Hunt round 23 C-F2: the held end stayed in memory only, and a restart read it `failed` ("the server stopped
        # before this background response ended"). Once the data directory takes writes again it is written.
        resource.prlimit(own.process.pid, resource.RLIMIT_FSIZE, (hard, hard))
        deadline = time.monotonic() + 30
        while own.health()["batch_store"] != "ok" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.responses.create(model=MODEL, input="And?", previous_response_id=polled.id, max_output_tokens=8).id
        items = client.responses.input_items.list(polled.id, order="asc").data
    finally:
        own.stop()
    assert "Traceback" not in own.log.read_text()
    own = start_server(resolve_model("demo"), tmp_path / "data")
    try:
        client = openai.OpenAI(base_url=f"{own.base}/v1", api_key="none", max_retries=0, timeout=60)
        assert client.responses.retrieve(polled.id).model_dump() == polled.model_dump()  # as it ended, not failed
        assert client.responses.input_items.list(polled.id, order="asc").data == items  # the same ids
        client.responses.delete(polled.id)  # the SDK returns nothing
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(polled.id)
    finally:
        own.stop()


def test_a_delete_the_disk_refuses_is_a_503_that_leaves_a_running_background_response_running(tmp_path):
    """Hunt round 15 A-F1: with the data directory refusing writes, DELETE /v1/responses/{id} was a 500 "internal
    error" with a traceback, /health said nothing, and a running background response was cancelled before the delete
    failed. Now it is the storage 503 (3040) the other writes answer, /health says failing, and the run goes on; once
    the disk takes writes again the delete works, the run stopped with it. RLIMIT_FSIZE 0 on the server refuses for real."""
    import resource

    from ossrun.model.resolve import resolve_model
    from tests.server_util import start_server

    own = start_server(resolve_model("demo"), tmp_path / "data")
    client = openai.OpenAI(base_url=f"{own.base}/v1", api_key="none", max_retries=0, timeout=60)
    _, hard = resource.prlimit(own.process.pid, resource.RLIMIT_FSIZE)
    try:
        stored = client.responses.create(model=MODEL, input="Hi", max_output_tokens=8)
        for seed in range(8):
            running = client.responses.create(model=MODEL, input="Hi", max_output_tokens=4000, background=True, extra_body={"seed": seed})
            resource.prlimit(own.process.pid, resource.RLIMIT_FSIZE, (0, hard))
            refused = [httpx.delete(f"{own.base}/v1/responses/{rid}", timeout=60) for rid in (stored.id, running.id)]
            if client.responses.retrieve(running.id).status == "in_progress":
                break
            resource.prlimit(own.process.pid, resource.RLIMIT_FSIZE, (hard, hard))
        else:
            pytest.fail("every background run ended before the delete")
        for answer in refused:
            assert answer.status_code == 503, answer.text
            error = answer.json()["error"]
            assert error["code"] == "3040" and "the storage of the responses cannot be written" in error["message"], error
        assert own.health()["batch_store"] == "failing"
        assert client.responses.retrieve(stored.id).id == stored.id
        resource.prlimit(own.process.pid, resource.RLIMIT_FSIZE, (hard, hard))
        for rid in (stored.id, running.id):
            client.responses.delete(rid)  # the SDK returns nothing
            with pytest.raises(openai.NotFoundError):
                client.responses.retrieve(rid)
        idle = own.wait_idle()
        assert idle["running"] == 0 and idle["waiting"] == 0, idle  # the deleted run was stopped
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(running.id)  # its end did not store it again
    finally:
        own.stop()
    log = own.log.read_text()
    assert "unhandled error" not in log and "Traceback" not in log


def test_input_tokens_count_is_the_usage_the_response_gets(server):
    """Before: `POST /v1/responses/input_tokens` (`client.responses.input_tokens.count`) was a 405 naming GET and DELETE
    (taken for a response id), as was `POST /v1/responses/compact`. Now it counts the prompt exactly as the same body
    would be rendered by `POST /v1/responses`, a previous response's conversation and tools included."""
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="secret", max_retries=0)
    first = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[WEATHER], temperature=0)
    call = first.output[-1]
    body = dict(model=MODEL, previous_response_id=first.id, tools=[WEATHER], instructions="Be brief.",
                input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    counted = client.responses.input_tokens.count(**body)
    assert counted.object == "response.input_tokens"
    assert counted.input_tokens == client.responses.create(**body, max_output_tokens=16).usage.input_tokens
    assert client.responses.input_tokens.count(model=MODEL, input=GERMANY).input_tokens == \
        post_json(server, "/v1/responses", {"model": MODEL, "input": GERMANY, "max_output_tokens": 4})["usage"]["input_tokens"]
    prefixed = httpx.post(f"{server.base}/client/v4/accounts/acct/ai/v1/responses/input_tokens", headers=server.headers,
                          json={"model": MODEL, "input": GERMANY})
    assert prefixed.json() == {"object": "response.input_tokens", "input_tokens": counted_plain(client)}
    # `input` may be left out (or null), as on OpenAI (recheck: it was a 400 "Field required"): the conversation alone
    # is counted as it is read with no new item.
    # A whole answer: the reasoning of one cut by max_output_tokens goes from the prompt once a user message follows
    # (B-F2), so a follow-up of a cut answer can count fewer tokens than the conversation alone.
    answered = client.responses.create(model=MODEL, input=GERMANY, temperature=0)
    alone = client.responses.input_tokens.count(previous_response_id=answered.id, instructions="Be brief.")
    assert alone.input_tokens == client.responses.input_tokens.count(previous_response_id=answered.id,
                                                                     instructions="Be brief.", input=[]).input_tokens
    follow = client.responses.create(model=MODEL, previous_response_id=answered.id, instructions="Be brief.",
                                     input="Thanks.", max_output_tokens=4)
    assert answered.usage.input_tokens < alone.input_tokens < follow.usage.input_tokens  # its answer in, no new item
    nothing = httpx.post(f"{server.base}/v1/responses/input_tokens", headers=server.headers, json={"input": None})
    assert nothing.status_code == 200 and nothing.json()["input_tokens"] > 0, nothing.text
    refused = httpx.post(f"{server.base}/v1/responses/input_tokens", headers=server.headers, json={"input": 5})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "input"
    for path in ("/v1/responses/compact", f"/v1/responses/{first.id}/steer"):
        unrouted = httpx.post(f"{server.base}{path}", headers=server.headers, json={"model": MODEL, "input": "Hi"})
        assert unrouted.status_code == 404 and unrouted.json()["error"]["code"] == "7000", unrouted.text


def counted_plain(client: openai.OpenAI) -> int:
    return client.responses.input_tokens.count(model=MODEL, input=GERMANY).input_tokens


def test_a_create_may_leave_input_out_as_openai_allows(server):
    """Before (hunt round 16 A-F4): `responses.create(previous_response_id=…)` with no new item (to continue an answer
    cut by max_output_tokens) and `responses.create(instructions=…)` alone were a 400 "at '/input': Field required",
    though OpenAI's API and SDK take `input` as optional (and ossrun's own count did). Now a left-out or null `input`
    is no new item, on create as on the count; the document says so."""
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="secret", max_retries=0)
    cut = client.responses.create(model=MODEL, input=GERMANY, max_output_tokens=12, temperature=0)
    assert cut.status == "incomplete"
    resumed = client.responses.create(model=MODEL, previous_response_id=cut.id, max_output_tokens=64, temperature=0)
    assert resumed.status in ("completed", "incomplete") and resumed.output
    as_empty = client.responses.create(model=MODEL, previous_response_id=cut.id, input=[], max_output_tokens=64,
                                       temperature=0)
    assert resumed.usage.input_tokens == as_empty.usage.input_tokens
    assert [item.model_dump(exclude={"id"}) for item in resumed.output] == \
        [item.model_dump(exclude={"id"}) for item in as_empty.output]
    told = client.responses.create(model=MODEL, instructions="Greet the user.", max_output_tokens=64)
    assert told.output and told.usage.input_tokens > 0
    null = httpx.post(f"{server.base}/v1/responses", headers=server.headers,
                      json={"model": MODEL, "input": None, "instructions": "Greet the user.", "max_output_tokens": 8})
    assert null.status_code == 200, null.text
    document = httpx.get(f"{server.base}/openapi.json", headers=server.headers).json()
    ref = document["paths"]["/v1/responses"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert "input" not in body["required"] and {"type": "null"} in body["properties"]["input"]["anyOf"]
    wrong = httpx.post(f"{server.base}/v1/responses", headers=server.headers, json={"model": MODEL, "input": 5})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "input", wrong.text


def test_input_tokens_document_and_server_agree(server):
    """Before (hunt_new L4): the document gave `POST /v1/responses/input_tokens` the create body (`model` required,
    and `stream`, `background`, `store`… offered), while the server counts a body without `model` and reads none of
    those (yet refused `background` with `store: false`). Now the document's body is what the count reads, `model`
    optional, and the server ignores the rest as it ignores any field it does not know."""
    document = httpx.get(f"{server.base}/openapi.json", headers=server.headers).json()
    for path in ("/v1/responses/input_tokens", "/client/v4/accounts/{account_id}/ai/v1/responses/input_tokens"):
        ref = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        body = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
        assert body["required"] == [] and {"type": "null"} in body["properties"]["input"]["anyOf"], path
        assert {"model", "input", "instructions", "tools", "previous_response_id", "truncation"} <= set(body["properties"])
        assert not {"stream", "background", "store", "temperature", "metadata"} & set(body["properties"]), path
    bare = httpx.post(f"{server.base}/v1/responses/input_tokens", headers=server.headers, json={"input": GERMANY})
    assert bare.status_code == 200, bare.text
    # The fuzzer's negative case (2026-12-03): an id against its pattern, `input_tokens`, is the count route's 405; the
    # document lists that status on the retrieve and the delete.
    for method, operation in (("GET", "get"), ("DELETE", "delete")):
        wrong = httpx.request(method, f"{server.base}/v1/responses/input_tokens", headers=server.headers)
        assert wrong.status_code == 405 and "405" in document["paths"]["/v1/responses/{response_id}"][operation]["responses"]
    unread = httpx.post(f"{server.base}/v1/responses/input_tokens", headers=server.headers,
                        json={"input": GERMANY, "stream": True, "background": True, "store": False, "temperature": 9})
    assert unread.status_code == 200 and unread.json() == bare.json(), unread.text


def sse_events(lines) -> list[dict]:
    """The JSON events of an SSE stream's `data:` lines, up to its `[DONE]` (which must come)."""
    data = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]", data[-3:]
    return [json.loads(item) for item in data[:-1]]


def test_a_resume_after_a_background_run_ended_gets_the_events_the_live_stream_numbered(server):
    """Before (hunt_new H1): once a background run had ended, `?stream=true&starting_after=N` answered from a replay of
    the stored response (one delta per item), so N named another event: a client that dropped inside the answer and
    resumed after the end got no event at all (not the rest of the text, not `response.completed`). Now a run's frames
    are kept for a while after it ends, and the resume is exactly the live stream's events after N."""
    with httpx.stream("POST", f"{server.base}/v1/responses", headers=server.headers, timeout=120, json={
            "model": MODEL, "input": GERMANY, "max_output_tokens": 80, "temperature": 0, "background": True, "stream": True}) as r:
        live = sse_events(r.iter_lines())
    deltas = [e["sequence_number"] for e in live if e["type"].endswith(".delta")]
    assert len(deltas) >= 4 and live[-1]["type"] in ("response.completed", "response.incomplete")
    rid = live[0]["response"]["id"]
    assert httpx.get(f"{server.base}/v1/responses/{rid}", headers=server.headers).json() == live[-1]["response"]

    def resumed(after: int) -> list[dict]:
        with httpx.stream("GET", f"{server.base}/v1/responses/{rid}", headers=server.headers, timeout=60,
                          params={"stream": "true", "starting_after": after}) as answer:
            assert answer.status_code == 200, answer.read()
            return sse_events(answer.iter_lines())

    for after in (0, deltas[1], deltas[-2], len(live) - 2):
        assert resumed(after) == live[after + 1:], after
    assert resumed(len(live) - 1) == []  # the client has seen the end


# What Codex (OpenAI's coding agent) sends by default (hunt round 10): a namespace tool grouping function tools, and a
# web_search tool. Both were a 400, so every Codex turn failed.
NAMESPACE = {"type": "namespace", "name": "weather", "description": "Weather tools",
             "tools": [{**WEATHER, "strict": False}]}
WEB_SEARCH = {"type": "web_search", "external_web_access": False}


def test_namespace_tools_are_offered_as_dotted_functions_and_calls_name_their_namespace(server):
    """A namespace's functions are offered as NAMESPACE.FUNCTION (the prompt is token for token the one of a plain
    tool of that name); a call of one is a function_call item with `namespace` and the function's own name, as
    OpenAI returns it, and that item sent back (with its output) is read as the same call. Web search is accepted and
    not offered (the prompt is the same without it); both are echoed as sent."""
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="secret", max_retries=0)
    flat = {**WEATHER, "name": "weather.get_weather", "strict": False}
    question = "What is the weather in Paris?"
    count = lambda tools: client.responses.input_tokens.count(model=MODEL, input=question, tools=tools).input_tokens
    assert count([NAMESPACE, WEB_SEARCH]) == count([NAMESPACE]) == count([flat]) != count([])
    body = {"model": MODEL, "input": question, "tools": [NAMESPACE, WEB_SEARCH], "temperature": 0,
            "tool_choice": {"type": "function", "name": "weather.get_weather"}}
    answered = post_json(server, "/v1/responses", body)
    (call,) = [item for item in answered["output"] if item["type"] == "function_call"]
    assert call["namespace"] == "weather" and call["name"] == "get_weather" and "city" in json.loads(call["arguments"])
    assert answered["tools"] == [{"type": "namespace", "name": "weather", "description": "Weather tools",
                                  "tools": [{**WEATHER, "strict": False}]}, WEB_SEARCH]
    streamed = events(server, body)
    added = [e["item"] for e in streamed if e["type"] == "response.output_item.added" and e["item"]["type"] == "function_call"]
    assert [(item["namespace"], item["name"]) for item in added] == [("weather", "get_weather")]
    sent_back = [{"type": "message", "role": "user", "content": question}, {k: call[k] for k in ("type", "call_id", "name", "namespace", "arguments")},
                 {"type": "function_call_output", "call_id": call["call_id"], "output": '{"temperature_c": 7, "condition": "rainy"}'}]
    as_plain = [*sent_back[:1], {**sent_back[1], "name": "weather.get_weather", "namespace": None}, *sent_back[2:]]
    assert client.responses.input_tokens.count(model=MODEL, input=sent_back, tools=[NAMESPACE]).input_tokens == \
        client.responses.input_tokens.count(model=MODEL, input=as_plain, tools=[flat]).input_tokens
    final = post_json(server, "/v1/responses", {"model": MODEL, "input": sent_back, "tools": [NAMESPACE, WEB_SEARCH], "temperature": 0})
    assert final["status"] == "completed" and final["output_text"]


def test_forcing_web_search_and_stored_prompts_are_refused_by_name(server):
    """Web search is offered to nobody, so a tool_choice forcing it cannot be honoured; OpenAI's stored prompts
    (`prompt: {id, version}`) were ignored (the answer lacked the stored instructions): each a 400 naming it."""
    forced = post_json(server, "/v1/responses", {"model": MODEL, "input": "Hi", "tools": [WEB_SEARCH],
                                                 "tool_choice": {"type": "web_search"}}, status=400)["error"]
    assert forced["param"] == "tool_choice.type" and "web_search" in forced["message"]
    stored = post_json(server, "/v1/responses", {"model": MODEL, "input": "Hi", "prompt": {"id": "pmpt_1", "version": "2"}},
                       status=400)["error"]
    assert stored["param"] == "prompt" and "stored prompts are not supported" in stored["message"]
    chat = post_json(server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                      "tools": [NAMESPACE]}, status=400)["error"]
    assert chat["param"] == "tools[0].type" and "namespace" in chat["message"]


def test_a_response_cut_inside_a_function_call_can_be_continued(server):
    """B-F3: `max_output_tokens` cut the answer inside a function call (`incomplete`, the call `incomplete` with the
    arguments so far); continuing it, as ROUTES.md says an incomplete response can be, was a 400 "No tool output found
    for function call", by `previous_response_id` and with the items sent back. No client can answer a call whose
    arguments were cut: it needs no output, and is left out of the next prompt."""
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="secret", max_retries=0, timeout=120)
    ask = "What is the weather in Paris?"
    whole = client.responses.create(model=MODEL, input=ask, tools=[WEATHER], temperature=0)
    limit = whole.usage.output_tokens - 3  # inside the call's arguments, which end the answer
    cut = client.responses.create(model=MODEL, input=ask, tools=[WEATHER], temperature=0, max_output_tokens=limit)
    call = cut.output[-1]
    assert cut.status == "incomplete" and call.type == "function_call" and call.status == "incomplete", cut.output
    then = "What is the capital of France?"
    chained = client.responses.create(model=MODEL, previous_response_id=cut.id, input=then, tools=[WEATHER], temperature=0)
    assert chained.status == "completed" and "Paris" in chained.output_text, chained.output
    by_hand = [{"role": "user", "content": ask}, *(item.model_dump(exclude_none=True) for item in cut.output),
               {"role": "user", "content": then}]
    again = client.responses.create(model=MODEL, input=by_hand, tools=[WEATHER], temperature=0, store=False)
    assert again.usage.input_tokens == chained.usage.input_tokens and again.output_text == chained.output_text
    late = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}  # the cut call is no call
    with pytest.raises(openai.BadRequestError, match="matches no earlier function_call item"):
        client.responses.create(model=MODEL, previous_response_id=cut.id, input=[{"role": "user", "content": then}, late],
                                tools=[WEATHER])


def test_a_preamble_item_renders_as_the_chat_turn_it_is(server):
    """B-F1: an assistant message before a function_call (a preamble, which gpt-oss writes on the commentary channel)
    was rendered as a final answer, which dropped the turn's reasoning: 167 input tokens where chat counts 188. The
    demo model writes no preambles, so the conversation is sent by hand, as the SDK sends items back."""
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="secret", max_retries=0, timeout=120)
    ask, thought, preamble = "What is the weather in Paris?", "The user wants the weather in Paris.", "Let me check that for you."
    items = [{"role": "user", "content": ask},
             {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": thought}]},
             {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
              "content": [{"type": "output_text", "text": preamble, "annotations": []}]},
             {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": '{"temperature_c": 7, "condition": "rainy"}'}]
    messages = [{"role": "user", "content": ask},
                {"role": "assistant", "content": preamble, "reasoning_content": thought, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 7, "condition": "rainy"}'}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, tools=[{"type": "function", "function": {
        k: v for k, v in WEATHER.items() if k != "type"}}], max_tokens=1).usage.prompt_tokens
    assert client.responses.input_tokens.count(model=MODEL, input=items, tools=[WEATHER]).input_tokens == chat
    labelled = [{**item, "phase": "commentary"} if item.get("type") == "message" else item for item in items]
    assert client.responses.create(model=MODEL, input=labelled, tools=[WEATHER], max_output_tokens=16,
                                   store=False).usage.input_tokens == chat


def test_metadata_and_a_json_format_are_bounded_as_they_are_stored_uncosted(server):
    """Hunt round 15 B-F3, B-F4. Before: `metadata` took anything (a 9 MB value was stored with each response, 10,000
    kept, and repeated in each full-object event of a background run's buffer: 29 MB a run), and a JSON format too long
    to be stated to the model (so no token paid for it) was echoed and stored whole (9 MB in its `description`). Now
    `metadata` has OpenAI's limits (16 pairs, keys of 64 characters, string values of 512), a JSON format over
    262,144 characters is refused, each a 400 naming its field in the surface's envelope, before anything runs or is
    stored; within the limits both are served and echoed as sent."""
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="secret", max_retries=0, timeout=60)
    ask = dict(model=MODEL, input="Hi", max_output_tokens=8, temperature=0)
    most = {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}
    assert client.responses.create(**ask, metadata=most).metadata == most
    for metadata, param in (({"k": "v" * 513}, "metadata.k"), ({f"k{i}": "v" for i in range(17)}, "metadata"),
                            ({"k" * 10_000: "v"}, "metadata." + "k" * 64 + "…"), ({"k": 1}, "metadata.k")):
        for background in (False, True):
            with pytest.raises(openai.BadRequestError) as refused:
                client.responses.create(**ask, metadata=metadata, background=background)
            error = refused.value.body
            assert error["param"] == param and error["code"] == "5006" and "'/metadata" in error["message"], error
    run = httpx.post(server.run_url(), json={"input": "Hi", "max_output_tokens": 8, "metadata": {"k": "v" * 9_000_000}},
                     headers=server.headers, timeout=60)
    assert run.status_code == 400 and run.json()["errors"][0]["code"] == 5006, run.text[:300]
    assert "'/metadata/k'" in run.json()["errors"][0]["message"] and len(run.text) < 1000

    wide = {"type": "object", "description": "x" * 300_000, "properties": {"a": {"type": "string"}}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(**ask, text={"format": {"type": "json_schema", "name": "w", "schema": wide}}, background=True)
    assert refused.value.body["param"] == "text.format" and "262144" in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                       response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": wide}})
    assert refused.value.body["param"] == "response_format"
    unstated = {**wide, "description": "x" * 200_000}  # not stated to the model, but within the bound: served
    answer = client.responses.create(**{**ask, "max_output_tokens": 64},
                                     text={"format": {"type": "json_schema", "name": "w", "schema": unstated}})
    assert answer.text.format.schema_ == unstated


def test_echoed_fields_no_token_pays_for_are_bounded(server):
    """Hunt round 17 A-F4. Before: a web search tool's fields, a namespace's `description`, `text.verbosity` and
    `reasoning.generate_summary` took any string (8 MB each made a 25 MB stream: three full-object events, and an 8 MB
    stored response of 57 prompt tokens), as did any other key of `text`, `reasoning` or a named `tool_choice`. Now the
    two enums take OpenAI's values, the namespaces' descriptions and web search tools take 32,768 characters in all
    (each a 400 naming its field before anything runs or is stored), and other keys are ignored, not echoed."""
    from ossrun.api.schemas import MAX_UNSTATED_TOOL_CHARS

    ask = {"model": MODEL, "input": "Hi", "max_output_tokens": 8, "temperature": 0}
    function = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}
    namespace = lambda description: {"type": "namespace", "name": "ns", "description": description, "tools": [function]}
    search = lambda domains: {"type": "web_search", "external_web_access": False, "filters": {"allowed_domains": domains}}
    sized = json.dumps(search([]), separators=(",", ":"))
    domains = ["d" * (MAX_UNSTATED_TOOL_CHARS - 100 - len(sized) - 2)]  # with 100 characters of description: the limit
    refused = [({"text": {"verbosity": "loud"}}, "text.verbosity"), ({"reasoning": {"generate_summary": "x" * 100}}, "reasoning.generate_summary"),
               ({"tools": [namespace("x" * (MAX_UNSTATED_TOOL_CHARS + 1))]}, "tools[0].description"),
               ({"tools": [namespace("x" * 101), search(domains)]}, "tools[1]"),
               ({"tools": [search(domains), namespace("x" * 101)]}, "tools[1].description")]
    for extra, param in refused:
        for background in (False, True):
            answer = httpx.post(f"{server.base}/v1/responses", json={**ask, **extra, "background": background},
                                headers=server.headers, timeout=60)
            assert answer.status_code == 400 and answer.json()["error"]["param"] == param, (param, answer.text[:300])
            assert len(answer.text) < 2000
    tools = [namespace("x" * 100), search(domains)]
    junk = "j" * 100_000
    body = {**ask, "tools": tools, "tool_choice": {"type": "function", "name": "ns.f", "junk": junk},
            "text": {"verbosity": "low", "junk": junk}, "reasoning": {"effort": "low", "generate_summary": "auto", "junk": junk}}
    answered = post_json(server, "/v1/responses", body)
    stored = httpx.get(f"{server.base}/v1/responses/{answered['id']}", headers=server.headers, timeout=60).json()
    for response in (answered, stored):
        assert response["tools"][1] == search(domains) and response["tools"][0]["description"] == "x" * 100
        assert response["text"] == {"verbosity": "low", "format": {"type": "text"}}
        assert response["reasoning"] == {"effort": "low", "summary": "auto", "generate_summary": "auto"}
        assert response["tool_choice"] == {"type": "function", "name": "ns.f"}
        assert junk not in json.dumps(response)


# -- data directories of older versions, and hand damage ---------------------------------------------------------------

def _first_stored_responses_file(path) -> tuple[str, list[str]]:
    """`batch.sqlite` as the versions that first stored responses (f5078f8, from 222d994 to 622520b) wrote it: one table
    (no `size`, no `response_items`), a replay of the input then the output turned back into input items with no ids
    (that version's `output_as_input`), the response object as it was answered (its output items with ids). → (the
    response's id, its output items' ids)."""
    import sqlite3

    output = [{"type": "reasoning", "id": "rs_0a1b2c3d4e5f60718293a4b5", "summary": [],
               "content": [{"type": "reasoning_text", "text": "The capital of France is Paris."}]},
              {"type": "message", "id": "msg_0a1b2c3d4e5f60718293a4b5", "role": "assistant", "status": "completed",
               "content": [{"type": "output_text", "text": "The capital of France is Paris.", "annotations": []}]}]
    response = {"id": "resp_0a1b2c3d4e5f60718293a4b5", "object": "response", "created_at": int(time.time()), "model": MODEL,
                "status": "completed", "output": output, "output_text": "The capital of France is Paris.",
                "usage": {"input_tokens": 20, "output_tokens": 16, "total_tokens": 36}, "instructions": None,
                "previous_response_id": None, "tools": [], "tool_choice": "auto", "temperature": None, "top_p": None,
                "max_output_tokens": None, "reasoning": None, "text": None, "store": True, "metadata": None}
    replay = [{"role": "user", "content": "What is the capital of France?"},
              {"type": "reasoning", "content": output[0]["content"]},
              {"role": "assistant", "content": "The capital of France is Paris."}]
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript("CREATE TABLE responses (id TEXT PRIMARY KEY, created_at REAL NOT NULL, replay TEXT NOT NULL, "
                     "response TEXT NOT NULL); CREATE INDEX responses_age ON responses(created_at);")
    db.execute("INSERT INTO responses VALUES (?, ?, ?, ?)", (response["id"], time.time(), json.dumps(replay), json.dumps(response)))
    db.commit()
    db.close()
    return response["id"], [item["id"] for item in output]


def test_a_data_directory_of_the_first_version_that_stored_responses_is_served(tmp_path):
    """Hunt round 18 B-F1: the server did not start on the data directory of the versions that first stored responses
    (their replay's output items have no ids): indexing the stored items, once, read each output item's id (KeyError
    'id'), and the batch queue and the fine-tunes went offline with it. Now each such item takes the id its response
    was answered with (and an input item the one `input_items` lists it by), so an `item_reference` to it is found and
    a continuation lists the same ids."""
    from ossrun.model.resolve import resolve_model
    from tests.server_util import start_server

    data = tmp_path / "data"
    data.mkdir()
    old_id, (reasoning_id, message_id) = _first_stored_responses_file(data / "batch.sqlite")
    own = start_server(resolve_model("demo"), data)
    try:
        client = _client(own)
        assert client.responses.retrieve(old_id).output_text == "The capital of France is Paris."
        (asked,) = client.responses.input_items.list(old_id).data
        assert asked.role == "user" and asked.id.startswith("msg_")
        italy = {"role": "user", "content": "What is the capital of Italy?"}
        by_reference = client.responses.create(model=MODEL, input=[{"type": "item_reference", "id": item_id} for item_id in
                                                                   (asked.id, reasoning_id, message_id)] + [italy],
                                               temperature=0, max_output_tokens=64)
        continued = client.responses.create(model=MODEL, previous_response_id=old_id, input=[italy], temperature=0,
                                            max_output_tokens=64)
        assert by_reference.output_text == continued.output_text == "The capital of Italy is Rome."
        assert by_reference.usage.input_tokens == continued.usage.input_tokens
        listed = [item.id for item in client.responses.input_items.list(continued.id, order="asc").data]
        assert listed[:3] == [asked.id, reasoning_id, message_id] and len(set(listed)) == 4, listed
        with pytest.raises(openai.BadRequestError, match="Duplicate item"):  # the conversation already holds it
            client.responses.create(model=MODEL, previous_response_id=old_id, input=[{"type": "item_reference", "id": message_id}])
    finally:
        own.stop()
    assert "Traceback" not in own.log.read_text()


def test_a_stored_response_whose_json_is_damaged_is_skipped_and_named_at_start(tmp_path):
    """Hunt round 18 B-F3: one stored response whose JSON was cut short (a hand edit, a partial restore) stopped the
    server at start (failing the background runs a stop interrupted read every row's status: "malformed JSON"), and the
    error said to move `batch.sqlite` aside, losing the batch queue and every other response with it. Now such a row is
    skipped, named in a warning (once), and the others are served: an interrupted background one is still failed."""
    import sqlite3

    from ossrun.model.resolve import resolve_model
    from tests.server_util import start_server

    data = tmp_path / "data"
    own = start_server(resolve_model("demo"), data)
    try:
        client = _client(own)
        damaged, running, cut_input = (client.responses.create(model=MODEL, input="Hi", max_output_tokens=8).id for _ in range(3))
    finally:
        own.stop()
    db = sqlite3.connect(data / "batch.sqlite")
    db.execute("UPDATE responses SET response = substr(response, 1, 40) WHERE id = ?", (damaged,))
    db.execute("UPDATE responses SET replay = 'not json' WHERE id = ?", (cut_input,))
    db.execute("UPDATE responses SET response = json_set(response, '$.status', 'in_progress') WHERE id = ?", (running,))
    db.commit()
    db.close()
    own = start_server(resolve_model("demo"), data)
    try:
        client = _client(own)
        assert client.responses.retrieve(running).status == "failed"  # a stop interrupted it
        fresh = client.responses.create(model=MODEL, input="Hi", max_output_tokens=8)
        assert client.responses.retrieve(fresh.id).status == fresh.status
        _damaged_reads_are_named(own, client, damaged, cut_input)
        client.responses.delete(damaged)  # what the warning advises
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(damaged)
    finally:
        own.stop()
    warnings = [line for line in own.log.read_text().splitlines() if "WARNING" in line and damaged in line]
    assert len(warnings) == 1 and "cannot be read" in warnings[0], warnings
    assert "Traceback" not in own.log.read_text()


def _damaged_reads_are_named(own, client, damaged: str, cut_input: str) -> None:
    """Hunt round 23 C-F1: retrieve, input_items, the streamed replay and `previous_response_id` of a set-aside row were
    500s with a traceback (each retried twice by the SDK). Now the 404 (by path) or 400 (continued) an unusable id
    gets, naming the damaged copy and what to do."""
    for reads in (lambda: client.responses.retrieve(damaged), lambda: client.responses.input_items.list(damaged),
                  lambda: client.responses.input_items.list(cut_input)):
        with pytest.raises(openai.NotFoundError) as refused:
            reads()
        assert "is damaged" in refused.value.message and "DELETE" in refused.value.message, refused.value.message
    streamed = httpx.get(f"{own.base}/v1/responses/{damaged}", params={"stream": "true"}, timeout=60)
    assert streamed.status_code == 404 and "is damaged" in streamed.text, streamed.text
    assert client.responses.retrieve(cut_input).id == cut_input  # its response JSON is whole
    for previous in (damaged, cut_input):
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(model=MODEL, input="And?", previous_response_id=previous)
        assert "is damaged" in refused.value.message and refused.value.param == "previous_response_id"
