"""Wire defects a hard tester found (issue 11), each through the real server where it was seen."""

from __future__ import annotations

import json
import socket
import time

import httpx
import jsonschema
import pytest

from tests.server_util import MODEL, start_server

TOKEN = "secret"
RUN = f"/client/v4/accounts/acct/ai/run/{MODEL}"


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    s = start_server(checkpoints["original"], tmp_path_factory.mktemp("wire"), "--rate-limit", "0", "--max-model-len", "512",
                     token=TOKEN)
    yield s
    s.stop()


def call(server, method: str, path: str, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json", **kwargs.pop("headers", {})}
    return httpx.request(method, server.base + path, headers=headers, timeout=60, **kwargs)


def assert_surface_error(response: httpx.Response, path: str, status: int = 400, code: int = 5006) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    if path.startswith("/v1/"):
        assert body["error"]["code"] == str(code) and body["error"]["type"], body
    else:
        assert body["success"] is False and body["errors"][0]["code"] == code, body


def _nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


# -- 5: bad input is a 400, never a 500 ---------------------------------------------------------------

BAD_BODIES = [
    (RUN, b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
    (RUN, b'{"input": [{"role": "user", "content": "x\\udfff"}]}'),
    (RUN, b'{"prompt": "\\ud800", "raw": true}'),
    ("/v1/completions", b'{"model": "%s", "prompt": "\\ud800"}' % MODEL.encode()),
    ("/v1/completions", b'{"model": "%s", "prompt": "\xff\xfe"}' % MODEL.encode()),
    ("/v1/responses", b'{"model": "%s", "input": "\\udc00"}' % MODEL.encode()),
    ("/v1/chat/completions", b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "x": %s}'
     % (MODEL.encode(), b"[" * 1000 + b"]" * 1000)),
    (RUN, b'{"prompt": "hi", "x": %s}' % (b'{"a":' * 300 + b"1" + b"}" * 300)),
    # Python's json reads these; they are not JSON (RFC 8259), and JSON.parse refuses them.
    (RUN, b'{"input": "hi", "metadata": {"x": NaN}, "max_output_tokens": 2}'),
    (RUN + "?queueRequest=true", b'{"requests": [{"prompt": "hi", "max_tokens": 2, "external_reference": Infinity}]}'),
    ("/v1/chat/completions", b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "x": -Infinity}' % MODEL.encode()),
]


@pytest.mark.parametrize("path,raw", BAD_BODIES, ids=["surrogate-messages", "surrogate-input", "surrogate-raw", "surrogate-v1-prompt",
                                                       "bytes-v1", "surrogate-v1-responses", "deep-array-v1", "deep-object-run",
                                                       "nan-run", "infinity-batch", "minus-infinity-v1"])
def test_malformed_text_and_deep_bodies_are_400(server, path, raw):
    assert_surface_error(call(server, "POST", path, content=raw), path)


@pytest.mark.parametrize("path", [RUN, "/v1/chat/completions"])
def test_tool_parameters_nested_too_deep_are_400(server, path):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": _nested(70)}}]}
    assert_surface_error(call(server, "POST", path, json=body), path)
    body["tools"][0]["function"]["parameters"] = _nested(20)  # deep but reasonable: served
    assert call(server, "POST", path, json=body).status_code == 200


# -- 9: auth --------------------------------------------------------------------------------------------

def test_api_document_needs_the_token(server):
    for path in ("/openapi.json", "/docs"):
        assert httpx.get(server.base + path, timeout=30).status_code == 403, path
        assert call(server, "GET", path).status_code == 200, path
    assert httpx.get(server.base + "/health", timeout=30).status_code == 200  # liveness stays open


@pytest.mark.parametrize("header,status", [(TOKEN, 401), (f"bearer {TOKEN}", 200), (f"BEARER  {TOKEN}", 200),
                                           (f"Basic {TOKEN}", 401), ("Bearer", 401), (f"Bearer {TOKEN}x", 401)])
def test_bearer_scheme_is_required_and_case_insensitive(server, header, status):
    response = httpx.get(server.base + "/v1/models", headers={"Authorization": header}, timeout=30)
    assert response.status_code == status, response.text


def requests_counted(server, status: int, route: str = "/client/v4/accounts/{account_id}/ai/run/{model:path}") -> float:
    wanted = f'ossrun_requests_total{{route="{route}",status="{status}"}}'
    lines = [line for line in httpx.get(server.base + "/metrics", timeout=30).text.splitlines() if line.startswith(wanted)]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_refused_requests_are_counted_with_their_status(server):
    """What an operator watches (auth failures, oversized bodies) is in /metrics like every other answer."""
    before = requests_counted(server, 403), requests_counted(server, 413)
    for _ in range(3):
        assert httpx.post(server.base + RUN, json={"prompt": "x"}, timeout=30).status_code == 403
    assert call(server, "POST", RUN, content=b"x" * (10 * 1024 * 1024 + 1)).status_code == 413  # refused by its Content-Length
    assert (requests_counted(server, 403), requests_counted(server, 413)) == (before[0] + 3, before[1] + 1)


# -- 10: rate limit -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def limited_server(checkpoints, tmp_path_factory):
    s = start_server(checkpoints["original"], tmp_path_factory.mktemp("wire-limited"), "--rate-limit", "3", "--max-model-len", "256")
    yield s
    s.stop()


def test_rate_limit_keys_on_the_client_without_auth(limited_server):
    url, body = limited_server.run_url(), {"prompt": "a", "max_tokens": 1}
    codes = [httpx.post(url, json=body, headers={"Authorization": f"Bearer made-up-{i}"}, timeout=60) for i in range(4)]
    assert [r.status_code for r in codes] == [200, 200, 200, 429]
    assert 1 <= int(codes[-1].headers["Retry-After"]) <= 60
    openai_style = httpx.post(limited_server.base + "/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 1}, timeout=60)
    assert openai_style.status_code == 429 and "Retry-After" in openai_style.headers
    assert requests_counted(limited_server, 429) >= 1 and requests_counted(limited_server, 429, "/v1/completions") >= 1


# -- 7: polling a batch on the queue URL ----------------------------------------------------------------

def test_batch_polls_on_either_url(server):
    queued = call(server, "POST", RUN + "?queueRequest=true", json={"requests": [{"prompt": "hi", "max_tokens": 2}]})
    request_id = queued.json()["result"]["request_id"]
    for url in (RUN + "?queueRequest=true", RUN):
        polled = call(server, "POST", url, json={"request_id": request_id})
        assert polled.status_code == 200, polled.text
        assert polled.json()["result"]["request_id"] == request_id


# -- 12: smaller wire differences -----------------------------------------------------------------------

def openai_client(server, prefixed: bool = False):
    import openai

    base = f"{server.base}/client/v4/accounts/acct/ai/v1" if prefixed else f"{server.base}/v1"
    return openai.OpenAI(base_url=base, api_key=TOKEN, max_retries=0)


def test_unknown_routes_and_methods_answer_in_the_surface_envelope(server):
    assert_surface_error(call(server, "GET", "/v1/nope"), "/v1/nope", 404, 7000)
    assert_surface_error(call(server, "GET", "/client/v4/accounts/a/ai/nope"), "/client/v4/accounts/a/ai/nope", 404, 7000)
    assert_surface_error(call(server, "DELETE", "/v1/chat/completions"), "/v1/chat/completions", 405, 7001)


def _websocket_upgrade(server, path: str) -> tuple[str, dict[str, str], bytes]:
    """A WebSocket opening handshake (RFC 6455), as the Agents SDK's Responses WebSocket transport sends it → the
    status line, headers and body that came back."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                     f"Authorization: Bearer {TOKEN}\r\n\r\n".encode())
        reply = b""
        while b"\r\n\r\n" not in reply and (chunk := sock.recv(65536)):
            reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        status, *lines = head.decode("latin-1").split("\r\n")
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        while len(body) < int(headers.get("content-length", 0)) and (chunk := sock.recv(65536)):
            body += chunk
    return status, headers, body


@pytest.mark.parametrize("path,status", [("/v1/responses", "405"), ("/v1/nope", "404"), ("/health", "200")])
def test_a_websocket_upgrade_is_answered_as_http(server, path, status):
    """hunt_js L2: the Agents SDK's Responses WebSocket transport got a bare 403 (no body, no x-request-id, no log
    line: uvicorn's refusal of a WebSocket no route accepted), which reads as a token problem. The server speaks
    HTTP only: an upgrade request is answered as the plain request it also is, in the surface's shape."""
    line, headers, body = _websocket_upgrade(server, path)
    assert line.split(" ")[1] == status, (line, body)
    assert headers["x-request-id"].startswith("req_")
    answer = json.loads(body)
    if status == "405":
        assert "Method GET not allowed" in answer["error"]["message"] and headers["allow"].startswith("OPTIONS, POST")
    elif status == "404":
        assert answer["error"]["code"] == "7000"
    else:
        assert answer["status"] == "ok"


@pytest.mark.parametrize("method,path", [("POST", "/client/v4/accounts/x/ai/run"), ("POST", "/client/v4/accounts/x/ai/run/"),
                                         ("GET", "/client/v4/accounts/x/ai/tasks/search/"), ("GET", "/client/v4/accounts/x/ai/models/search/"),
                                         ("POST", "/v1/chat/completions/"), ("GET", "/v1/models/"), ("GET", f"/v1/models/{MODEL}/"),
                                         ("GET", "/client/v4/accounts/x/ai/v1/models/"),
                                         ("GET", f"/client/v4/accounts/x/ai/v1/models/{MODEL}/")])
def test_a_path_one_slash_off_is_the_surface_404_not_a_redirect(server, method, path):
    """The fine-tune routes are the one exception (Cloudflare's docs write them with a trailing `/`):
    tests/test_finetunes_server.py. Before: `GET /v1/models/` and `/v1/models/{id}/` were 5007 "No such model" (an
    empty id, an id ending in `/`; hunt round 17 A-F7)."""
    response = call(server, method, path, json={"prompt": "hi", "max_tokens": 2})
    if "/ai/v1/" in path:  # an OpenAI route under the account prefix: OpenAI's error shape
        assert response.status_code == 404 and response.json()["error"]["code"] == "7000", response.text
    else:
        assert_surface_error(response, path, 404, 7000)


@pytest.mark.parametrize("prefixed", [False, True], ids=["bare", "account-prefixed"])
def test_sdk_retrieves_models_and_responses(server, prefixed):
    import openai

    client = openai_client(server, prefixed)
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("@cf/nope/nothing")
    created = client.responses.create(model=MODEL, input="Hi", max_output_tokens=4, instructions="Be brief.")
    assert created.id.startswith("resp_") and all(item.id.split("_")[0] in ("rs", "msg", "fc") for item in created.output)
    fetched = client.responses.retrieve(created.id)
    assert fetched.id == created.id and fetched.output_text == created.output_text and fetched.instructions == "Be brief."
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_unknown")


def test_model_cards_have_a_fixed_creation_time(server):
    """`created` is the model's (gpt-oss's release, 2025-08-05), not the time of the call."""
    for prefixed in (False, True):
        client = openai_client(server, prefixed)
        assert {m.created for m in client.models.list().data} == {client.models.retrieve(MODEL).created} == {1754352000}


@pytest.mark.parametrize("fields,param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name"),
])
def test_schema_violations_name_the_param(server, fields, param):
    """OpenAI's error `param` is the offending field, as the message's pointer says."""
    import openai

    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client(server).chat.completions.create(model=MODEL, **body)
    assert caught.value.param == param and caught.value.code == "5006"


