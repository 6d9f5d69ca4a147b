"""Responses `item_reference` input items on the real server and the demo model: a stored item named by its id is read
as if sent inline. The Vercel AI SDK's `openai()` provider sends one for each earlier output item (its `store` is true
by default), so its second turn and the second step of its tool calls were a 400 ("input item type 'item_reference' is
not supported")."""

from __future__ import annotations

import httpx
import jsonschema
import openai
import pytest

from tests.server_util import MODEL, post_json

RUN = f"/client/v4/accounts/acct/ai/run/{MODEL}"
WEATHER = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def server(demo_server):
    return demo_server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="secret", max_retries=0)


def ref(item_id: str) -> dict:
    return {"type": "item_reference", "id": item_id}


def inline(output) -> list[dict]:
    """A response's output items as a client sends them back inline (`input=[..., *response.output]`)."""
    return [item.model_dump(exclude_none=True) for item in output]


def user(text: str) -> dict:
    return {"role": "user", "content": [{"type": "input_text", "text": text}]}


def test_a_second_turn_by_reference_reads_as_the_inline_one(server, client):
    """The AI SDK's chat loop: the first answer's reasoning and message come back as references, on every surface that
    takes Responses input, sync and streamed: the same prompt tokens and the same answer as sending the items inline."""
    hello, italy = user("Hello! My name is Ada."), user("What is the capital of Italy?")
    first = client.responses.create(model=MODEL, input=[hello], temperature=0, max_output_tokens=64)
    assert [item.type for item in first.output] == ["reasoning", "message"]
    sent = client.responses.create(model=MODEL, input=[hello, *inline(first.output), italy], temperature=0, max_output_tokens=64)
    body = {"model": MODEL, "input": [hello, *(ref(item.id) for item in first.output), italy], "max_output_tokens": 64}
    document = httpx.get(f"{server.base}/openapi.json", headers=server.headers).json()
    assert jsonschema.Draft202012Validator({"$ref": "#/components/schemas/ResponsesRequest", "components": document["components"]}).is_valid(body)
    by_reference = client.responses.create(**body, temperature=0)
    assert by_reference.output_text == sent.output_text == "The capital of Italy is Rome."
    assert by_reference.usage.input_tokens == sent.usage.input_tokens
    *_, last = client.responses.create(**body, temperature=0, stream=True)
    assert last.type == "response.completed" and last.response.usage.input_tokens == sent.usage.input_tokens
    for path in (RUN, "/client/v4/accounts/acct/ai/v1/responses"):
        answer = post_json(server, path, body)
        answer = answer.get("result", answer)
        assert answer["usage"]["input_tokens"] == sent.usage.input_tokens and answer["output_text"] == sent.output_text
    # The referenced items keep their ids: `input_items` lists them as the items they name.
    listed = list(client.responses.input_items.list(by_reference.id, order="asc"))
    assert [item.id for item in listed[1:3]] == [item.id for item in first.output]


def test_a_tool_round_trip_by_reference_keeps_the_reasoning(client):
    """The AI SDK's multi-step tool call: the reasoning before the call comes back as a reference (the call inline or
    as one too); the reasoning stays in the prompt as the inline item's does."""
    ask = user("What is the weather in Paris?")
    first = client.responses.create(model=MODEL, input=[ask], tools=[WEATHER], temperature=0)
    reasoning, call = first.output
    assert reasoning.type == "reasoning" and call.type == "function_call"
    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature_c": 7, "condition": "rainy"}'}

    def answer(*items) -> openai.types.responses.Response:
        return client.responses.create(model=MODEL, input=[ask, *items, result], tools=[WEATHER], temperature=0)

    sent = answer(*inline(first.output))
    both, reasoning_only = answer(ref(reasoning.id), ref(call.id)), answer(ref(reasoning.id), *inline([call]))
    without_reasoning = answer(*inline([call]))
    assert both.usage.input_tokens == reasoning_only.usage.input_tokens == sent.usage.input_tokens > without_reasoning.usage.input_tokens
    assert both.output_text == reasoning_only.output_text == sent.output_text == "It is 7°C and rainy in Paris."


