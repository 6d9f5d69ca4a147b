"""Structured output through the real server: on a random model only the constraint can make these pass."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import jsonschema
import openai
import pytest

from ossrun import harmony
from tests.server_util import MODEL, start_server
from tests.test_constraints import SCHEMAS, TOOLS, WEATHER


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    s = start_server(checkpoints["original"], tmp_path_factory.mktemp("structured"), "--rate-limit", "0")
    yield s
    s.stop()


def body(i: int, stream: bool) -> dict:
    schema = SCHEMAS[i % len(SCHEMAS)]
    return {"messages": [{"role": "user", "content": f"Give me item {i} as JSON"}], "max_tokens": 400, "temperature": 1.0,
            "seed": 100 + i, "stream": stream, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}


def streamed_content(frames: list[str]) -> str:
    chunks = [json.loads(f) for f in frames if f != "[DONE]"]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


def test_twenty_json_schema_requests_validate_sync_and_streamed(server):
    async def one(client: httpx.AsyncClient, i: int, stream: bool) -> str:
        if not stream:
            response = await client.post(server.run_url(), json=body(i, False))
            assert response.status_code == 200, response.text
            return response.json()["result"]["choices"][0]["message"]["content"]
        async with client.stream("POST", server.run_url(), json=body(i, True)) as response:
            return streamed_content([line[6:] async for line in response.aiter_lines() if line.startswith("data: ")])

    async def run_all():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(one(client, i, stream) for stream in (False, True) for i in range(20)))

    contents = asyncio.run(run_all())
    for n, content in enumerate(contents):
        jsonschema.validate(json.loads(content), SCHEMAS[(n % 20) % len(SCHEMAS)])
    assert contents[:20] == contents[20:]  # seeded: streaming changes nothing


def test_json_schema_on_the_prompt_and_responses_shapes(server):
    # (json_object allows unbounded strings, which a random model never closes: see test_constraints for it.)
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMAS[1]}}
    prompt = httpx.post(server.run_url(), json={"prompt": "JSON please", "max_tokens": 300, "seed": 7, "temperature": 1.0,
                                                "response_format": fmt}, timeout=120)
    jsonschema.validate(prompt.json()["result"]["response"], SCHEMAS[1])  # JSON mode: the object itself, as hosted
    responses = httpx.post(server.run_url(), json={"input": "JSON please", "max_output_tokens": 300, "temperature": 1.0, "seed": 8,
                                                   "text": {"format": {"type": "json_schema", "name": "x", "schema": SCHEMAS[2]}}}, timeout=120)
    jsonschema.validate(json.loads(responses.json()["result"]["output_text"]), SCHEMAS[2])


@pytest.mark.parametrize("route", ["openai", "ai-run"])
def test_named_tool_choice_returns_valid_arguments(server, route):
    args = dict(messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS, max_tokens=120, temperature=1.0, seed=3,
                tool_choice={"type": "function", "function": {"name": "get_weather"}})
    if route == "openai":
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="x")
        reply = client.chat.completions.create(model=MODEL, **args)
        choice = reply.choices[0]
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
        content, finish = choice.message.content, choice.finish_reason
        stream = list(client.chat.completions.create(model=MODEL, stream=True, **args))
        deltas = [tc for c in stream if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        assert deltas[0].function.name == "get_weather"
        assert "".join(d.function.arguments or "" for d in deltas) == calls[0][1]
        assert not "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    else:
        result = httpx.post(server.run_url(), json=args, timeout=120).json()["result"]
        choice = result["choices"][0]
        calls = [(c["function"]["name"], c["function"]["arguments"]) for c in choice["message"]["tool_calls"]]
        content, finish = choice["message"]["content"], choice["finish_reason"]
    assert finish == "tool_calls" and not content
    assert calls[0][0] == "get_weather"
    jsonschema.validate(json.loads(calls[0][1]), WEATHER)


def test_required_tool_choice_calls_some_tool(server):
    result = httpx.post(server.run_url(), json={"messages": [{"role": "user", "content": "Do something"}], "tools": TOOLS,
                                                "tool_choice": "required", "max_tokens": 300, "temperature": 1.0, "seed": 11},
                        timeout=120).json()["result"]
    choice = result["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]["function"]
    schema = {"get_weather": WEATHER, "search": TOOLS[1]["function"]["parameters"]}[call["name"]]
    jsonschema.validate(json.loads(call["arguments"]), schema)


def test_a_bad_schema_is_a_5006_with_the_reason(server):
    response = httpx.post(server.run_url(), json={"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {
        "name": "bad", "schema": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}}}, timeout=60)
    assert response.status_code == 400 and response.json()["errors"][0]["code"] == 5006
    assert "schema" in response.json()["errors"][0]["message"]


def _forced_arguments(server, parameters: dict | None, favoured: str) -> list:
    """The arguments of forced calls of a tool with these `parameters` (None: none declared), the model pushed towards
    `favoured` by logit_bias (which only the grammar beats), over three seeds, sync and streamed."""
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="x")
    function = {"name": "act", **({} if parameters is None else {"parameters": parameters})}
    (token,) = harmony.encode(favoured)
    found = []
    for seed in (1, 2, 3):
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Act"}], tools=[{"type": "function", "function": function}],
            tool_choice={"type": "function", "function": {"name": "act"}}, max_tokens=40, temperature=1.0, seed=seed,
            logit_bias={str(token): 100})
        found.append(json.loads(reply.choices[0].message.tool_calls[0].function.arguments))
    return found


def test_a_tool_without_parameters_is_called_with_none(server):
    """Hunt round 14 A-F3: a tool declared without `parameters` (OpenAI: an empty parameter list; harmony shows the model
    `() => any`) was called with any object the model wrote (`{"city": "Paris"}`), which `fn(**arguments)` refuses."""
    assert _forced_arguments(server, None, '{"') == [{}, {}, {}]


@pytest.mark.parametrize("parameters", [{"properties": {"a": {"type": "string"}}},
                                        {"anyOf": [{"type": "object", "properties": {"a": {"type": "string"}}}, {"type": "string"}]}],
                         ids=["bare-properties", "root-anyOf"])
@pytest.mark.parametrize("favoured", ["1", '"'])
def test_arguments_are_an_object_when_the_schema_has_no_type(server, parameters, favoured):
    """Hunt round 14 A-F3: without a top-level `type` the schema also allowed a number or a string as the arguments
    (`2024.1421`), which chat's contract (a JSON object) and the Prompt shape's `arguments` object break."""
    assert all(isinstance(arguments, dict) for arguments in _forced_arguments(server, parameters, favoured))


def test_a_tool_whose_parameters_are_empty_takes_any_object(server):
    """`parameters: {}` is a schema that says nothing (ROUTES: any object), unlike no `parameters` at all."""
    assert any(_forced_arguments(server, {}, '{"'))


def test_tool_choice_none_keeps_the_prompt_and_its_cache(server):
    """Hunt round 14 A-F4: `tool_choice: "none"` dropped the tools from the prompt, so an agent's "answer now" turn
    re-read the whole conversation (the prefix cache lost after the system message) and the model saw calls of functions
    no longer declared. The prompt is now `auto`'s; the grammar still refuses a call."""
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="x")
    history = [{"role": "user", "content": "Weather in Paris? " * 40}, {"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}]
    args = dict(model=MODEL, messages=history, tools=TOOLS, max_tokens=30, temperature=1.0, seed=4)
    auto = client.chat.completions.create(tool_choice="auto", **args)
    none = client.chat.completions.create(tool_choice="none", **args)
    assert none.usage.prompt_tokens == auto.usage.prompt_tokens
    assert none.usage.prompt_tokens_details.cached_tokens >= none.usage.prompt_tokens - 64  # all but the last block
    assert not none.choices[0].message.tool_calls and none.choices[0].finish_reason in ("stop", "length")


BAD = {"type": "object", "properties": {"a": {"type": "no-such-type"}}}


def test_a_bad_schema_names_its_field_in_param(server):
    """Hunt round 14 A-F6: a schema the grammar engine refused was a 400 with `param: null`; it names the field as the
    request spelled it."""
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="x", max_retries=0)
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=20)
    function = {"name": "t2", "parameters": BAD}
    ok = {"name": "t1", "parameters": {"type": "object"}}
    cases = [
        (lambda: client.chat.completions.create(response_format={"type": "json_schema", "json_schema": {"name": "b", "schema": BAD}},
                                                **chat), "response_format"),
        (lambda: client.chat.completions.create(tools=[{"type": "function", "function": ok}, {"type": "function", "function": function}],
                                                tool_choice="required", **chat), "tools[1].function.parameters"),
        (lambda: client.chat.completions.create(functions=[ok, function], function_call={"name": "t2"}, **chat),
         "functions[1].parameters"),
        (lambda: client.responses.create(model=MODEL, input="x", text={"format": {"type": "json_schema", "name": "b", "schema": BAD}}),
         "text.format"),
        (lambda: client.responses.create(model=MODEL, input="x", tools=[{"type": "function", **ok}, {"type": "function", **function}],
                                         tool_choice="required"), "tools[1].parameters"),
        (lambda: client.responses.create(model=MODEL, input="x", tool_choice="required", tools=[
            {"type": "web_search"}, {"type": "namespace", "name": "ns", "description": "d", "tools": [{"type": "function", **function}]}]),
         "tools[1].tools[0].parameters"),
    ]
    for create, param in cases:
        with pytest.raises(openai.BadRequestError, match="no-such-type") as refused:
            create()
        assert refused.value.param == param and refused.value.code == "5006"