def test_responses_echo_the_request(server):
    tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    client = openai_client(server)
    first = client.responses.create(model=MODEL, input="Hi", max_output_tokens=3, instructions="Be brief.", tools=tools)
    assert first.instructions == "Be brief." and first.previous_response_id is None
    assert [t.name for t in first.tools] == ["get_weather"]
    second = client.responses.create(model=MODEL, input="Again", max_output_tokens=3, previous_response_id=first.id)
    assert second.previous_response_id == first.id and second.tools == []


def test_required_tool_choice_needs_tools(server):
    path = "/v1/chat/completions"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required", "max_tokens": 2}
    assert_surface_error(call(server, "POST", path, json=body), path)
    assert_surface_error(call(server, "POST", "/v1/responses", json={"model": MODEL, "input": "hi", "tool_choice": "required"}),
                         "/v1/responses")


def test_v1_streams_are_not_cached(server):
    for path, body in [("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
                       ("/v1/completions", {"prompt": "hi", "max_tokens": 2}), ("/v1/responses", {"input": "hi", "max_output_tokens": 2})]:
        response = call(server, "POST", path, json={"model": MODEL, "stream": True, **body})
        assert response.headers["cache-control"] == "no-cache", path


def _completion_tokens_metered(server) -> float:
    for line in call(server, "GET", "/metrics").text.splitlines():
        if line.startswith('ossrun_tokens_total{kind="completion"}'):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize("path,body", [
    (RUN, {"prompt": "go on", "max_tokens": 400, "stream": True}),
    ("/v1/completions", {"model": MODEL, "prompt": "go on", "max_tokens": 400, "stream": True}),
])
def test_aborted_streams_are_metered(server, path, body):
    import time

    before = _completion_tokens_metered(server)
    seen = 0
    with httpx.stream("POST", server.base + path, json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as response:
        for line in response.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 5:
                break
    deadline = time.monotonic() + 10
    while _completion_tokens_metered(server) - before < seen and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _completion_tokens_metered(server) - before >= seen


def test_stored_responses_survive_a_restart(checkpoints, tmp_path):
    server = start_server(checkpoints["original"], tmp_path, "--max-model-len", "256", token=TOKEN)
    try:
        first = openai_client(server).responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=3)
    finally:
        server.stop()
    server = start_server(checkpoints["original"], tmp_path, "--max-model-len", "256", token=TOKEN)
    try:
        client = openai_client(server)
        assert client.responses.retrieve(first.id).output_text == first.output_text
        follow_up = client.responses.create(model=MODEL, input="My name?", max_output_tokens=3, previous_response_id=first.id)
        assert follow_up.usage.input_tokens > first.usage.input_tokens
    finally:
        server.stop()


# -- 11: the OpenAPI document and the server agree --------------------------------------------------------

def document(server) -> dict:
    return call(server, "GET", "/openapi.json").json()


def schema_accepts(doc: dict, component: str, body: dict) -> bool:
    import jsonschema

    schema = {"$ref": f"#/components/schemas/{component}", "components": doc["components"]}
    return jsonschema.Draft202012Validator(schema).is_valid(body)


def test_document_is_valid_openapi_3_1(server):
    """Hunt round 12 C-F1: the document said 3.1.0 but put each SSE event's schema under 3.2's `itemSchema`, so
    openapi-spec-validator (and client generators, which check the declared version) refused it. In 3.1 a stream's
    `schema` is its event's, as SSE-aware tools (Schemathesis) read it before 3.2."""
    from openapi_spec_validator import OpenAPIV31SpecValidator

    doc = document(server)
    assert doc["openapi"].startswith("3.1.")
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in OpenAPIV31SpecValidator(doc).iter_errors()]
    assert not errors, errors[:5]
    stream = doc["paths"]["/client/v4/accounts/{account_id}/ai/run/{model}"]["post"]["responses"]["200"]["content"]["text/event-stream"]
    assert stream["schema"]["required"] == ["data"], stream  # each event's frames are still documented


