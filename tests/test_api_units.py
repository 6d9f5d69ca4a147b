"""The API's rooms one by one: validation and its 5006 messages, prices, the rate limiter, the body cap, envelopes.

In process on the scripted engine (`tests/api_fakes.py`): these tests check what the API does around the
engine, never what it generates, so no model is loaded; `test_reject_if_busy` marks the engine busy
directly (a real engine is busy only for the milliseconds a demo answer takes). What the model writes,
frame by frame, is checked on the real server and the demo model in `test_api_streams.py`.
"""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from ossrun.api import schemas
from ossrun.api.access import BrowserPolicy, RateLimiter, TrustedProxies, parse_origins
from ossrun.api.app import MAX_BODY_BYTES, AppSettings, build_app
from ossrun.api.errors import ApiError, is_openai_path
from ossrun.api.metering import PRICES, USD_PER_NEURON
from tests.api_fakes import FakeEngine

MODEL = "@cf/openai/gpt-oss-20b"
RUN = f"/client/v4/accounts/acct/ai/run/{MODEL}"


@pytest.fixture
def client(tmp_path):
    with TestClient(build_app(FakeEngine(), AppSettings(data_dir=tmp_path, rate_limit_per_minute=0))) as c:
        yield c


# -- shapes and validation --------------------------------------------------------------------------------

@pytest.mark.parametrize("body, shape", [
    ({"prompt": "hi"}, "prompt"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, "messages"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages"),
    ({"input": "hi"}, "responses"),
    ({"input": [{"role": "user", "content": "hi"}], "reasoning": {"effort": "low"}}, "responses"),
])
def test_classify_picks_the_one_shape(body, shape):
    assert schemas.classify(body)[0] == shape


@pytest.mark.parametrize("body, fragment", [
    ({"prompt": "a", "temperature": "0.5"}, "at '/temperature'"),
    ({"prompt": "a", "max_tokens": "5"}, "at '/max_tokens'"),
    ({"prompt": "a", "max_tokens": 5.5}, "at '/max_tokens'"),
    ({"prompt": "a", "stream": 1}, "at '/stream'"),
    ({"prompt": "a", "top_p": 0}, "at '/top_p'"),
    ({"prompt": "a", "top_k": 51}, "at '/top_k'"),
    ({"prompt": "a", "seed": 10**10}, "at '/seed'"),
    ({"prompt": "a", "repetition_penalty": 2.5}, "at '/repetition_penalty'"),
    ({"prompt": "a", "frequency_penalty": -3}, "at '/frequency_penalty'"),
    ({"prompt": "a", "presence_penalty": 3}, "at '/presence_penalty'"),
    ({"prompt": "a", "response_format": {"type": "xml"}}, "at '/response_format/type'"),
    ({"prompt": "a", "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "x-extra": 1}}},
     "at '/response_format/json_schema': Value error, json_schema has unknown key 'x-extra'"),
    ({"prompt": "a", "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1, 2]}}},
     "at '/response_format/json_schema': Value error, json_schema.schema must be a JSON Schema object"),
    ({"input": "a", "text": {"format": {"type": "json_schema", "json_schema": {"schema": "nope"}}}}, "at '/text/format/json_schema'"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "text": "x"}]}]}, "at '/messages/0/content"),
    ({"messages": []}, "at '/messages'"),
    ({"input": "a", "reasoning": {"effort": "max"}}, "at '/reasoning/effort'"),
    ({"input": "a", "max_output_tokens": 0}, "at '/max_output_tokens'"),
    ([1, 2], "must be object"),
])
def test_out_of_range_is_5006_naming_the_field(body, fragment):
    with pytest.raises(ApiError) as caught:
        schemas.classify(body)
    assert caught.value.status == 400 and caught.value.code == 5006
    assert caught.value.message.startswith("AiError: Bad input: ") and fragment in caught.value.message


BUILT_IN = "only function tools (type 'function') can be called here, not built-in tools"