@pytest.mark.parametrize(("key", "bound", "served"), [("minimum", 1e17, True), ("minimum", 1e20, False), ("maximum", -1e20, False)])
def test_a_numeric_bound_beyond_the_grammar_engines_range_is_a_clear_400(server, key, bound, served):
    """Hunt round 14 A-F7: `minimum: 1e20` is valid JSON Schema that llguidance cannot run (it writes the range as a
    pattern over 64-bit values); ROUTES lists the limit. A 400 naming it and the field, never a 500."""
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="x", max_retries=0)
    schema = {"type": "object", "properties": {"n": {"type": "number", key: bound}}, "required": ["n"]}
    create = lambda: client.chat.completions.create(  # noqa: E731
        model=MODEL, messages=[{"role": "user", "content": "A big number"}], max_tokens=60, temperature=1.0, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "big", "schema": schema}})
    if served:
        jsonschema.validate(json.loads(create().choices[0].message.content), schema)
        return
    with pytest.raises(openai.BadRequestError, match="float range") as refused:
        create()
    assert refused.value.param == "response_format"


UNIQUE = {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2, "uniqueItems": True}},
          "required": ["tags"], "additionalProperties": False}


def test_non_strict_schemas_may_use_keywords_strict_ones_may_not(server):
    """OpenAI checks the schema language only for strict tools and formats (absent: not strict); `uniqueItems` was a 400."""
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="x")
    tool = {"type": "function", "function": {"name": "tag", "description": "Tag it", "parameters": UNIQUE}}
    args = dict(model=MODEL, messages=[{"role": "user", "content": "Tag this"}], max_tokens=120, temperature=1.0, seed=5)
    reply = client.chat.completions.create(tools=[tool], tool_choice="required", **args)
    call = reply.choices[0].message.tool_calls[0].function
    assert call.name == "tag" and reply.choices[0].finish_reason == "tool_calls"
    assert set(json.loads(call.arguments)) == {"tags"}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": UNIQUE, "strict": False}}
    content = client.chat.completions.create(response_format=fmt, **args).choices[0].message.content
    assert set(json.loads(content)) == {"tags"}
    strict = {"type": "function", "function": {**tool["function"], "strict": True}}
    with pytest.raises(openai.BadRequestError, match="uniqueItems"):
        client.chat.completions.create(tools=[strict], **args)
    with pytest.raises(openai.BadRequestError, match="uniqueItems"):
        client.chat.completions.create(response_format={"type": "json_schema", "json_schema": {**fmt["json_schema"], "strict": True}},
                                       **args)