def test_every_stream_schema_takes_its_done_frame(server):
    """Hunt round 18 C-F4: `data` was oneOf [the `[DONE]` const, a JSON frame by contentMediaType/contentSchema], which
    are annotations in JSON Schema 2020-12: any string matched the second branch too, so "[DONE]" matched both and a
    validator refused the frame every stream ends with."""
    doc = document(server)
    streams = [(path, content["text/event-stream"]["schema"]) for path, operations in doc["paths"].items()
               for operation in operations.values() if "text/event-stream" in (content := operation["responses"]["200"]["content"])]
    assert len(streams) >= 6
    for path, schema in streams:
        validator = jsonschema.Draft202012Validator({**schema, "components": doc["components"]})
        assert validator.is_valid({"data": "[DONE]"}) and not validator.is_valid({"data": 5}), path


def test_the_document_states_the_token_and_what_a_missing_one_gets(server):
    """Hunt round 18 C-F3: with --api-token, a bare /v1 route without the token is a 401 (OpenAI's), which no operation
    listed (only 403), nor the 429 of 20 wrong tokens; and no security scheme was stated, so /docs could not send one."""
    doc = document(server)
    assert doc["components"]["securitySchemes"]["bearer"] | {"description": ""} == {"type": "http", "scheme": "bearer", "description": ""}
    assert doc["security"] == [{"bearer": []}]
    concrete = {"{response_id}": "resp_x", "{model_id}": MODEL, "{account_id}": "acct", "{model}": MODEL, "{id_or_name}": "x"}
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            if path in ("/health", "/metrics"):
                assert operation["security"] == [] and "429" not in responses, path
                continue
            refusal = "401" if path.startswith("/v1/") else "403"
            assert "security" not in operation and {refusal, "429"} <= set(responses), (method, path)
            url = path
            for name, value in concrete.items():
                url = url.replace(name, value)
            answer = httpx.request(method.upper(), server.base + url, timeout=30)  # no token: not counted as a wrong one
            assert str(answer.status_code) == refusal, (method, path, answer.text)
            schema = responses[refusal]["content"]["application/json"]["schema"]
            jsonschema.validate(answer.json(), {**schema, "components": doc["components"]})


def test_every_path_parameter_is_declared(server):
    for path, operations in document(server)["paths"].items():
        for method, operation in operations.items():
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert declared >= {part[1:-1] for part in path.split("/") if part.startswith("{")}, (method, path)


def test_a_failed_batch_items_errors_are_in_the_document(server):
    """Hunt round 20 C-F4: `BatchItemResult` listed no `errors`, the only place a failed item's reason is (its
    `result` is `{}`), so a client generated from the document had no typed field for it."""
    failing = {"prompt": "hi", "max_tokens": 4, "response_format": {"type": "json_schema", "json_schema": {
        "type": "object", "properties": {"a": {"type": "strnig"}}}}}
    request_id = call(server, "POST", RUN + "?queueRequest=true", json={"requests": [failing]}).json()["result"]["request_id"]
    for _ in range(300):
        result = call(server, "POST", RUN, json={"request_id": request_id}).json()["result"]
        if result["status"] == "done":
            break
        time.sleep(0.1)
    item = result["responses"][0]
    assert item["success"] is False and item["errors"], item
    doc = document(server)
    declared = doc["components"]["schemas"]["BatchItemResult"]["properties"]
    assert set(item) <= set(declared), set(item) - set(declared)
    jsonschema.validate(item["errors"], {**declared["errors"], "components": doc["components"]})