@pytest.mark.parametrize("body, param, message", [
    ({"input": "a", "tools": [{"type": "code_interpreter"}]}, "tools[0].type",
     f"at '/tools/0/type': tool type 'code_interpreter' is not supported: {BUILT_IN}"),
    ({"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "web_search"}]}, "tools[0].type",
     f"at '/tools/0/type': tool type 'web_search' is not supported: {BUILT_IN}"),  # chat has no web search tool
    ({"input": "a", "tools": [{"type": "function", "name": "f"}, {"type": "file_search", "vector_store_ids": []}]}, "tools[1].type",
     f"at '/tools/1/type': tool type 'file_search' is not supported: {BUILT_IN}"),
    ({"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "custom", "name": "x"}]}, "tools[0].type",
     f"at '/tools/0/type': tool type 'custom' is not supported: {BUILT_IN}"),
    ({"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters", "at '/tools/0/function/parameters': a function's parameters must be a JSON Schema of type 'object' "
                                     "(arguments are a JSON object), not 'array'"),
    ({"input": "a", "tools": [{"type": "function", "description": "x"}]}, "tools[0]",
     "at '/tools/0': a function tool needs the function's name: {'type': 'function', 'function': {'name': …}} or, flat, {'type': 'function', 'name': …}"),
    ({"input": "a", "tool_choice": {"type": "file_search"}}, "tool_choice.type",
     "at '/tool_choice/type': tool_choice type 'file_search' is not supported: tool_choice is 'none', 'auto', 'required', one function "
     "tool (type 'function') or allowed_tools"),
    ({"input": "a", "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "mcp", "server_label": "x"}]}},
     "tool_choice.tools[0].type", "at '/tool_choice/tools/0/type': allowed tool type 'mcp' is not supported: allowed_tools lists "
     "function tools"),
    ({"messages": [{"role": "user", "content": "a"}], "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "none", "tools": []}}},
     "tool_choice.allowed_tools.mode", "at '/tool_choice/allowed_tools/mode': Input should be 'auto' or 'required'"),
    ({"input": "a", "tool_choice": "sometimes"}, "tool_choice", "at '/tool_choice': Input should be 'none', 'auto' or 'required'"),
])
def test_a_tool_of_another_type_is_one_error_naming_it(body, param, message):
    """A built-in tool got every union branch's complaint (`Input should be 'function'; … 'function': Field required;
    … 'name': Field required`); the type is what is wrong, so the error says that, once."""
    with pytest.raises(ApiError) as caught:
        schemas.classify(body)
    assert caught.value.param == param and message in caught.value.message
    assert caught.value.message.count("at '/") == 1  # one error, not one per union branch


def test_integral_floats_are_integers():
    """JSON Schema's "integer" includes 5.0, so the hosted validator (JavaScript) accepts it; so do we."""
    _, parsed = schemas.classify({"prompt": "a", "max_tokens": 5.0, "seed": 7.0, "top_k": 3.0})
    assert (parsed.max_tokens, parsed.seed, parsed.top_k) == (5, 7, 3)


def test_temperature_may_be_an_integer():
    assert schemas.classify({"prompt": "a", "temperature": 1})[1].temperature == 1.0


@pytest.mark.parametrize("body, matches", [({"nothing": 1}, "0 matches"), ({"prompt": "a", "input": "b"}, "2 matches (prompt, responses)")])
def test_one_of_says_what_was_expected(body, matches):
    with pytest.raises(ApiError) as caught:
        schemas.classify(body)
    message = caught.value.message
    assert f"oneOf at '/' not met, {matches}" in message
    assert all(f"required properties at '/' are '{key}'" in message for key in ("prompt", "messages", "input"))


def test_a_null_branch_key_picks_no_branch():
    """`prompt: null` beside `input` is a valid Responses body (its `prompt` may be null) and no Prompt body (a prompt is
    a string), so the oneOf has one match; counting the key's presence alone made it "2 matches" (test_fuzz found it)."""
    name, parsed = schemas.classify({"input": "x", "prompt": None})
    assert name == "responses" and parsed.input == "x"


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


@pytest.mark.parametrize("fmt", [
    {"type": "json_schema", "json_schema": SCHEMA},  # Workers AI: the schema itself
    {"type": "json_schema", "json_schema": {"name": "x", "description": "d", "schema": SCHEMA, "strict": True}},  # OpenAI chat
    {"type": "json_schema", "json_schema": {"schema": SCHEMA}},
    {"type": "json_schema", "name": "x", "schema": SCHEMA},  # Responses' flat spelling
])
def test_every_json_schema_spelling_gives_the_schema(fmt):
    from ossrun.api.ask import final_format

    assert final_format(schemas.ResponseFormat.model_validate(fmt)).schema == SCHEMA


@pytest.mark.parametrize("path, body, section", [
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "response_format":
        {"type": "json_schema", "json_schema": {"name": "count", "description": "How many", "schema": SCHEMA}}},
     '# Response Formats\n\n## count\n\n// How many\n{"type":"object","properties":{"n":{"type":"integer"}},"required":["n"]}'),
    ("/v1/responses", {"model": MODEL, "input": "hi", "text": {"format": {"type": "json_schema", "name": "count", "schema": SCHEMA}}},
     '# Response Formats\n\n## count\n\n{"type":"object"'),
    (RUN, {"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": SCHEMA}},
     '# Response Formats\n\n## structured_output\n\n{"type":"object"'),
])
def test_a_json_schema_is_stated_to_the_model_in_the_developer_message(tmp_path, path, body, section):
    """OpenAI's harmony format guide: the answer's schema goes at the end of the developer message under
    `# Response Formats`; without it the model learns the schema only from the tokens the grammar forces."""
    from ossrun import harmony

    engine = FakeEngine()
    with TestClient(build_app(engine, AppSettings(data_dir=tmp_path, rate_limit_per_minute=0))) as c:
        assert c.post(path, json=body).status_code == 200
        assert c.post(path, json={**body, "response_format": {"type": "json_object"}} if "response_format" in body
                      else {**body, "text": {"format": {"type": "json_object"}}}).status_code == 200
    stated, any_object = (harmony.decode(r.prompt_token_ids) for r in engine.requests)
    developer = stated.split("<|start|>developer<|message|>")[1].split("<|end|>")[0]
    assert section in developer
    assert "# Response Formats" not in any_object  # json_object: no schema to state


def test_a_schema_too_long_to_state_is_held_by_the_grammar_alone(tmp_path):
    """A 5000-property schema stated in full would add ~60k prompt tokens to every request."""
    from ossrun import harmony
    from ossrun.api.service import MAX_STATED_SCHEMA_CHARS

    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(2000)}}
    assert len(json.dumps(wide, separators=(",", ":"))) > MAX_STATED_SCHEMA_CHARS
    engine = FakeEngine()
    with TestClient(build_app(engine, AppSettings(data_dir=tmp_path, rate_limit_per_minute=0))) as c:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        for schema in (wide, SCHEMA):
            fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
            assert c.post("/v1/chat/completions", json={**body, "response_format": fmt}).status_code == 200
    wide_prompt, small_prompt = (harmony.decode(r.prompt_token_ids) for r in engine.requests)
    assert "# Response Formats" not in wide_prompt and "# Response Formats" in small_prompt


# -- prices -------------------------------------------------------------------------------------------------

def test_prices_and_neurons_follow_the_spec():
    p20 = PRICES["@cf/openai/gpt-oss-20b"]
    assert p20.cost(1_000_000, 0) == (0.20, 18182)
    assert p20.cost(0, 1_000_000) == (0.30, 27273)
    usd, neurons = p20.cost(1000, 500)
    assert usd == pytest.approx(0.0002 + 0.00015) and neurons == pytest.approx(18.182 + 13.6365)
    p120 = PRICES["@cf/openai/gpt-oss-120b"]
    assert p120.cost(1_000_000, 1_000_000)[0] == pytest.approx(1.10)
    # neurons are priced at $0.011 per thousand, consistently for both models
    assert p120.cost(1_000_000, 0)[1] * USD_PER_NEURON == pytest.approx(0.35)
    assert p20.cost(1_000_000, 0)[1] * USD_PER_NEURON == pytest.approx(0.20, rel=1e-4)


# -- rate limit, body cap, auth ----------------------------------------------------------------------------