def test_a_schema_with_600_optional_properties_answers(server):
    """llguidance's default parser limit failed at the answer's first token: a 500 (stream: an error frame after a 200)."""
    schema = {"type": "object", "properties": {f"prop_{i}": {"type": "integer", "minimum": 0, "maximum": 9} for i in range(600)},
              "additionalProperties": False}
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="x")
    args = dict(model=MODEL, messages=[{"role": "user", "content": "JSON"}], max_tokens=200, temperature=1.0, seed=1)
    reply = client.chat.completions.create(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}, **args)
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    tool = {"type": "function", "function": {"name": "wide", "description": "d", "parameters": schema}}
    call = client.chat.completions.create(tools=[tool], tool_choice="required", **args)
    jsonschema.validate(json.loads(call.choices[0].message.tool_calls[0].function.arguments), schema)


def test_a_schema_with_5000_optional_properties_answers_on_the_demo_model(demo_server):
    """The demo model writes long whitespace runs inside the object; with seed 1 the mask after `{\\n\\n\\n    \\t `
    exceeded the parser's item limit: a 500 mid-answer (streamed: a 200, then an error frame)."""
    schema = {"type": "object", "properties": {f"prop_{i}": {"type": "string"} for i in range(5000)}, "additionalProperties": False}
    client = openai.OpenAI(base_url=f"{demo_server.base}/v1", api_key=demo_server.token)
    args = dict(model=MODEL, messages=[{"role": "user", "content": "JSON"}], max_tokens=120, temperature=1.0, seed=1,
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    choice = client.chat.completions.create(**args).choices[0]
    assert choice.finish_reason in ("stop", "length")  # length: the budget guard had to close the object
    jsonschema.validate(json.loads(choice.message.content), schema)
    chunks = list(client.chat.completions.create(stream=True, **args))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content


def test_a_date_time_fits_a_moderate_budget(server):
    """One required date-time was a 400 at max_tokens 40, 50 and 60 ("cannot be shown to hold a valid answer"): the
    search spelled it one character at a time behind whitespace runs (61 tokens); the answer takes about 20."""
    schema = {"type": "object", "properties": {"d": {"type": "string", "format": "date-time"}}, "required": ["d"]}
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="x")
    for budget in (40, 50, 60):
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JSON please"}], max_tokens=budget,
                                               temperature=1.0, seed=1,
                                               response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        # The random model never writes a date-time: the budget guard closes it, so the valid answer ends with length.
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= budget
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