SCHEMA_VALID = [
    ("/v1/chat/completions", "ChatCompletionRequest",
     {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Weather?"},
                                                    {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
                                                    {"role": "tool", "content": "sunny"}]}),
    # A tool message without an id answers the call before it (with no call before it, it answers nothing: a 400).
    (RUN, "MessagesInput", {"max_tokens": 2, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]}, {"role": "tool", "content": "42"}]}),
    ("/v1/completions", "CompletionRequest", {"model": MODEL, "prompt": "", "max_tokens": 2}),
    ("/v1/completions", "CompletionRequest", {"model": MODEL, "prompt": ["", "hi"], "max_tokens": 2}),
    ("/v1/responses", "ResponsesRequest", {"model": MODEL, "max_output_tokens": 2, "input": [{"content": "hi"}]}),
    ("/v1/responses", "ResponsesRequest", {"model": MODEL, "max_output_tokens": 2, "input": "hi",
                                           "tools": [{"type": "function", "name": "w", "parameters": {}}]}),
    (RUN, "ResponsesInput", {"max_output_tokens": 2, "input": [{"type": "message", "content": [{"type": "input_text", "text": "hi"}]}]}),
    # What the document's background/store and echo/logprobs rules leave served (hunt round 18 C-F6).
    ("/v1/responses", "ResponsesRequest", {"model": MODEL, "max_output_tokens": 2, "input": "hi", "background": False, "store": False}),
    ("/v1/responses/input_tokens", "InputTokensRequest", {"input": "hi", "background": True, "store": False}),  # neither is read
    ("/v1/completions", "CompletionRequest", {"model": MODEL, "prompt": "hi", "max_tokens": 2, "echo": True, "logprobs": None}),
    ("/v1/completions", "CompletionRequest", {"model": MODEL, "prompt": "hi", "max_tokens": 2, "echo": False, "logprobs": 1}),
    ("/client/v4/accounts/acct/ai/finetunes", "FinetuneCreate", {"model": MODEL, "name": "Ada.v2_final-1"}),
]


@pytest.mark.parametrize("path,component,body", SCHEMA_VALID, ids=[f"{i}" for i in range(len(SCHEMA_VALID))])
def test_schema_valid_requests_are_served(server, path, component, body):
    assert schema_accepts(document(server), component, body)
    response = call(server, "POST", path, json=body)
    assert response.status_code == 200, response.text


SCHEMA_INVALID = [
    ("/client/v4/accounts/acct/ai/finetunes", "FinetuneCreate", {"model": MODEL, "name": "no spaces"}),
    ("/client/v4/accounts/acct/ai/finetunes", "FinetuneCreate", {"model": MODEL, "name": ""}),
    ("/v1/responses", "ResponsesRequest", {"model": MODEL, "input": [{"type": "web_search_call"}]}),
    ("/v1/responses", "ResponsesRequest", {"model": MODEL, "input": [{"type": "item_reference"}]}),  # names no item
    (RUN, "ResponsesInput", {"input": [{"type": "item_reference", "id": 7}]}),
    ("/v1/completions", "CompletionRequest", {"model": MODEL, "prompt": []}),  # no prompt to answer (used to run on <|startoftext|>)
    ("/v1/completions", "CompletionRequest", {"model": MODEL, "prompt": [1, 2]}),  # token ids: text only
    ("/v1/completions", "CompletionRequest", {"model": MODEL, "prompt": "hi", "suffix": "end"}),  # no insertion
    ("/v1/completions", "CompletionRequest", {"model": MODEL, "prompt": "hi", "top_logprobs": 2}),  # chat's: logprobs: N here
    ("/v1/responses", "ResponsesRequest", {"model": MODEL, "input": "hi", "logprobs": True}),  # chat's: include here
    ("/v1/responses", "ResponsesRequest", {"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}),
    # Combinations OpenAI refuses: the document states them (if/then), the server answers 400 naming the field.
    ("/v1/chat/completions", "ChatCompletionRequest", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}),
    ("/v1/chat/completions", "ChatCompletionRequest", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": False,
                                                       "top_logprobs": 2}),
    ("/v1/chat/completions", "ChatCompletionRequest", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                       "stream_options": {"include_usage": True}}),
    ("/v1/completions", "CompletionRequest", {"model": MODEL, "prompt": "hi", "stream": False, "stream_options": {"include_usage": True}}),
    # Hunt round 18 C-F6: two more the document did not state.
    ("/v1/responses", "ResponsesRequest", {"model": MODEL, "input": "hi", "background": True, "store": False}),
    (RUN, "ResponsesInput", {"input": "hi", "background": True, "store": False}),
    ("/v1/completions", "CompletionRequest", {"model": MODEL, "prompt": "hi", "echo": True, "logprobs": 0}),
    # A function's arguments are a JSON object, so its parameters must be an object schema (OpenAI refuses others).
    ("/v1/chat/completions", "ChatCompletionRequest", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
                                                       "tools": [{"type": "function", "function": {"name": "w", "parameters": {"type": "string"}}}]}),
    ("/v1/responses", "ResponsesRequest", {"model": MODEL, "input": "hi", "tools": [{"type": "function", "name": "w", "parameters": {"type": "array"}}]}),
    (RUN, "MessagesInput", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"name": "w", "parameters": {"type": "integer"}}]}),
    # OpenAI's json_schema wrapper (a `schema` key) takes only its own keys and an object schema, as OpenAI's API.
    ("/v1/chat/completions", "ChatCompletionRequest", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": True, "x-extra": 1}}}),
    ("/v1/chat/completions", "ChatCompletionRequest", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": [1, 2]}}}),
    ("/v1/responses", "ResponsesRequest", {"model": MODEL, "input": "hi", "text": {"format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": "nope"}}}}),
    (RUN, "PromptInput", {"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"schema": {}, "x-extra": 1}}}),
    (RUN, "MessagesInput", {"messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": True}}}),
]


@pytest.mark.parametrize("path,component,body", SCHEMA_INVALID, ids=[f"{i}" for i in range(len(SCHEMA_INVALID))])
def test_schema_invalid_requests_are_refused(server, path, component, body):
    assert not schema_accepts(document(server), component, body)
    assert_surface_error(call(server, "POST", path, json=body), path)