def test_references_beside_a_previous_response(client):
    """With `previous_response_id`, a reference (here to an input item of another stored response, as `input_items`
    lists it) is read as that item inline after the stored conversation."""
    first = client.responses.create(model=MODEL, input="Hello! My name is Ada.", temperature=0, max_output_tokens=64)
    (greeting,) = client.responses.input_items.list(first.id)
    other = client.responses.create(model=MODEL, input="What is the capital of Italy?", temperature=0, max_output_tokens=64)
    asked = dict(model=MODEL, previous_response_id=other.id, temperature=0, max_output_tokens=64)
    sent = client.responses.create(**asked, input=[{"role": "user", "content": "Hello! My name is Ada."}])
    by_reference = client.responses.create(**asked, input=[ref(greeting.id)])
    assert by_reference.usage.input_tokens == sent.usage.input_tokens and by_reference.output_text == sent.output_text


def test_an_unknown_reference_is_a_400_naming_its_id(server, client):
    """As OpenAI answers it ("Item with id '…' not found."), naming the caller's own item; also an item of a deleted
    response or of one sent with `store: false`, which nothing keeps."""
    first = client.responses.create(model=MODEL, input="Hello! My name is Ada.", temperature=0, max_output_tokens=64)
    unstored = client.responses.create(model=MODEL, input="Hi", temperature=0, max_output_tokens=64, store=False)
    cases = [(ref("msg_nowhere"), {}), (ref(unstored.output[-1].id), {}), (ref("msg_nowhere"), {"previous_response_id": first.id}),
             (ref("msg_nowhere"), {"stream": True})]
    for reference, extra in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(model=MODEL, input=[user("Hi"), reference], **extra)
        error = refused.value.body
        assert error["param"] == "input[1].id", error
        assert error["message"].endswith(f"Error: at '/input/1/id': Item with id '{reference['id']}' not found."), error
    run = httpx.post(server.base + RUN, json={"input": [ref("msg_nowhere")]}, headers=server.headers, timeout=60)
    assert run.status_code == 400 and "at '/input/0/id': Item with id 'msg_nowhere' not found." in run.json()["errors"][0]["message"]
    queued = httpx.post(server.base + RUN, json={"requests": [{"input": [ref("msg_nowhere")]}]}, headers=server.headers, timeout=60)
    assert queued.status_code == 400 and "(in requests[0])" in queued.json()["errors"][0]["message"]
    # A deleted response's items are gone, unless a later response holds them too (its `input_items` lists them).
    reasoning, message = first.output
    client.responses.create(model=MODEL, input=[ref(message.id)], temperature=0, max_output_tokens=8)
    client.responses.delete(first.id)
    client.responses.create(model=MODEL, input=[ref(message.id)], temperature=0, max_output_tokens=8)
    with pytest.raises(openai.BadRequestError, match="not found"):
        client.responses.create(model=MODEL, input=[user("Hi"), ref(reasoning.id)])


def test_an_id_alone_is_a_reference(server, client):
    """OpenAI's `ItemReferenceParam` has `type` optional: `{"id": …}` names the stored item (it was read as an empty user
    message); the OpenAPI document takes it as a reference alone. With `role` or `content` it stays a message."""
    hello, italy = user("Hello! My name is Ada."), user("What is the capital of Italy?")
    first = client.responses.create(model=MODEL, input=[hello], temperature=0, max_output_tokens=64)
    typed = client.responses.create(model=MODEL, input=[hello, *(ref(item.id) for item in first.output), italy],
                                    temperature=0, max_output_tokens=64)
    body = {"model": MODEL, "input": [hello, *({"id": item.id} for item in first.output), italy], "max_output_tokens": 64}
    document = httpx.get(f"{server.base}/openapi.json", headers=server.headers).json()
    components = document["components"]
    item = jsonschema.Draft202012Validator({"$ref": "#/components/schemas/ResponsesRequest", "components": components})
    assert item.is_valid(body) and item.is_valid({**body, "input": [{"id": "msg_1", "role": "user"}]})
    bare = client.responses.create(**body, temperature=0)
    assert bare.usage.input_tokens == typed.usage.input_tokens and bare.output_text == typed.output_text
    listed = client.responses.input_items.list(bare.id, order="asc").data
    assert [(i.type, i.id) for i in listed[1:3]] == [(i.type, i.id) for i in first.output]
    assert listed[2].role == "assistant" and listed[2].content[0].text == first.output[-1].content[0].text