def test_rate_limiter_window_per_key(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("ossrun.api.access.time.monotonic", lambda: now[0])
    limiter = RateLimiter(3)
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b")  # another token has its own budget
    now[0] += 61
    assert limiter.allow("a")
    assert all(RateLimiter(0).allow("a") for _ in range(1000))  # 0 = unlimited


def test_rate_limit_answers_3036_in_each_surface(tmp_path):
    with TestClient(build_app(FakeEngine(), AppSettings(data_dir=tmp_path, rate_limit_per_minute=2))) as c:
        codes = [c.post(RUN, json={"prompt": "hi"}).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        assert c.post(RUN, json={"prompt": "hi"}).json()["errors"][0]["code"] == 3036
        openai_style = c.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
        assert openai_style.status_code == 429 and openai_style.json()["error"]["code"] == "3036"
        assert c.get("/health").status_code == 200  # liveness is never limited


def test_the_document_lists_the_rate_limit_only_where_it_counts(tmp_path):
    """Hunt round 18 C-F3: POST /v1/responses/input_tokens (and a cancel) is rate limited, but its operation listed no
    429. Every POST now lists it when --rate-limit is on, none when it is off, and without a token no scheme is stated."""
    count, cancel = ("/v1/responses/input_tokens", "post"), ("/v1/responses/{response_id}/cancel", "post")
    for per_minute in (0, 2):
        with TestClient(build_app(FakeEngine(), AppSettings(data_dir=tmp_path / str(per_minute), rate_limit_per_minute=per_minute))) as c:
            document = c.get("/openapi.json").json()
            listed = lambda path, method: "429" in document["paths"][path][method]["responses"]
            assert listed(*count) == listed(*cancel) == bool(per_minute) and not listed("/v1/models", "get")
            assert "securitySchemes" not in document["components"] and "security" not in document
            codes = [c.post(count[0], json={"input": "hi"}).status_code for _ in range(3)]
            assert codes == ([200, 200, 429] if per_minute else [200] * 3)


def chunks(total: int, size: int = 1024 * 1024):
    yield b'{"prompt": "'
    sent = 0
    while sent < total:
        yield b"x" * min(size, total - sent)
        sent += size
    yield b'"}'


def test_body_cap_counts_chunked_bodies_too(client):
    response = client.post(RUN, content=chunks(MAX_BODY_BYTES + 10), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["errors"][0]["code"] == 3006
    response = client.post("/v1/completions", content=chunks(MAX_BODY_BYTES + 10), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "3006"
    declared = client.post(RUN, content=b"{" + b" " * MAX_BODY_BYTES + b"}", headers={"Content-Type": "application/json"})
    assert declared.status_code == 413


def _decode(coding: str, data: bytes, limit: int = 10**6, size: int = 1) -> bytes:
    """`data` fed to the decoder `size` bytes at a time, as a chunked body arrives."""
    from ossrun.api.body import decoder

    d = decoder(coding, limit)
    pieces = [data[at:at + size] for at in range(0, len(data), size)] or [b""]
    return b"".join(b"".join(d.pieces(piece, final=i == len(pieces) - 1)) for i, piece in enumerate(pieces))


def test_content_codings_decode_in_any_chunking():
    import gzip
    import zlib

    raw = json.dumps({"prompt": "hi " * 500}).encode()
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    for size in (1, 7, 10**6):
        assert _decode("gzip", gzip.compress(raw), size=size) == raw
        assert _decode(" GZip", gzip.compress(raw) + gzip.compress(raw), size=size) == raw * 2  # two members (RFC 1952)
        assert _decode("deflate", zlib.compress(raw), size=size) == raw  # the zlib format (RFC 9110)
    assert _decode("deflate", raw_deflate.compress(raw) + raw_deflate.flush(), size=3) == raw  # raw deflate, as some clients send
    assert _decode("gzip", b"") == b""  # an empty body stays empty (and is then not JSON, as without the coding)


def test_decoding_is_bounded_by_the_cap():
    import gzip

    from ossrun.api import body

    bomb = gzip.compress(b"\0" * 50_000_000)  # 50 MB in 50 kB
    decoder, handed_on = body.decoder("gzip", 1_000_000), 0
    with pytest.raises(ApiError) as refused:
        for at in range(0, len(bomb), 4096):
            handed_on += sum(map(len, decoder.pieces(bomb[at:at + 4096], final=at + 4096 >= len(bomb))))
    # never inflated past the cap (one byte over is how it knows), never handed on past it
    assert refused.value.status == 413 and decoder.decoded == 1_000_001 and handed_on <= 1_000_000
    assert _decode("gzip", gzip.compress(b"x" * 1000), limit=1000) == b"x" * 1000  # exactly the cap is fine


def test_a_chunk_is_decoded_in_bounded_pieces():
    """A small compressed chunk inflates a thousandfold: its decoded bytes come out a piece at a time, each at most
    DECODED_PIECE, never the whole chunk's (hunt_security #5: a 250 kB gzip once came out as one 250 MB `bytes`)."""
    import gzip

    from ossrun.api import body

    size = 100 * 2**20
    bomb = gzip.compress(bytes(size))  # 100 MB in 100 kB: one network chunk
    decoder = body.decoder("gzip", 300 * 2**20)
    sizes = [len(piece) for piece in decoder.pieces(bomb, final=True)]
    assert max(sizes) <= body.DECODED_PIECE and sum(sizes) == size == decoder.decoded


@pytest.mark.parametrize("coding", ["br", "zstd", "gzip, deflate", "unknown"])
def test_other_codings_are_415_with_accept_encoding(client, coding):
    import gzip

    for path, body in ((RUN, {"prompt": "hi"}), ("/v1/completions", {"model": MODEL, "prompt": "hi"})):
        response = client.post(path, content=gzip.compress(json.dumps(body).encode()), headers={"Content-Encoding": coding})
        assert response.status_code == 415 and coding in response.text and response.headers["accept-encoding"] == "gzip, deflate"
    assert client.post(RUN, json={"prompt": "hi"}, headers={"Content-Encoding": "identity"}).status_code == 200


def test_gzipped_adapter_uploads_are_decoded(client):
    import gzip

    import httpx

    base = "/client/v4/accounts/a/ai/finetunes"
    assert client.post(base, json={"model": MODEL, "name": "zipped"}).status_code == 200
    form = httpx.Request("POST", "http://x", data={"file_name": "adapter_config.json"}, files={"file": ("a.json", b"{}")})
    form.read()
    upload = client.post(f"{base}/zipped/finetune-assets", content=gzip.compress(form.content),
                         headers={"Content-Type": form.headers["content-type"], "Content-Encoding": "gzip"})
    assert upload.status_code == 200, upload.text


def test_frames_escape_the_line_breaks_splitlines_knows():
    from ossrun.api.surfaces.frames import frame

    data = {"response": "a\u2028b\u2029c\x85d\ne\x0bf\x1cg", "names": ["\u2028"]}
    for event in (None, "response.output_text.delta"):
        raw = frame(data, event)
        lines = [line for line in raw.decode().splitlines() if line]
        assert lines == ([f"event: {event}"] if event else []) + [lines[-1]]  # one data line, whoever splits it
        assert lines[-1].startswith("data: ") and json.loads(lines[-1][len("data: "):]) == data
        assert "\u2028" not in raw.decode() and raw.endswith(b"\n\n")


def test_auth_on_every_route_but_liveness(tmp_path):
    with TestClient(build_app(FakeEngine(), AppSettings(data_dir=tmp_path, api_token="t0k"))) as c:
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
        for method, path in [("post", RUN), ("get", "/client/v4/accounts/a/ai/models/search"), ("get", "/v1/models"),
                             ("post", "/v1/chat/completions"), ("get", "/client/v4/accounts/a/ai/finetunes")]:
            response = getattr(c, method)(path, headers={"Authorization": "Bearer nope"})
            if path.startswith("/v1/"):  # OpenAI's own answer on its bare surface
                assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key", path
                continue
            assert response.status_code == 403, path
            if is_openai_path(path):
                assert response.json()["error"]["type"] == "authentication_error"
            else:
                assert response.json()["errors"] == [{"code": 10000, "message": "Authentication error"}]
        ok = c.post(RUN, json={"prompt": "hi"}, headers={"Authorization": "Bearer t0k"})
        assert ok.status_code == 200 and ok.json()["success"] is True


# -- envelopes ------------------------------------------------------------------------------------------

def test_error_envelopes_per_surface(client):
    bad = client.post(RUN, content=b"{not json", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400
    assert bad.json() == {"result": {}, "success": False, "errors": [{"code": 5006, "message": bad.json()["errors"][0]["message"]}],
                          "messages": []}
    unknown = client.post("/v1/chat/completions", json={"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]})
    error = unknown.json()["error"]
    assert unknown.status_code == 400 and error["code"] == "5007" and error["type"] == "invalid_request_error"
    assert error["message"] == "No such model gpt-4 or task"
    missing_query = client.get("/client/v4/accounts/a/ai/models/schema")
    assert missing_query.status_code == 400 and missing_query.json()["errors"][0]["code"] == 5006


def test_models_routes(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL
    found = client.get("/client/v4/accounts/a/ai/models/search").json()
    assert found["success"] and found["result"][0]["task"]["id"] == "text-generation"
    schema = client.get("/client/v4/accounts/a/ai/models/schema", params={"model": MODEL}).json()["result"]
    assert len(schema["input"]["oneOf"]) >= 3 and json.dumps(schema["output"])


def test_reject_if_busy(tmp_path):
    engine = FakeEngine()
    engine.max_num_seqs = 1
    with TestClient(build_app(engine, AppSettings(data_dir=tmp_path, rate_limit_per_minute=0))) as c:
        assert c.post(RUN, json={"prompt": "hi", "options": {"rejectIfBusy": True}}).status_code == 200  # idle
        engine.running.add("someone-else")
        busy = c.post(RUN, json={"prompt": "hi", "options": {"rejectIfBusy": True}})
        assert busy.status_code == 429 and busy.json()["errors"] == [
            {"code": 3040, "message": "Capacity temporarily exceeded, please try again."}]
        assert c.post(RUN, json={"prompt": "hi"}).status_code == 200  # without the option it queues


def test_garbage_adapter_upload_is_5005_not_500(tmp_path):
    import torch

    from ossrun.engine.lora import AdapterRegistry
    from ossrun.model.config import PRESETS

    engine = FakeEngine()
    engine.adapters = AdapterRegistry(PRESETS["tiny"], torch.float32, torch.device("cpu"))
    base = "/client/v4/accounts/a/ai/finetunes"
    with TestClient(build_app(engine, AppSettings(data_dir=tmp_path, rate_limit_per_minute=0))) as c:
        assert c.post(base, json={"model": MODEL, "name": "junk"}).status_code == 200
        png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
        first = c.post(f"{base}/junk/finetune-assets", data={"file_name": "adapter_config.json"}, files={"file": ("a.png", png)})
        assert first.status_code == 400 and first.json()["errors"][0]["code"] == 5005  # not JSON: refused at once
        config = c.post(f"{base}/junk/finetune-assets", data={"file_name": "adapter_config.json"}, files={"file": ("a.json", b"{}")})
        assert config.status_code == 200  # a JSON object alone is not loaded yet
        second = c.post(f"{base}/junk/finetune-assets", data={"file_name": "adapter_model.safetensors"}, files={"file": ("b.png", png)})
        assert second.status_code == 400 and second.json()["errors"][0]["code"] == 5005
        # the refused upload stored nothing: the fine-tune still misses its weights (3039, the hosted "missing files")
        assert c.post(RUN, json={"prompt": "hi", "lora": "junk"}).json()["errors"][0]["code"] == 3039


def test_rate_limiter_key_table_is_bounded():
    limiter = RateLimiter(2, max_keys=100)
    for i in range(1000):
        assert limiter.allow(f"key-{i}")
    assert len(limiter) == 100
    assert limiter.allow("key-999") and not limiter.allow("key-999")  # a recent key keeps its hits
    assert limiter.retry_after("key-999") >= 1


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "function"}},
    {"messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "function", "function": {}}},
    {"messages": [{"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {"name": ""}}]}]},
])
def test_schema_refuses_what_the_server_cannot_serve(client, body):
    """Named choices without a name and nameless tool calls are schema violations, not schema-valid 400s."""
    from ossrun.api.schemas import MessagesInput

    with pytest.raises(Exception):
        MessagesInput.model_validate(body)
    assert client.post(RUN, json=body).status_code == 400


# -- logit_bias -------------------------------------------------------------------------------------

def test_logit_bias_reaches_the_engine_from_both_openai_routes_only(tmp_path):
    engine = FakeEngine()
    with TestClient(build_app(engine, AppSettings(data_dir=tmp_path, rate_limit_per_minute=0))) as c:
        bias = {"976": -100, "13": 2.5, "201087": 100}
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logit_bias": bias, "n": 2}
        assert c.post("/v1/chat/completions", json=chat).status_code == 200
        assert c.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "logit_bias": bias}).status_code == 200
        # Workers AI's schema has no logit_bias: an unknown field there, ignored like any other.
        assert c.post(RUN, json={"messages": [{"role": "user", "content": "hi"}], "logit_bias": bias}).status_code == 200
    expected = ((976, -100.0), (13, 2.5), (201087, 100.0))
    assert [r.params.logit_bias for r in engine.requests] == [expected, expected, expected, ()]  # n = 2: both choices


@pytest.mark.parametrize("bias, fragment", [
    ({"201088": 1}, "at '/logit_bias/201088': token id 201088 is outside the vocabulary (0..201087)"),
    ({"5": 100.5}, "at '/logit_bias/5'"),
    ({"5": -101}, "at '/logit_bias/5'"),
    ({"5": "1"}, "at '/logit_bias/5'"),
    ({"5": True}, "at '/logit_bias/5'"),
    ({"-1": 1}, "at '/logit_bias/-1'"),
    ({"the": 1}, "at '/logit_bias/the'"),
    ({str(i): 1 for i in range(301)}, "at '/logit_bias'"),
    ([1], "at '/logit_bias'"),
])
def test_bad_logit_bias_is_a_400_naming_the_field(client, bias, fragment):
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}), ("/v1/completions", {"prompt": "hi"})):
        response = client.post(path, json={"model": MODEL, **body, "logit_bias": bias})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "5006" and fragment in error["message"], error


# -- legacy functions / function_call --------------------------------------------------------------

CALL = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>'
FUNCTION = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def test_functions_are_answered_as_function_call_on_v1_only(tmp_path):
    engine = FakeEngine(CALL)
    body = {"messages": [{"role": "user", "content": "weather?"}], "functions": [FUNCTION]}
    with TestClient(build_app(engine, AppSettings(data_dir=tmp_path, rate_limit_per_minute=0))) as c:
        choice = c.post("/v1/chat/completions", json={"model": MODEL, **body}).json()["choices"][0]
        assert choice["finish_reason"] == "function_call" and choice["message"]["tool_calls"] == []
        assert choice["message"]["function_call"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
        stream = c.post("/v1/chat/completions", json={"model": MODEL, **body, "stream": True}).text
        chunks = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: {")]
        deltas = [ch["choices"][0]["delta"] for ch in chunks]
        assert [d["function_call"] for d in deltas if "function_call" in d][0] == {"name": "get_weather", "arguments": ""}
        assert "".join(d["function_call"]["arguments"] for d in deltas if "function_call" in d) == '{"city":"Paris"}'
        assert not any("tool_calls" in d for d in deltas) and chunks[-1]["choices"][0]["finish_reason"] == "function_call"
        # Workers AI lists `functions` but answers the Messages shape with tool_calls (spec §3), and has no `function_call`.
        result = c.post(RUN, json={**body, "function_call": "none"}).json()["result"]["choices"][0]
        assert result["finish_reason"] == "tool_calls" and result["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
        assert "function_call" not in result["message"]


@pytest.mark.parametrize("extra, mode, named", [
    ({"function_call": "none"}, "none", None),
    ({"function_call": "auto"}, "auto", None),
    ({"function_call": {"name": "get_weather"}}, "auto", "get_weather"),
    ({"function_call": {"name": "get_weather"}, "tool_choice": "none"}, "none", None),  # tool_choice wins, as on OpenAI
    ({"tool_choice": "required"}, "required", None),
])
def test_function_call_maps_to_tool_choice(extra, mode, named):
    from ossrun.api import ask

    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "functions": [FUNCTION], **extra}
    made = ask.from_messages(schemas.parse(schemas.ChatCompletionRequest, body))
    assert (made.tool_choice, made.named_tool, made.legacy_functions) == (mode, named, True)
    assert len(made.tools) == 1  # "none" too: shown to the model (hunt round 14 A-F4), the grammar refuses a call


@pytest.mark.parametrize("bad", ["required", {"name": ""}, {"nam": "x"}, 3])
def test_bad_function_call_is_a_400_naming_it(client, bad):
    response = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                         "functions": [FUNCTION], "function_call": bad})
    assert response.status_code == 400 and "function_call" in response.json()["error"]["message"]


@pytest.mark.parametrize(("fields", "param"), [
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": ""}, "stop"),
    ({"stop": 5}, "stop"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "bogus", "content": "x"}]}, "messages[0].role"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name"),
    ({"tool_choice": 5}, "tool_choice"),
    ({"response_format": {"type": "x"}}, "response_format.type"),
    ({"model": 5}, "model"),
])
def test_the_param_and_pointer_name_the_field_not_pydantic_labels(client, fields, param):
    """A union member's label (`constrained-str` for a non-empty string, `WrappedTool`) is pydantic's, not a field:
    a bad `stop` was param 'stop.constrained-str' and pointer '/stop/constrained-str'."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    pointer = "/" + param.replace("[", "/").replace("]", "").replace(".", "/")
    assert error["param"] == param and f"at '{pointer}'" in error["message"], error
    assert "constrained" not in error["message"] and "WrappedTool" not in error["message"]


# -- stored responses ------------------------------------------------------------------------------------

def test_input_items_of_a_response_stored_without_item_ids(tmp_path):
    """A response stored before items had ids (an older server's row) still lists its input, each item with an
    id derived from the response and its place (the same on every call), content as OpenAI's parts."""
    from ossrun.api.conversations import ResponseStore

    store = ResponseStore(tmp_path / "batch.sqlite")
    replay = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}, {"role": "assistant", "content": "Hello"},
              {"role": "user", "content": "Again"}]
    response = {"id": "resp_old", "output": [{"type": "message", "id": "msg_out", "content": [{"type": "output_text", "text": "Hello"}]}]}
    store._db.execute("INSERT INTO responses (id, created_at, replay, response) VALUES (?, strftime('%s','now'), ?, ?)",
                      ("resp_old", json.dumps(replay + [{"role": "assistant", "content": "Hello"}]), json.dumps(response)))
    items = store.input_items("resp_old")
    assert items == store.input_items("resp_old") and len({item["id"] for item in items}) == 3
    assert all(item["id"].startswith("msg_") and item["type"] == "message" and item["status"] == "completed" for item in items)
    assert [item["content"] for item in items] == [[{"type": "input_text", "text": "Hi"}],
                                                   [{"type": "output_text", "text": "Hello", "annotations": []}],
                                                   [{"type": "input_text", "text": "Again"}]]
    assert store.delete("resp_old") and store.input_items("resp_old") is None and not store.delete("resp_old")