def test_combinations_openai_refuses_name_their_field(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for extra, param, says in [({"top_logprobs": 2}, "top_logprobs", "logprobs must be true"),
                               ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream is true")]:
        error = call(server, "POST", "/v1/chat/completions", json={**body, **extra}).json()["error"]
        assert error["param"] == param and says in error["message"], error
    assert call(server, "POST", "/v1/chat/completions", json={**body, "logprobs": True, "top_logprobs": 2}).status_code == 200
    assert call(server, "POST", "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": True,
                                                         "stream_options": {"include_usage": True}}).status_code == 200


def test_options_lists_every_method_of_a_path(server):
    response = call(server, "OPTIONS", "/client/v4/accounts/acct/ai/finetunes")
    assert response.status_code == 204 and {"GET", "POST"} <= set(response.headers["allow"].replace(" ", "").split(","))
    wrong = call(server, "PUT", "/client/v4/accounts/acct/ai/finetunes")
    assert wrong.status_code == 405 and {"GET", "POST"} <= set(wrong.headers["allow"].replace(" ", "").split(","))


# -- HEAD, request content codings, SSE line separators (a later hunt: findings 3, 4 and 5) ---------------------

GET_PATHS = ["/health", "/metrics", "/", "/playground/playground.js", "/v1/models", f"/v1/models/{MODEL}",
             f"/client/v4/accounts/acct/ai/v1/models/{MODEL}", "/client/v4/accounts/acct/ai/finetunes", "/openapi.json", "/docs"]


@pytest.mark.parametrize("path", GET_PATHS)
def test_head_is_get_without_the_body(server, path):
    get, head = call(server, "GET", path), call(server, "HEAD", path)
    assert head.status_code == get.status_code == 200, head.headers
    assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
    if path not in ("/health", "/metrics"):  # their bodies change from one call to the next
        assert head.headers["content-length"] == get.headers["content-length"] == str(len(get.content))
    allowed = set(call(server, "OPTIONS", path).headers["allow"].replace(" ", "").split(","))
    assert {"GET", "HEAD"} <= allowed


def test_head_keeps_the_gets_refusals_and_is_not_a_post(server):
    assert call(server, "HEAD", "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401  # OpenAI's
    assert call(server, "HEAD", "/v1/models/nope").status_code == 404  # GET's answer: no such model
    assert call(server, "HEAD", "/v1/nope").status_code == 404
    post_only = call(server, "HEAD", "/v1/chat/completions")
    assert post_only.status_code == 405
    assert set(post_only.headers["allow"].replace(" ", "").split(",")) == {"OPTIONS", "POST"}


def test_head_sends_no_body_bytes_on_the_wire(server):
    """httpx never reads a HEAD response's body, so a body sent anyway would only show as garbage before the next
    response on the connection: read the raw bytes."""
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"HEAD /health HTTP/1.1\r\nHost: localhost\r\n\r\nGET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, rest = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200") and rest.startswith(b"HTTP/1.1 200"), raw


def _gzip(body: dict) -> bytes:
    import gzip

    return gzip.compress(json.dumps(body).encode())


def _deflate(body: dict) -> bytes:
    import zlib

    return zlib.compress(json.dumps(body).encode())


ENCODED = [(RUN, {"prompt": "hi", "max_tokens": 3, "temperature": 0}),
           ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0})]


@pytest.mark.parametrize("path,body", ENCODED, ids=["ai-run", "v1-chat"])
@pytest.mark.parametrize("coding,encode", [("gzip", _gzip), ("deflate", _deflate), ("x-gzip", _gzip)])
def test_gzip_and_deflate_bodies_are_decoded(server, path, body, coding, encode):
    plain = call(server, "POST", path, json=body)
    encoded = call(server, "POST", path, content=encode(body), headers={"Content-Encoding": coding})
    assert plain.status_code == encoded.status_code == 200, encoded.text
    usage = lambda r: (r.json().get("result") or r.json())["usage"]  # noqa: E731
    assert usage(encoded)["prompt_tokens"] == usage(plain)["prompt_tokens"]


@pytest.mark.parametrize("path,body", ENCODED, ids=["ai-run", "v1-chat"])
@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "gzip, gzip"])
def test_other_content_codings_are_415_naming_the_coding(server, path, body, coding):
    response = call(server, "POST", path, content=_gzip(body), headers={"Content-Encoding": coding})
    assert_surface_error(response, path, 415, 3000)
    assert coding in response.text and response.headers["accept-encoding"] == "gzip, deflate"


@pytest.mark.parametrize("path,body", ENCODED, ids=["ai-run", "v1-chat"])
def test_a_corrupt_or_truncated_stream_is_400_naming_the_coding(server, path, body):
    for coding, raw in (("gzip", b"not gzip at all"), ("gzip", _gzip(body)[:-6]), ("deflate", _deflate(body)[:10])):
        response = call(server, "POST", path, content=raw, headers={"Content-Encoding": coding})
        assert_surface_error(response, path, 400, 5006)
        assert f"Content-Encoding: {coding}" in response.text


@pytest.mark.parametrize("path,body", ENCODED, ids=["ai-run", "v1-chat"])
def test_a_small_zip_bomb_is_413(server, path, body):
    """11 MB of JSON whitespace gzips to 11 kB: the decoded size meets the 10 MB cap, as an unencoded body would."""
    import gzip

    bomb = gzip.compress(json.dumps(body).encode()[:-1] + b" " * (11 * 1024 * 1024) + b"}")
    assert len(bomb) < 100_000
    assert_surface_error(call(server, "POST", path, content=bomb, headers={"Content-Encoding": "gzip"}), path, 413, 3006)


def _sse_payloads(response: httpx.Response) -> list:
    """The `data:` payloads, read as a line-splitting client reads them (httpx splits at U+2028 as splitlines does)."""
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith(("data: ", "event: ")) for line in lines), lines
    return [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]


@pytest.mark.parametrize("n", [1, 2], ids=["one-choice", "merged-choices"])
def test_line_separators_in_a_stream_stay_in_their_frame(server, n):
    """Echoed text puts U+2028, U+2029 and U+0085 in a frame deterministically: the prompt of `echo: true`, the
    `instructions` of a Responses stream's `response.created`."""
    text = "one\u2028two\u2029three\x85four"
    with httpx.stream("POST", server.base + "/v1/completions", timeout=60, headers={"Authorization": f"Bearer {TOKEN}"},
                      json={"model": MODEL, "prompt": text, "echo": True, "max_tokens": 2, "n": n, "stream": True}) as response:
        assert response.status_code == 200
        texts = [choice["text"] for chunk in _sse_payloads(response) for choice in chunk["choices"]]
    assert texts.count(text) == n
    with httpx.stream("POST", server.base + "/v1/responses", timeout=60, headers={"Authorization": f"Bearer {TOKEN}"},
                      json={"model": MODEL, "input": "hi", "instructions": text, "max_output_tokens": 2, "stream": True}) as response:
        events = _sse_payloads(response)
    assert events[0]["type"] == "response.created" and events[0]["response"]["instructions"] == text


