"""The legacy chat fields `functions` / `function_call` through the real server (the demo model, which calls
tools), with the official openai client, sync and streamed.

`function_call` used to be ignored ("none" still called the tool, {"name"} forced nothing), and a request that
offered `functions` got its call only as `tool_calls`, where a legacy client does not look. OpenAI answers such a
request in the legacy shape: `message.function_call` and `finish_reason: "function_call"`, streamed as
`delta.function_call`.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.server_util import MODEL

FUNCTION = {"name": "get_weather", "description": "Get the current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(demo_server):
    return openai.OpenAI(base_url=f"{demo_server.base}/v1", api_key=demo_server.token, max_retries=0)


def chat(client, messages, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kwargs).choices[0]


def test_functions_answer_in_the_legacy_shape_sync_and_streamed(client):
    choice = chat(client, WEATHER, functions=[FUNCTION])
    assert choice.finish_reason == "function_call" and not choice.message.tool_calls
    assert choice.message.function_call.name == "get_weather"
    assert json.loads(choice.message.function_call.arguments) == {"city": "Paris"}
    chunks = list(client.chat.completions.create(model=MODEL, messages=WEATHER, temperature=0, functions=[FUNCTION], stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [d.function_call for d in deltas if d.function_call]
    assert calls[0].name == "get_weather" and all(c.name is None for c in calls[1:])
    assert "".join(c.arguments or "" for c in calls) == choice.message.function_call.arguments
    assert not any(d.tool_calls for d in deltas)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "function_call"


def test_function_call_none_keeps_the_model_from_calling(client):
    choice = chat(client, WEATHER, functions=[FUNCTION], function_call="none")
    assert choice.finish_reason == "stop" and choice.message.function_call is None and choice.message.content


def test_function_call_by_name_forces_the_call(client):
    assert chat(client, FRANCE, functions=[FUNCTION]).message.function_call is None  # not a weather question
    choice = chat(client, FRANCE, functions=[FUNCTION], function_call={"name": "get_weather"})
    assert choice.finish_reason == "function_call" and choice.message.function_call.name == "get_weather"
    json.loads(choice.message.function_call.arguments)  # valid JSON for its parameters
    with pytest.raises(openai.BadRequestError, match="no tool named 'nope'") as refused:
        chat(client, FRANCE, functions=[FUNCTION], function_call={"name": "nope"})
    assert refused.value.body["param"] == "tool_choice"  # the field the message names (`at '/tool_choice'`)


def test_tool_400s_name_their_field(client):
    """Hunt round 22 A-F5: a named tool_choice naming no declared tool and duplicate tool names were 400s with
    `param: null` (allowed_tools' twin of the first says `tool_choice`)."""
    tool = {"type": "function", "function": FUNCTION}
    with pytest.raises(openai.BadRequestError, match="no tool named 'nope'") as refused:
        chat(client, FRANCE, tools=[tool], tool_choice={"type": "function", "function": {"name": "nope"}})
    assert refused.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError, match="no tool named 'nope'") as refused:
        client.responses.create(model=MODEL, input="Hi", tools=[{"type": "function", **FUNCTION}],
                                tool_choice={"type": "function", "name": "nope"})
    assert refused.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError, match="tool names must be unique") as refused:
        chat(client, FRANCE, tools=[tool, tool])
    assert refused.value.body["param"] == "tools"


def test_tool_choice_wins_over_function_call_and_tools_answer_as_tool_calls(client):
    tools = [{"type": "function", "function": FUNCTION}]
    choice = chat(client, WEATHER, functions=[FUNCTION], function_call={"name": "get_weather"}, tool_choice="none")
    assert choice.finish_reason == "stop" and choice.message.function_call is None
    choice = chat(client, FRANCE, tools=tools, function_call={"name": "get_weather"})  # no `functions`: the current shape
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls[0].function.name == "get_weather"
    assert choice.message.function_call is None


def test_a_function_result_message_finishes_the_legacy_round_trip(client, demo_server):
    """The legacy result message (`role: "function"`, answered by `name`) was a 400 (`messages[2].role`), so a legacy
    client's round trip stopped after its first call. `/ai/run` keeps the Workers AI spec's five roles."""
    call = chat(client, WEATHER, functions=[FUNCTION]).message.function_call
    turn = [*WEATHER, {"role": "assistant", "content": None, "function_call": {"name": call.name, "arguments": call.arguments}},
            {"role": "function", "name": call.name, "content": json.dumps({"temperature_c": 7, "condition": "rainy"})}]
    choice = chat(client, turn, functions=[FUNCTION])
    assert choice.finish_reason == "stop" and choice.message.content == "It is 7°C and rainy in Paris."
    with pytest.raises(openai.BadRequestError, match="'function' message needs the 'name'") as info:
        chat(client, [*turn[:2], {"role": "function", "content": "7"}], functions=[FUNCTION])
    assert info.value.body["param"] == "messages[2]"
    refused = httpx.post(demo_server.run_url(), json={"messages": turn, "functions": [FUNCTION]}, headers=demo_server.headers, timeout=60)
    assert refused.status_code == 400 and "at '/messages/2/role'" in refused.json()["errors"][0]["message"]


@pytest.mark.parametrize("tool_choice", ["auto", "none"])
def test_a_tool_name_harmony_cannot_carry_is_a_400_naming_the_field(client, demo_server, tool_choice):
    """Before: `get weather` was a 400 with `param: null` (found only when compiling the grammar), the OpenAPI
    document did not state the rule, and with `tool_choice: "none"` the same tool was accepted."""
    tool = {"type": "function", "function": {"name": "get weather", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, [{"role": "user", "content": "Hi"}], tools=[tool], tool_choice=tool_choice)
    assert caught.value.body["param"] == "tools[0].function.name" and "pattern" in caught.value.body["message"]
    flat = {"type": "function", "name": "get weather", "parameters": {"type": "object", "properties": {}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, input="Hi", tools=[flat], tool_choice=tool_choice, max_output_tokens=8)
    assert caught.value.body["param"] == "tools[0].name"
    document = httpx.get(demo_server.base + "/openapi.json", headers=demo_server.headers, timeout=30).json()
    assert document["components"]["schemas"]["FunctionDef"]["properties"]["name"]["pattern"] == "^[A-Za-z0-9_.:\\-]{1,128}$"
    named = dict(tool, function={**tool["function"], "name": "mcp.weather:get-now_1"})  # dots and colons are fine
    assert chat(client, [{"role": "user", "content": "Hi"}], tools=[named], max_tokens=4).finish_reason