# With these seeds the demo model writes a number beyond a double's range (`{"x":935E100151070}`): valid JSON, valid
# against the schema (JSON and the grammar allow any exponent).
HUGE_NUMBER_SEED, HUGE_ARGUMENT_SEED = 13, 78
NUMBER_OBJECT = {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"], "additionalProperties": False}
NUMBER_TOOL = {"name": "f", "description": "d", "parameters": NUMBER_OBJECT}


def strict_json(text: str):
    """JSON as a strict parser (JavaScript's `JSON.parse`) reads it: Python's `Infinity` and `NaN` are no JSON."""
    def refuse(literal: str):
        raise ValueError(f"{literal} is not JSON")
    return json.loads(text, parse_constant=refuse)


def huge_number_body(**fields) -> dict:
    return {"prompt": "Give me the data.", "seed": HUGE_NUMBER_SEED, "temperature": 1.0, "max_tokens": 120,
            "response_format": {"type": "json_schema", "json_schema": NUMBER_OBJECT}, **fields}


def test_a_number_beyond_a_doubles_range_is_null_in_a_parsed_answer_and_text_in_a_written_one(demo_server):
    """Hunt round 19 B-F1: Python read the number as inf, which JSON cannot carry: the Prompt shape's JSON answer was
    a 500 (after the tokens were generated and metered). The hosted JSON.parse reads it as Infinity and JSON.stringify
    writes that as null: so does ossrun where it parses the answer; a stream's text keeps what the model wrote."""
    sync = httpx.post(demo_server.run_url(), json=huge_number_body(), headers=demo_server.headers, timeout=120)
    assert sync.status_code == 200, sync.text
    result = strict_json(sync.text)["result"]
    assert result["response"] == {"x": None} and result["finish_reason"] == "stop"
    streamed = httpx.post(demo_server.run_url(), json=huge_number_body(stream=True), headers=demo_server.headers, timeout=120)
    frames = [strict_json(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    written = "".join(f.get("response", "") for f in frames)
    assert json.loads(written) == {"x": float("inf")}  # the model's text, as written


def test_a_tool_argument_beyond_a_doubles_range_is_null_sync_and_streamed(demo_server):
    """Hunt round 19 B-F1: the Prompt shape's tool call (`arguments` an object) was a 500 sync, and streamed its last
    frame held `{"x": Infinity}`, which no strict JSON parser reads."""
    body = {"prompt": "Give me the data.", "seed": HUGE_ARGUMENT_SEED, "temperature": 1.0, "max_tokens": 120, "tools": [NUMBER_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "f"}}}
    sync = httpx.post(demo_server.run_url(), json=body, headers=demo_server.headers, timeout=120)
    assert sync.status_code == 200, sync.text
    assert strict_json(sync.text)["result"]["tool_calls"] == [{"name": "f", "arguments": {"x": None}}]
    streamed = httpx.post(demo_server.run_url(), json={**body, "stream": True}, headers=demo_server.headers, timeout=120)
    last = strict_json([line for line in streamed.text.splitlines() if line.startswith("data: {")][-1][6:])
    assert last["finish_reason"] == "tool_calls" and last["tool_calls"] == [{"name": "f", "arguments": {"x": None}}]


def test_a_batch_holding_a_number_beyond_a_doubles_range_can_be_polled(demo_server):
    """Hunt round 19 B-F1: the item's result was stored as `Infinity`, so every poll of its batch was a 500 and the
    other items' results could never be collected."""
    queued = httpx.post(demo_server.run_url(), params={"queueRequest": "true"}, headers=demo_server.headers, timeout=60, json={
        "requests": [{"prompt": "Hello", "max_tokens": 20, "external_reference": "innocent"},
                     {**huge_number_body(), "external_reference": "number"}]})
    assert queued.status_code == 200, queued.text
    request_id = queued.json()["result"]["request_id"]
    for _ in range(600):
        poll = httpx.post(demo_server.run_url(), json={"request_id": request_id}, headers=demo_server.headers, timeout=60)
        assert poll.status_code == 200, poll.text
        result = strict_json(poll.text)["result"]
        if "responses" in result:
            break
        time.sleep(0.2)
    innocent, number = result["responses"]
    assert innocent["success"] and innocent["external_reference"] == "innocent" and innocent["result"]["usage"]["completion_tokens"]
    assert number["success"] and number["external_reference"] == "number" and number["result"]["response"] == {"x": None}