def test_input_items_ids_are_unique_so_paging_ends(tmp_path):
    """The same item sent twice (with its id) is listed with two ids: `after` names one place."""
    from ossrun.api.conversations import ResponseStore
    from ossrun.api.openai_routes import cursor_page
    from ossrun.harmony.shapes import InputMessage

    store = ResponseStore(tmp_path / "batch.sqlite")
    twice = InputMessage.model_validate({"role": "user", "content": "Hi", "id": "msg_same"})
    store.remember("resp_1", [twice, InputMessage(role="user", content="x"), twice], True, {"id": "resp_1", "output": []})
    items = store.input_items("resp_1")
    assert items[0]["id"] == "msg_same" and len({item["id"] for item in items}) == 3
    pages, after = [], None
    while True:
        page = cursor_page(items, 1, after)
        pages += page["data"]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert pages == items


def test_item_references_find_the_items_of_a_file_from_before_they_were_indexed(tmp_path):
    """A data directory written by an older version has responses but no `response_items`: opening it indexes their
    items once, so an `item_reference` to an item of a conversation held across the upgrade is found (an item stored
    without an id by the id `input_items` lists it with); a deleted response's items go with it."""
    import sqlite3

    from ossrun.api.conversations import ResponseStore
    from ossrun.api.schemas import ResponsesRequest
    from ossrun.harmony.shapes import InputMessage, ReasoningInput

    path = tmp_path / "batch.sqlite"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE responses (id TEXT PRIMARY KEY, created_at REAL NOT NULL, replay TEXT NOT NULL, response TEXT NOT NULL)")
    output = [{"type": "reasoning", "id": "rs_out", "content": [{"type": "reasoning_text", "text": "Greet."}]},
              {"type": "message", "id": "msg_out", "content": [{"type": "output_text", "text": "Hello"}]}]
    replay = [{"role": "user", "content": "Hi"}, {"type": "reasoning", "id": "rs_out", "content": [{"text": "Greet."}]},
              {"role": "assistant", "id": "msg_out", "content": "Hello"}]
    old.execute("INSERT INTO responses VALUES ('resp_old', strftime('%s','now'), ?, ?)",
                (json.dumps(replay), json.dumps({"id": "resp_old", "output": output})))
    old.commit()
    old.close()
    store = ResponseStore(path)
    (listed,) = store.input_items("resp_old")
    references = [{"type": "item_reference", "id": item_id} for item_id in (listed["id"], "rs_out", "msg_out")]
    request = store.expand(ResponsesRequest.model_validate({"model": "m", "input": references}))
    assert [type(item) for item in request.input] == [InputMessage, ReasoningInput, InputMessage]
    assert [item.content for item in request.input[::2]] == ["Hi", "Hello"] and request.input[1].text == "Greet."
    assert request.input[2].role == "assistant" and request.input[2].model_extra["id"] == "msg_out"
    rows = "SELECT count(*) FROM response_items"
    assert store._db.execute(rows).fetchone() == ResponseStore(path)._db.execute(rows).fetchone() == (3,)  # indexed once
    assert store.delete("resp_old")
    with pytest.raises(ApiError, match="Item with id 'msg_out' not found"):
        store.expand(ResponsesRequest.model_validate({"model": "m", "input": references[2:]}))