# -- 4: Workers AI's JSON mode ----------------------------------------------------------------------------

COUNTRY = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "capital": {"type": "string", "maxLength": 12}},
           "required": ["name", "capital"], "additionalProperties": False}
FORMATS = {
    "workers-ai": {"type": "json_schema", "json_schema": COUNTRY},
    "openai": {"type": "json_schema", "json_schema": {"name": "country", "schema": COUNTRY, "strict": True}},
    "json_object": {"type": "json_object"},
}


def _answer(shape: str, result: dict):
    if shape == "prompt":
        return result["response"]
    if shape == "messages":
        return json.loads(result["choices"][0]["message"]["content"])
    return json.loads(result["output_text"])


@pytest.mark.parametrize("form", FORMATS)
@pytest.mark.parametrize("shape", ["prompt", "messages", "responses"])
def test_json_mode_in_every_spelling_on_every_shape(server, shape, form):
    body = {"prompt": {"prompt": "Tell me about India."}, "messages": {"messages": [{"role": "user", "content": "India?"}]},
            "responses": {"input": "India?"}}[shape]
    limit = "max_output_tokens" if shape == "responses" else "max_tokens"
    response = call(server, "POST", RUN, json={**body, limit: 300, "temperature": 1.0, "seed": 7, "response_format": FORMATS[form]})
    assert response.status_code == 200, response.text
    answer = _answer(shape, response.json()["result"])
    assert isinstance(answer, dict)  # the Prompt shape answers the object itself, as the hosted JSON mode does
    if form != "json_object":
        jsonschema.validate(answer, COUNTRY)


@pytest.mark.parametrize("max_tokens", [24, 40, 90])
def test_json_mode_and_forced_calls_end_valid_within_max_tokens(server, max_tokens):
    """The random model never closes its JSON by itself: only the budget-aware grammar can make these valid."""
    for seed in (1, 2):
        chat = call(server, "POST", "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "JSON"}], "max_tokens": max_tokens, "seed": seed,
            "temperature": 1.0, "response_format": FORMATS["json_object"]}).json()
        assert chat["usage"]["completion_tokens"] <= max_tokens
        assert isinstance(json.loads(chat["choices"][0]["message"]["content"]), dict), chat
        forced = call(server, "POST", "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "Weather?"}], "max_tokens": max_tokens, "seed": seed,
            "temperature": 1.0, "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": COUNTRY}}],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}).json()
        jsonschema.validate(json.loads(forced["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]), COUNTRY)


def test_an_odd_openai_json_schema_wrapper_is_a_400_naming_the_field(server):
    """It used to be taken for Workers AI's schema itself, so any JSON passed: the caller's schema was dropped."""
    import openai

    client = openai_client(server)
    for wrapper, says in [({"name": "x", "schema": COUNTRY, "strict": True, "x-extra": 1}, "unknown key 'x-extra'"),
                          ({"name": "x", "schema": [1, 2]}, "json_schema.schema must be a JSON Schema object")]:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JSON"}], max_tokens=50,
                                           response_format={"type": "json_schema", "json_schema": wrapper})
        assert caught.value.code == "5006" and caught.value.param == "response_format.json_schema"
        assert says in caught.value.message
        with pytest.raises(openai.BadRequestError) as caught:
            client.responses.create(model=MODEL, input="JSON", max_output_tokens=50,
                                    text={"format": {"type": "json_schema", "json_schema": wrapper}})
        assert caught.value.param == "text.format.json_schema" and says in caught.value.message
        refused = call(server, "POST", RUN, json={"prompt": "JSON", "response_format": {"type": "json_schema", "json_schema": wrapper}})
        assert_surface_error(refused, RUN)
        assert says in refused.json()["errors"][0]["message"]


def test_a_budget_too_small_for_the_schema_is_a_clear_400(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "JSON"}], "max_tokens": 3,
            "response_format": FORMATS["openai"]}
    response = call(server, "POST", "/v1/chat/completions", json=body)
    assert_surface_error(response, "/v1/chat/completions")
    assert "max_tokens 3 cannot hold a valid answer" in response.json()["error"]["message"]
    assert response.json()["error"]["param"] == "max_tokens"
    # Hunt round 13 B-F2: the message named max_tokens whatever field the caller had set (on Responses, a field it
    # may not even send); it names the caller's own now.
    renamed = {**body, "max_completion_tokens": 3}
    del renamed["max_tokens"]
    response = call(server, "POST", "/v1/chat/completions", json=renamed)
    assert "max_completion_tokens 3 cannot hold" in response.json()["error"]["message"]
    responses_body = {"model": MODEL, "input": "JSON", "max_output_tokens": 3, "text": {"format": {"type": "json_object"}}}
    response = call(server, "POST", "/v1/responses", json=responses_body)
    assert response.status_code == 400 and "max_output_tokens 3 cannot hold" in response.json()["error"]["message"]
    assert response.json()["error"]["param"] == "max_output_tokens"
    response = call(server, "POST", RUN, json={k: v for k, v in responses_body.items() if k != "model"})
    assert_surface_error(response, RUN)
    assert "max_output_tokens 3 cannot hold" in response.json()["errors"][0]["message"]