def test_a_reference_reads_the_item_as_first_stored(client):
    """A later request sending an edited copy of an item under its id does not change what a reference to it reads
    (the newest response holding the id was read: any request could redefine an item for every later reference)."""
    first = client.responses.create(model=MODEL, input="What is the capital of Italy?", temperature=0, max_output_tokens=64)
    message = first.output[-1]
    client.responses.create(model=MODEL, input=[{"role": "assistant", "id": message.id, "content": "EDITED"}, user("ok")],
                            max_output_tokens=1)
    later = client.responses.create(model=MODEL, input=[ref(message.id), user("ok")], max_output_tokens=1)
    (read, _) = client.responses.input_items.list(later.id, order="asc").data
    assert read.id == message.id and read.content[0].text == message.content[0].text == "The capital of Italy is Rome."


def test_an_item_twice_is_a_400_naming_the_repeat(server, client):
    """As OpenAI answers it ("Duplicate item found with id …"): an id already in the `previous_response_id`
    conversation, a reference sent twice, the same item inline twice (even unchanged) or inline beside its reference.
    The model read such items twice (a doubled prompt, billed, and a worse answer). Id-less items are never repeats."""
    first = client.responses.create(model=MODEL, input="Hello! My name is Ada.", temperature=0, max_output_tokens=64)
    reasoning, message = first.output
    again = message.model_dump(exclude_none=True)
    cases = [([ref(reasoning.id), user("Hi")], {"previous_response_id": first.id}, 0, reasoning.id),
             ([user("Hi"), ref(message.id), ref(message.id)], {}, 2, message.id),
             ([again, user("Hi"), again], {}, 2, message.id),
             ([ref(message.id), again], {"stream": True}, 1, message.id)]
    for input_, extra, index, item_id in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(model=MODEL, input=input_, max_output_tokens=8, **extra)
        error = refused.value.body
        assert error["param"] == f"input[{index}].id", error
        assert error["message"].endswith(f"Error: at '/input/{index}/id': Duplicate item found with id {item_id}. "
                                         "Remove duplicate items from your input and try again."), error
    run = httpx.post(server.base + RUN, json={"input": [ref(message.id), ref(message.id)]}, headers=server.headers, timeout=60)
    assert run.status_code == 400 and "Duplicate item found with id" in run.json()["errors"][0]["message"]
    ok = client.responses.create(model=MODEL, input=[user("Hi"), user("Hi")], previous_response_id=first.id, max_output_tokens=1)
    assert ok.status in ("completed", "incomplete")


def test_a_repeated_reference_is_refused_before_it_is_looked_up_on_every_route(server):
    """Hunt round 17 A-F9: references were each looked up and parsed (on the event loop) before the duplicate check, so
    thousands of references to one stored item stalled the server for seconds before their 400. The repeat is now
    refused first: an id of no stored item sent twice is the duplicate 400 (naming the repeat), not the first one's
    "not found", on every route that takes Responses input; the same references once are still looked up."""
    twice = [ref("msg_never_stored"), ref("msg_never_stored")]
    for path in ("/v1/responses", "/v1/responses/input_tokens", "/client/v4/accounts/acct/ai/v1/responses"):
        answer = httpx.post(server.base + path, json={"model": MODEL, "input": twice, "max_output_tokens": 8},
                            headers=server.headers, timeout=60)
        error = answer.json()["error"]
        assert answer.status_code == 400 and error["param"] == "input[1].id", (path, error)
        assert "Duplicate item found with id msg_never_stored" in error["message"], (path, error)
    run = httpx.post(server.base + RUN, json={"input": twice}, headers=server.headers, timeout=60)
    assert run.status_code == 400 and "at '/input/1/id': Duplicate item found" in run.json()["errors"][0]["message"]
    once = httpx.post(server.base + "/v1/responses/input_tokens", json={"model": MODEL, "input": twice[:1]},
                      headers=server.headers, timeout=60)
    assert once.status_code == 400 and once.json()["error"]["param"] == "input[0].id" and "not found" in once.text