FINETUNES = "/client/v4/accounts/a/ai/finetunes"


def _upload(c, id_or_name: str, file_name: str, data: bytes):
    return c.post(f"{FINETUNES}/{id_or_name}/finetune-assets", data={"file_name": file_name}, files={"file": (file_name, data)})


def test_a_finetune_may_not_take_a_preloaded_adapters_name(tmp_path):
    """`--lora pre=DIR` serves "pre": a fine-tune named so answered 200, and its uploads replaced that adapter."""
    preloaded = tmp_path / "pre"
    preloaded.mkdir()
    with TestClient(build_app(FakeEngine(), AppSettings(data_dir=tmp_path / "data", rate_limit_per_minute=0,
                                                        loras={"pre": preloaded}))) as c:
        taken = c.post(FINETUNES, json={"model": MODEL, "name": "pre"})
        assert taken.status_code == 400 and "--lora" in taken.json()["errors"][0]["message"]
        assert c.get(FINETUNES).json()["result"] == []


def test_a_finetune_id_matches_in_any_case(client):
    """An id in upper case was "no fine-tune", though names shaped like ids are refused in any case (UUIDs are)."""
    finetune_id = client.post(FINETUNES, json={"model": MODEL, "name": "mine"}).json()["result"]["id"]
    for file_name in ("adapter_config.json", "adapter_model.safetensors"):
        stored = _upload(client, finetune_id.upper(), file_name, b"{}")
        assert stored.status_code == 200 and stored.json()["result"]["id"] == finetune_id, stored.text
    assert client.post(RUN, json={"prompt": "hi", "lora": finetune_id.upper()}).status_code == 200


def test_the_upload_route_names_its_own_size_limit(client):
    """Its cap is 300 MB; the 413 said "the body exceeds 10 MB" (the JSON routes' cap)."""
    too_big = client.post(f"{FINETUNES}/x/finetune-assets", content=b"x", headers={"Content-Length": "400000000"})
    assert too_big.status_code == 413 and "300 MB" in too_big.json()["errors"][0]["message"], too_big.text
    assert "10 MB" in client.post(RUN, content=b"x", headers={"Content-Length": "20000000"}).json()["errors"][0]["message"]