def test_raw_on_a_conversation_is_ignored_not_refused(server):
    """`raw` is in the sampling fields every shape's schema shares; only a Prompt has raw text to send."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "raw": True, "max_tokens": 2}
    assert call(server, "POST", "/v1/chat/completions", json=body).status_code == 200


# -- content parts, surrogates and raw prompts (hunt h2) -----------------------------------------------------

def _error(response) -> tuple[str, str | None]:
    """The message and (on /v1) the param of an error answer, in either envelope."""
    body = response.json()
    if "error" in body:
        return body["error"]["message"], body["error"]["param"]
    return body["errors"][0]["message"], None


def _parts(*parts: dict) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, *parts]}]


@pytest.mark.parametrize(("path", "body", "kind", "param"), [
    ("/v1/chat/completions", {"model": MODEL, "messages": _parts({"type": "image_url", "image_url": {"url": "https://x/a.png"}})},
     "image_url", "messages[0].content[1]"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "system", "content": "Be brief."},
                                                           *_parts({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}})]},
     "input_audio", "messages[1].content[1]"),
    ("/v1/chat/completions", {"model": MODEL, "messages": _parts({"type": "file", "file": {"file_id": "f"}})}, "file", "messages[0].content[1]"),
    ("/v1/responses", {"model": MODEL, "input": _parts({"type": "input_image", "image_url": "https://x/a.png"})},
     "input_image", "input[0].content[1]"),
    ("/v1/responses", {"model": MODEL, "input": [{"type": "message", "role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "input_file", "input[0].content[0]"),
    (RUN, {"messages": _parts({"type": "image_url", "image_url": {"url": "https://x/a.png"}})}, "image_url", "messages[0].content[1]"),
    (RUN, {"input": _parts({"type": "input_image", "image_url": "https://x/a.png"})}, "input_image", "input[0].content[1]"),
])
def test_a_part_gpt_oss_cannot_read_is_one_400_naming_it(server, path, body, kind, param):
    """It was every union branch's complaint ('Input should be a valid string', 'Field required', and on Responses
    the false 'at /input/0/type: Field required'), never saying that gpt-oss reads text only."""
    response = call(server, "POST", path, json=body)
    assert response.status_code == 400, response.text
    message, got_param = _error(response)
    pointer = "/" + param.replace("[", "/").replace("]", "").replace(".", "/")
    assert message.endswith(f"Error: at '{pointer}': content part type '{kind}' is not supported: gpt-oss takes text only "
                            "(parts of type text, input_text, output_text or refusal)"), message
    assert got_param == (param if path.startswith("/v1") else None)


def test_an_unknown_responses_item_is_one_400_naming_its_type(server):
    response = call(server, "POST", "/v1/responses", json={"model": MODEL, "input": [{"type": "web_search_call", "id": "ws"}]})
    message, param = _error(response)
    assert message.endswith("Error: at '/input/0': input item type 'web_search_call' is not supported: items are message, "
                            "function_call, function_call_output, reasoning or item_reference") and param == "input[0]", message


@pytest.mark.parametrize(("path", "body", "where"), [
    (RUN, {"input": [{"type": [], "role": "user", "content": "hi"}]}, "input/0"),
    (RUN + "?queueRequest=true", {"requests": [{"input": [{"type": {}, "role": "user", "content": "hi"}]}]}, "input/0"),
    ("/v1/responses", {"model": MODEL, "input": [{"type": ["message"], "role": "user", "content": "hi"}]}, "input/0"),
    ("/v1/responses/input_tokens", {"input": [{"content": "hi"}, {"type": {}, "role": "user", "content": "hi"}]}, "input/1"),
    ("/client/v4/accounts/acct/ai/v1/responses", {"model": MODEL, "input": [{"type": [], "call_id": "c", "name": "f"}]}, "input/0"),
])
def test_an_item_type_that_is_no_string_is_a_400_naming_it(server, path, body, where):
    """Hunt round 18 C-F1: a list or object `type` was a 500 ('unhashable type' testing it against the item types)."""
    response = call(server, "POST", path, json=body)
    assert response.status_code == 400 and "5006" in response.text, response.text
    message, param = _error(response)
    assert f"at '/{where}/type': input item type " in message and "is not supported: items are message" in message, message
    assert param == (where.replace("/", "[") + "].type" if "/v1/" in path else None)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses", RUN])
def test_an_assistant_refusal_part_is_served_as_that_turns_answer(server, path):
    """A history replayed from an OpenAI model may hold a refusal; it was a 400 ('Input should be text, ...')."""
    def body(assistant_content) -> dict:
        turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": assistant_content},
                 {"role": "user", "content": "Bye"}]
        responses = path == "/v1/responses"
        return {"model": MODEL, ("input" if responses else "messages"): turns, ("max_output_tokens" if responses else "max_tokens"): 2}

    refused = call(server, "POST", path, json=body([{"type": "refusal", "refusal": "I cannot help with that."}]))
    said = call(server, "POST", path, json=body("I cannot help with that."))
    assert refused.status_code == 200, refused.text
    usage = [(r.json().get("result") or r.json())["usage"] for r in (refused, said)]
    prompt = "input_tokens" if path == "/v1/responses" else "prompt_tokens"
    assert usage[0][prompt] == usage[1][prompt]  # the same prompt: the refusal is the assistant's final text


@pytest.mark.parametrize(("raw", "param"), [
    (b'{"model": "%s", "messages": [{"role": "user", "content": "Hi\\ud800"}]}', "messages[0].content"),
    (b'{"model": "%s", "input": [{"role": "user", "content": [{"type": "input_text", "text": "\\udfff"}]}]}', "input[0].content[0].text"),
])
def test_a_lone_surrogate_names_its_field_in_param(server, raw, param):
    """The pointer was in the message, but `param` was null."""
    path = "/v1/chat/completions" if b"messages" in raw else "/v1/responses"
    response = call(server, "POST", path, content=raw % MODEL.encode())
    message, got = _error(response)
    assert response.status_code == 400 and got == param and "lone UTF-16 surrogate" in message, response.text



RAW = {"prompt": "<|start|>user<|message|>Weather in Paris?<|end|><|start|>assistant", "raw": True, "max_tokens": 2}
WEATHER_TOOL = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


@pytest.mark.parametrize(("path", "body", "field"), [
    (RUN, {**RAW, "response_format": {"type": "json_schema", "json_schema": {"type": "object"}}}, "response_format"),
    (RUN, {**RAW, "response_format": {"type": "json_object"}}, "response_format"),
    (RUN, {**RAW, "tools": [WEATHER_TOOL]}, "tools"),
    (RUN, {**RAW, "functions": [WEATHER_TOOL]}, "functions"),
    (RUN, {**RAW, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    (RUN, {**RAW, "tool_choice": "required"}, "tool_choice"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2, "response_format": {"type": "json_object"}}, "response_format"),
])
def test_what_a_prompt_sent_as_is_cannot_honour_is_a_400_naming_it(server, path, body, field):
    """Raw prompts answered 200 with free text, the JSON format or the named tool silently dropped (nothing renders
    them into a raw prompt, and their grammars start at `<|start|>assistant`); so did /v1/completions' format."""
    component = "CompletionRequest" if path.startswith("/v1") else "PromptInput"
    assert not schema_accepts(document(server), component, body)  # the document states it
    response = call(server, "POST", path, json=body)
    assert_surface_error(response, path)
    message, param = _error(response)
    assert f"at '/{field}': " in message and f"so {field} cannot be honoured" in message, message
    assert param == (field if path.startswith("/v1") else None)


@pytest.mark.parametrize("extra", [{"response_format": {"type": "text"}}, {"tool_choice": "auto"}, {"tools": []},
                                   {"tool_choice": "none"}])