def test_an_upload_does_not_hold_the_event_loop(tmp_path):
    """Writing and loading an adapter (up to 300 MB) ran inside the async route: every other request waited for it.
    Here loading the adapter waits until `/health` has answered: on the event loop, it never could."""
    import threading

    class SlowAdapters:
        def __init__(self) -> None:
            self.loading, self.health_answered, self.names = threading.Event(), threading.Event(), set()
            self.answered_while_loading = False

        def register(self, name, path, install=None, resident=False) -> None:
            self.loading.set()
            self.answered_while_loading = self.health_answered.wait(timeout=10)
            if install is not None:
                install()
            self.names.add(name)

        def known(self, name: str) -> bool:
            return name in self.names

    engine = FakeEngine()
    engine.adapters = SlowAdapters()
    with TestClient(build_app(engine, AppSettings(data_dir=tmp_path, rate_limit_per_minute=0))) as c:
        assert c.post(FINETUNES, json={"model": MODEL, "name": "slow"}).status_code == 200
        assert _upload(c, "slow", "adapter_config.json", b"{}").status_code == 200
        result = {}
        uploading = threading.Thread(target=lambda: result.update(r=_upload(c, "slow", "adapter_model.safetensors", b"{}")))
        uploading.start()
        assert engine.adapters.loading.wait(timeout=10)
        assert c.get("/health").status_code == 200
        engine.adapters.health_answered.set()
        uploading.join(timeout=30)
        assert result["r"].status_code == 200 and engine.adapters.answered_while_loading


@pytest.mark.parametrize("entry", ["http://user@localhost:3000", "http://localhost:3000#x", "http://localhost:3000?",
                                   "http://localhost:3000/app", "localhost:3000", "null", "https://a.*.example.com",
                                   "https://*example.com", "http://*:3000", "https://*", "http://localhost:0",
                                   "http://localhost:65536", "https://bücher.example"])
def test_allowed_origins_no_browser_sends_are_refused(entry):
    """hunt_edges #2: each was taken, then never equal to an `Origin` a browser sends (a 403 in the browser only)."""
    with pytest.raises(ValueError, match="--allowed-origins takes origins"):
        parse_origins(entry)


def test_allowed_origins_are_compared_as_browsers_spell_origins():
    """Case and default ports as a browser serializes them; `*.` below a name, `:*` any port, nothing else a wildcard."""
    listed = parse_origins("HTTPS://App.Example.com:443/, http://localhost:80, https://*.example.org, http://127.0.0.1:*")
    assert listed == ("https://app.example.com", "http://localhost", "https://*.example.org", "http://127.0.0.1:*")
    policy = BrowserPolicy(listed)
    for origin in ("https://app.example.com", "http://localhost", "https://a.b.example.org", "http://127.0.0.1",
                   "http://127.0.0.1:5173"):
        assert policy.listed(origin), origin
    for origin in ("http://app.example.com", "https://example.org", "https://evilexample.org", "http://localhost:3000",
                   "https://127.0.0.1:5173", "null"):
        assert not policy.listed(origin), origin
    assert policy.same_origin("https://llm.example.com", "llm.example.com:443")  # a default port in Host
    assert not policy.same_origin("http://llm.example.com", "llm.example.com:443")


def test_forwarded_for_names_the_rightmost_untrusted_hop():
    """hunt_edges #4: entries left of the nearest untrusted one are the client's own writing; with `*` the rightmost."""
    named = TrustedProxies("127.0.0.1, 10.0.0.0/8")
    assert named.client("198.51.100.1, 127.0.0.1") == "198.51.100.1"
    assert named.client("9.9.9.9, 1.1.1.1, 10.2.3.4") == "1.1.1.1"
    assert named.client("[2001:db8::1]:4711, 1.2.3.4:55") == "1.2.3.4" and named.client(" ") is None
    assert named.trusts("::ffff:10.0.0.1") and not named.trusts("11.0.0.1")
    assert TrustedProxies("*").client("made.up.by.client, 203.0.113.7") == "203.0.113.7"
    assert not TrustedProxies(None) and not TrustedProxies(None).trusts("127.0.0.1")


def test_forwarded_allow_ips_in_the_mapped_form_match_ipv4_peers():
    """hunt_proxy #1: `::ffff:127.0.0.1` (the form a `--host ::` server logs an IPv4 proxy in) and `::ffff:0:0/96` were
    taken and never matched: the peer was read as IPv4, the entries stayed IPv6."""
    for entry, peer in (("::ffff:127.0.0.1", "127.0.0.1"), ("::ffff:127.0.0.1", "::ffff:127.0.0.1"),
                        ("::ffff:0:0/96", "10.1.2.3"), ("::ffff:10.0.0.0/104", "10.9.9.9")):
        proxies = TrustedProxies(entry)
        assert proxies.trusts(peer), (entry, peer)
        assert proxies.client(f"198.51.100.7, {peer}") == "198.51.100.7", (entry, peer)
    assert not TrustedProxies("::ffff:0:0/96").trusts("::1") and not TrustedProxies("::ffff:10.0.0.0/104").trusts("11.0.0.1")


def test_forwarded_for_believes_only_ip_addresses():
    """hunt_proxy #2: any text of the deciding entry became the client (the log line's field, the rate-limit key), a
    client-forged log field included. An entry that is no address names nobody: the peer stays the client."""
    named, anyone = TrustedProxies("127.0.0.1"), TrustedProxies("*")
    for forged in ("203.0.113.9 x-request-id='forged'\t\xff", "not an ip", "5.5.5.5\t6.6.6.6", "éÿ", "unknown",
                   "1.2.3.4:x", "[2001:db8::1]x", "fe80::1%eth0\t", "9.9.9.9, junk"):
        assert named.client(forged) is None and anyone.client(forged) is None, forged
    assert named.client("junk, 198.51.100.1, 127.0.0.1") == "198.51.100.1"  # left of the deciding entry: not read
    assert named.client("[2001:DB8:0::1]:4711") == "2001:db8::1" and anyone.client("::ffff:1.2.3.4") == "1.2.3.4"


def test_each_route_names_the_client_to_the_engine_by_its_address(tmp_path):
    """Hunt round 15 B-F2: the engine shares itself between clients, so each generating route passes the client's
    address (a trusted proxy's `X-Forwarded-For`, as the rate limit reads it) with every submission, `n` choices and
    background runs included."""
    engine = FakeEngine()
    settings = AppSettings(data_dir=tmp_path, rate_limit_per_minute=0, forwarded_allow_ips="*")
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    with TestClient(build_app(engine, settings)) as c:
        for address, path, body in (("10.0.0.1", "/v1/chat/completions", {**chat, "n": 2}),
                                    ("10.0.0.2", "/v1/completions", {"model": MODEL, "prompt": "hi"}),
                                    ("10.0.0.3", "/v1/responses", {"model": MODEL, "input": "hi", "background": True}),
                                    ("10.0.0.4", RUN, {"prompt": "hi"}),
                                    ("10.0.0.5", RUN, {"prompt": "hi", "stream": True})):
            assert c.post(path, json=body, headers={"X-Forwarded-For": address}).status_code == 200, path
        assert c.post("/v1/chat/completions", json=chat).status_code == 200  # no proxy header: the peer itself
        for _ in range(100):
            if len(engine.requests) == 7:
                break
            time.sleep(0.02)  # the background run submits on its own
    clients = sorted(r.client for r in engine.requests)
    assert clients == ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "testclient"], clients


def test_the_logged_client_is_escaped():
    """hunt_proxy #2: whatever names the client, it cannot forge fields or lines of the log (`logged_path`'s escaping)."""
    from ossrun.api.request_ids import logged_client

    assert logged_client({"client": ("1.2.3.4 GET /forged 200\r\nx\xff", 0)}) == "1.2.3.4%20GET%20/forged%20200%0D%0Ax%C3%BF"
    assert logged_client({"client": ("2001:db8::1", 0)}) == "2001:db8::1" and logged_client({"client": None}) == "?"


def test_a_proxys_forwarded_host_without_port_is_compared_by_name():
    """hunt_proxy #3: nginx's `X-Forwarded-Host $host` has no port, the page's origin on a non-default port has one."""
    policy = BrowserPolicy()
    assert policy.same_origin("https://llm.example.com:8443", "llm.example.com", forwarded=True)
    assert not policy.same_origin("https://evil.example:8443", "llm.example.com", forwarded=True)
    assert not policy.same_origin("https://llm.example.com:9443", "llm.example.com:8443", forwarded=True)  # a port: exact
    assert not policy.same_origin("https://llm.example.com:8443", "llm.example.com")  # a browser's own Host: exact
    for local in ("localhost", "127.0.0.1", "app.localhost"):  # another local port is another program's page
        assert not policy.same_origin(f"http://{local}:5173", local, forwarded=True)


def test_a_background_response_left_in_progress_by_a_dead_server_is_failed_at_start(tmp_path):
    """A background response is stored `in_progress` from its start and replaced when it ends; a process killed under
    it left it `in_progress`, and pollers (`retrieve` until the status changes) would wait for ever. Opening the file
    stores it `failed`, an error saying why; a finished response is left as it was. While it runs, continuing from it
    is a 400 (its output is not there yet)."""
    from ossrun.api.conversations import ResponseStore
    from ossrun.api.schemas import ResponsesRequest

    path = tmp_path / "batch.sqlite"
    store = ResponseStore(path)
    store.remember("resp_running", "Hi", True, {"id": "resp_running", "status": "in_progress", "error": None, "output": []})
    store.remember("resp_done", "Hi", True, {"id": "resp_done", "status": "completed", "error": None, "output": []})
    with pytest.raises(ApiError, match="'resp_running' is still in progress") as caught:
        store.expand(ResponsesRequest.model_validate({"model": "m", "input": "And?", "previous_response_id": "resp_running"}))
    assert caught.value.param == "previous_response_id"
    store.close()
    reopened = ResponseStore(path)
    assert reopened.get("resp_running") == {"id": "resp_running", "status": "failed", "output": [], "error": {
        "code": "server_error", "message": "the server stopped before this background response's end was stored (it was still running, "
                                "or the data directory refused to store it)"}}
    assert reopened.get("resp_done")["status"] == "completed"