def test_a_raw_prompt_takes_what_asks_for_nothing(server, extra):
    assert schema_accepts(document(server), "PromptInput", {**RAW, **extra})
    assert call(server, "POST", RUN, json={**RAW, **extra}).status_code == 200


def test_a_batch_item_raw_prompt_with_a_json_format_is_refused_when_queued(server):
    item = {**RAW, "response_format": {"type": "json_object"}}
    response = call(server, "POST", RUN + "?queueRequest=true", json={"requests": [{"prompt": "hi", "max_tokens": 2}, item]})
    assert_surface_error(response, RUN)
    assert "in requests[1]" in _error(response)[0]


JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "capital", "schema": {"type": "object", "properties": {
    "capital": {"type": "string"}}, "required": ["capital"]}, "strict": True}}
STOP_CASES = [
    (RUN, "PromptInput", {"prompt": "Capital of France?", "response_format": {"type": "json_object"}, "stop": "}"}),
    (RUN, "MessagesInput", {"messages": [{"role": "user", "content": "Capital?"}], "stop": [",", "Paris"],
                            "response_format": {"type": "json_schema", "json_schema": {"type": "object"}}}),  # Workers AI's spelling
    ("/v1/chat/completions", "ChatCompletionRequest", {"model": MODEL, "messages": [{"role": "user", "content": "Capital?"}],
                                                       "response_format": JSON_SCHEMA, "stop": ["\"capital\""]}),
]


@pytest.mark.parametrize(("path", "component", "body"), STOP_CASES, ids=["prompt", "messages", "chat"])
def test_stop_with_a_json_format_is_a_400_naming_stop(server, path, component, body):
    """Hunt round 14 A-F2: a stop string cut the JSON answer into text that does not parse, reported as
    `finish_reason: "stop"` (the Prompt shape's `response` a string, not the parsed value). Refused up front, as `raw`
    with a JSON format is, and the document states it."""
    assert not schema_accepts(document(server), component, body)
    response = call(server, "POST", path, json={**body, "max_tokens": 8})
    assert_surface_error(response, path)
    message, param = _error(response)
    assert "at '/stop': " in message and "promises an answer that parses" in message, message
    assert param == ("stop" if path.startswith("/v1") else None)
    free = {**body, "response_format": {"type": "text"}, "max_tokens": 2}  # text may stop anywhere
    assert schema_accepts(document(server), component, free)
    assert call(server, "POST", path, json=free).status_code == 200
    no_stop = {**body, "stop": [], "max_tokens": 2}
    assert schema_accepts(document(server), component, no_stop)


def test_stop_with_a_json_format_is_refused_by_the_openai_sdk_call(server):
    import openai

    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key=TOKEN, max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Capital?"}], max_tokens=8,
                                       response_format=JSON_SCHEMA, stop=["}"])
    assert refused.value.param == "stop" and refused.value.code == "5006"


def test_a_batch_item_with_stop_and_a_json_format_is_refused_when_queued(server):
    item = {"messages": [{"role": "user", "content": "Capital?"}], "response_format": {"type": "json_object"}, "stop": "}"}
    response = call(server, "POST", RUN + "?queueRequest=true", json={"requests": [{"prompt": "hi", "max_tokens": 2}, item]})
    assert_surface_error(response, RUN)
    assert "in requests[1]" in _error(response)[0] and "/stop" in _error(response)[0]


WRAPPER_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize(("wrapper", "param"), [
    ({"name": "x", "schema": WRAPPER_SCHEMA, "strict": "true"}, "response_format.json_schema.strict"),
    ({"name": "x", "schema": WRAPPER_SCHEMA, "strict": 1}, "response_format.json_schema.strict"),
    ({"name": 3, "schema": WRAPPER_SCHEMA}, "response_format.json_schema.name"),
    ({"name": "x", "description": ["d"], "schema": WRAPPER_SCHEMA}, "response_format.json_schema.description"),
    ({"name": "x", "strict": True}, "response_format.json_schema.schema"),  # a JS client's `schema: undefined`
    ({"name": "x"}, "response_format.json_schema.schema"),
], ids=["strict-string", "strict-1", "name-number", "description-list", "no-schema", "name-only"])
@pytest.mark.parametrize("path", [RUN, "/v1/chat/completions"])
def test_the_json_schema_wrapper_is_typed(server, path, wrapper, param):
    """Hunt round 14 A-F5: `strict: "true"` was accepted and read as not strict (Responses' `text.format.strict` refused
    it), `name` and `description` were unchecked, and a wrapper without `schema` was taken as Workers AI's bare schema,
    constraining nothing (the answer a bare number)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "JSON"}], "max_tokens": 8,
            "response_format": {"type": "json_schema", "json_schema": wrapper}}
    component = "ChatCompletionRequest" if path.startswith("/v1") else "MessagesInput"
    assert not schema_accepts(document(server), component, body)  # the document states it
    response = call(server, "POST", path, json=body)
    assert_surface_error(response, path)
    message, got = _error(response)
    assert f"at '/{param.replace('.', '/')}'" in message, message
    assert got == (param if path.startswith("/v1") else None)


@pytest.mark.parametrize("wrapper", [
    WRAPPER_SCHEMA,  # Workers AI's spelling: the schema itself
    {"type": "object", "description": "an object", "properties": {"a": {"type": "integer"}}},  # a schema naming itself
    {},  # a schema that says nothing: any JSON
    {"name": "x", "schema": WRAPPER_SCHEMA, "strict": None, "description": None},
    {"name": "x", "schema": WRAPPER_SCHEMA, "strict": False, "description": "d"},
], ids=["bare", "bare-described", "empty", "nulls", "typed"])
def test_well_typed_and_bare_json_schemas_are_served(server, wrapper):
    body = {"messages": [{"role": "user", "content": "JSON"}], "max_tokens": 60,
            "response_format": {"type": "json_schema", "json_schema": wrapper}}
    assert schema_accepts(document(server), "MessagesInput", body)
    response = call(server, "POST", RUN, json=body)
    assert response.status_code == 200, response.text


def test_the_openai_sdk_gets_the_wrapper_key_it_mistyped(server):
    import openai

    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key=TOKEN, max_retries=0)
    for wrapper, param in (({"name": "x", "schema": WRAPPER_SCHEMA, "strict": "true"}, "response_format.json_schema.strict"),
                           ({"name": "x", "strict": True}, "response_format.json_schema.schema")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JSON"}], max_tokens=8,
                                           response_format={"type": "json_schema", "json_schema": wrapper})
        assert refused.value.param == param and refused.value.code == "5006"