def test_ended_background_runs_are_kept_for_a_grace_period_and_dropped_on_delete():
    """hunt_new H1: a run's frames are kept after it ends (a resume after the end reads the live numbering), but only
    the `kept` newest, each for `grace_s`; a deleted response's run is dropped at once (hunt_new M1)."""
    import asyncio

    from ossrun.api.background import BackgroundRuns

    async def frames(n: int):
        for i in range(n):
            yield f"data: {i}\n\n".encode()

    async def scenario() -> None:
        runs = BackgroundRuns(kept=2, grace_s=60)
        for key in ("a", "b", "c"):
            runs.start(key, frames(3), on_cancel=lambda: None)
        assert all(runs.get(key) is not None for key in "abc")  # in progress
        await asyncio.gather(*(runs.get(key).task for key in "abc"))
        assert runs.get("a") is None  # only the 2 that ended last are kept
        assert [frame async for frame in runs.get("c").follow(0)] == [b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"]
        runs.drop("b")
        assert runs.get("b") is None and runs.get("c") is not None
        runs.grace_s = 0
        assert runs.get("c") is None  # past the grace period

    asyncio.run(scenario())


def test_ended_background_runs_are_kept_within_a_byte_budget():
    """Hunt round 15 B-F4. Before: ended runs were bounded by count and age only, and each full-object event repeats
    what the response echoes, so 64 runs of a 9 MB `metadata` held 1.9 GB for 15 minutes. Now the ended runs' frames
    are also bounded in bytes: past `kept_bytes` the oldest go (the stored response replays them), however few."""
    import asyncio

    from ossrun.api.background import BackgroundRuns

    async def frames(size: int):
        for _ in range(3):
            yield b"x" * size

    async def scenario() -> None:
        runs = BackgroundRuns(kept=64, grace_s=60, kept_bytes=10_000)
        for key, size in (("a", 2000), ("b", 2000), ("c", 1000)):
            runs.start(key, frames(size), on_cancel=lambda: None)
            await runs.get(key).task
        assert [runs.get(key) is not None for key in "abc"] == [False, True, True]  # 6000 + 3000 fit, 15000 did not
        runs.start("d", frames(4000), on_cancel=lambda: None)
        await runs.get("d").task
        assert [runs.get(key) is not None for key in "bcd"] == [False, False, False]  # alone over the budget: all go

    asyncio.run(scenario())


def test_an_ended_background_run_goes_after_its_grace_period_on_an_idle_server():
    """Hunt round 16 C-F1. Before: the ended runs were pruned only when a background run started, ended or was looked
    up, so on a server that saw no other background request they kept their frames (up to 256 MiB) for good."""
    import asyncio

    from ossrun.api.background import BackgroundRuns

    async def frames():
        for _ in range(3):
            yield b"x" * 1000

    async def scenario() -> None:
        runs = BackgroundRuns(kept=64, grace_s=0.2)
        for key in "ab":
            runs.start(key, frames(), on_cancel=lambda: None)
            await runs._runs[key].task
        assert len(runs._ended) == 2
        await asyncio.sleep(0.5)  # nothing touches `runs` meanwhile
        assert not runs._ended, "the ended runs outlived their grace period"

    asyncio.run(scenario())


def test_a_failed_response_is_no_conversation_to_continue_but_a_cancelled_or_cut_one_is(tmp_path):
    """hunt_new L2: only a background response is stored `failed`; naming it is the 400 an unstored (non-background)
    failure gets, saying it failed. `cancelled` and `incomplete` ones are continued, as on OpenAI."""
    from ossrun.api.conversations import ResponseStore
    from ossrun.api.schemas import ResponsesRequest

    store = ResponseStore(tmp_path / "batch.sqlite")
    for status in ("failed", "cancelled", "incomplete"):
        store.remember(f"resp_{status}", "Hi", True, {"id": f"resp_{status}", "status": status, "error": None, "output": []})
    ask = {"model": "m", "input": "And?"}
    with pytest.raises(ApiError, match="'resp_failed' failed; a failed response is no conversation") as caught:
        store.expand(ResponsesRequest.model_validate({**ask, "previous_response_id": "resp_failed"}))
    assert (caught.value.status, caught.value.param) == (400, "previous_response_id")
    for status in ("cancelled", "incomplete"):
        continued = store.expand(ResponsesRequest.model_validate({**ask, "previous_response_id": f"resp_{status}"}))
        assert len(continued.input) == 2
    store.close()


def test_item_references_are_refused_when_repeated_before_any_lookup_and_bounded_in_what_they_read(tmp_path):
    """Hunt round 17 A-F9: every reference was looked up and parsed before the duplicate check, so 30,000 references
    to one stored 40 KB item took 57 s and 1.1 GB (on the event loop) to be refused as duplicates, and distinct
    references could read without bound. Now a repeated id is the duplicate 400 before any lookup (an unknown id twice
    too), each id is read once, and the items read may take `referenced_chars` at most, a 400 naming the reference
    that passes it before it is parsed."""
    from ossrun.api.conversations import REFERENCED_CHARS, ResponseStore
    from ossrun.api.schemas import ResponsesRequest
    from ossrun.harmony.shapes import InputMessage

    assert REFERENCED_CHARS == 10 * 1024 * 1024  # the body cap: references read no more than a body could send inline
    store = ResponseStore(tmp_path / "batch.sqlite", referenced_chars=4000)
    for n in range(3):
        store.remember(f"resp_{n}", [InputMessage.model_validate({"role": "user", "content": str(n) * 1500, "id": f"msg_{n}"})],
                       True, {"id": f"resp_{n}", "output": []})
    lookups: list[str] = []
    store._reader.set_trace_callback(lookups.append)
    request = lambda *ids: ResponsesRequest.model_validate({"model": "m", "input": [{"type": "item_reference", "id": i} for i in ids]})
    for ids, index in ((("msg_0", "msg_1", "msg_0"), 2), (("msg_gone", "msg_gone"), 1)):
        with pytest.raises(ApiError, match=f"at '/input/{index}/id': Duplicate item found with id {ids[0]}") as refused:
            store.expand(request(*ids))
        assert refused.value.param == f"input[{index}].id" and lookups == []
    assert [item.content for item in store.expand(request("msg_0", "msg_1")).input] == ["0" * 1500, "1" * 1500]
    assert len(lookups) == 2  # one query a reference
    with pytest.raises(ApiError, match="at '/input/2/id': the items referenced take more than the 4000 characters") as refused:
        store.expand(request("msg_0", "msg_1", "msg_2"))
    assert refused.value.param == "input[2].id" and refused.value.status == 400
    store.close()


def test_stored_responses_are_bounded_in_bytes(tmp_path):
    """Hunt round 15 B-F3: the store was bounded by count (10,000) and age only, so responses of large inputs filled
    the data directory (9 MB each). The newest within `capacity_bytes` are kept, the oldest dropped first; a file of
    an older version (no `size` column) gets its rows measured once when opened."""
    import sqlite3

    from ossrun.api.conversations import ResponseStore
    from ossrun.harmony.shapes import InputMessage

    path = tmp_path / "batch.sqlite"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE responses (id TEXT PRIMARY KEY, created_at REAL NOT NULL, replay TEXT NOT NULL, response TEXT NOT NULL)")
    old.execute("INSERT INTO responses VALUES ('resp_old', 1, ?, '{\"id\": \"resp_old\", \"output\": []}')",
                (json.dumps([{"role": "user", "id": "msg_old", "content": "é" * 1000}], ensure_ascii=False),))
    old.commit()
    old.close()
    store = ResponseStore(path, retention_s=float("inf"), capacity_bytes=5000)
    (size,) = store._db.execute("SELECT size FROM responses WHERE id = 'resp_old'").fetchone()
    assert 2000 < size < 2100  # bytes, not characters
    for n in range(4):
        store.remember(f"resp_{n}", [InputMessage(role="user", content=str(n) * 1500)], True, {"id": f"resp_{n}", "output": []})
    kept = [row[0] for row in store._db.execute("SELECT id FROM responses ORDER BY created_at")]
    assert kept == ["resp_1", "resp_2", "resp_3"], kept
    assert store.get("resp_old") is None and store.input_items("resp_0") is None and store.get("resp_3")["id"] == "resp_3"
    assert store._db.execute("SELECT count(*) FROM response_items WHERE response_id = 'resp_0'").fetchone() == (0,)


def test_a_full_batch_queue_refuses_new_batches_until_results_are_polled(client):
    """Hunt round 17 A-F5: the queue had no byte bound. Past it (`SQLiteBatchStore.capacity_bytes`, 2 GiB) a new batch is
    a 503 (3040) saying the queue is full, nothing queued; a finished batch's results, once polled, make room."""
    store = client.app.state.service.batch_store
    queue = lambda: client.post(RUN, json={"requests": [{"prompt": "hi" * 200, "max_tokens": 2}]})
    first = queue()
    assert first.status_code == 200, first.text
    store.capacity_bytes = store._db.execute("SELECT SUM(size) FROM batches").fetchone()[0] + 100
    full = queue()
    assert full.status_code == 503 and full.json()["errors"][0]["code"] == 3040, full.text
    assert "the batch queue is full" in full.json()["errors"][0]["message"]
    request_id = first.json()["result"]["request_id"]
    for _ in range(500):
        polled = client.post(RUN, json={"request_id": request_id}).json()["result"]
        if polled["status"] == "done":
            break
        time.sleep(0.02)
    assert polled["status"] == "done" and store.get(request_id).collected
    assert queue().status_code == 200 and store.get(request_id) is None  # the collected batch made room


def test_model_json_reads_numbers_as_the_hosted_runtime_writes_them():
    """Hunt round 19 B-F1: a number beyond a double's range became Python's inf, which no JSON answer can carry (a 500).
    JavaScript reads it as Infinity and writes null; text that is not JSON (or nests past Python's parser) stays text."""
    from ossrun.api.results import model_json
    assert model_json('{"x": 935E100151070, "y": [-1e400, 1.5, 12345678901234567890123, 1' + "0" * 400 + "]}") == \
        {"x": None, "y": [None, 1.5, 12345678901234567890123, None]}
    for text in ('{"x": NaN}', '[Infinity]', '{"x": 1', "[" * 100_000 + "]" * 100_000):
        assert model_json(text) == text


def test_a_batch_poll_does_not_hold_the_event_loop(client):
    """Hunt round 20 C-F3: a poll read the batch (every item's stored body and result: ~65 ms for 1000 items) and built
    its answer inside the async route, so each poll stalled every stream and /health. Here the read waits until
    `/health` has answered: on the event loop, it never could."""
    import threading

    store = client.app.state.service.batch_store
    request_id = client.post(RUN, json={"requests": [{"prompt": "hi", "max_tokens": 2}]}).json()["result"]["request_id"]
    for _ in range(500):
        if client.post(RUN, json={"request_id": request_id}).json()["result"]["status"] == "done":
            break
        time.sleep(0.02)
    reading, health_answered, seen = threading.Event(), threading.Event(), {}
    read = store.get

    def slow_get(batch_id: str):
        reading.set()
        seen["answered_while_reading"] = health_answered.wait(timeout=10)
        return read(batch_id)

    store.get = slow_get
    polling = threading.Thread(target=lambda: seen.update(polled=client.post(RUN, json={"request_id": request_id})))
    polling.start()
    assert reading.wait(timeout=10)
    assert client.get("/health").status_code == 200
    health_answered.set()
    polling.join(timeout=30)
    assert seen["answered_while_reading"] and seen["polled"].json()["result"]["status"] == "done"
