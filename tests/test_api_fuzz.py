"""Fuzz the app from its own OpenAPI document, in process on the scripted engine.

`test_fuzz.py` fuzzes the real server; here the engine answers with reasoning, text, tool calls or
malformed harmony (which the trained demo model never writes, hence the script), so the documented result schemas are checked against every shape of answer, and
schema-violating bodies (negative mode) must be refused with a 4xx in the surface's error shape.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from jsonschema import Draft202012Validator  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.core.parameters import ParameterLocation  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from ossrun.api.app import AppSettings, build_app  # noqa: E402
from tests.api_fakes import FakeEngine  # noqa: E402

SCRIPTS = [
    "<|channel|>analysis<|message|>Hmm.<|end|><|start|>assistant<|channel|>final<|message|>Hello<|return|>",
    "<|channel|>commentary to=functions.f <|constrain|>json<|message|>{\"a\":1}<|call|>",
    "<|channel|>final<|message|>cut off mid",
    "<|message|><|start|>garbage<|end|><|call|>",
]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def refuses_truly_invalid_bodies(ctx, response, case):
    """`negative_data_rejection`, for a body that the document really refuses. Schemathesis negates one branch of an
    `anyOf`/`oneOf` without asking the others, so its "negative" body can be valid: CI once sent a message whose `name`
    became null (`string | null` allows it) and a part whose `type` left TextPart's enum, which RefusalPart, the other
    branch, accepts; the server rightly answered 200. Other negated places (query, path, headers) keep the check."""
    meta = case.meta
    only_body = meta is not None and all(location == ParameterLocation.BODY or not component.mode.is_negative
                                         for location, component in meta.components.items())
    if only_body and case.media_type == "application/json" and _document_accepts(case):
        return None
    return negative_data_rejection(ctx, response, case)


def _document_accepts(case) -> bool:
    """Whether the app's own OpenAPI document (JSON Schema 2020-12 in OpenAPI 3.1) accepts the case's body."""
    document = case.operation.schema.raw_schema
    body = document["paths"][case.operation.path][case.operation.method.lower()]["requestBody"]["content"]["application/json"]
    schema = {**body["schema"], "components": document["components"]}
    return Draft202012Validator(schema).is_valid(case.body)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    engine = FakeEngine(max_model_len=2048)
    app = build_app(engine, AppSettings(data_dir=tmp_path_factory.mktemp("fuzz-data"), rate_limit_per_minute=0))
    return engine, app, schemathesis.openapi.from_asgi("/openapi.json", app)


def run_operations(fuzzed, mode: GenerationMode, checks, max_examples: int) -> list[str]:
    engine, _, schema = fuzzed
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy(generation_mode=mode), script=st.sampled_from(SCRIPTS))
        def check(case, script):
            engine.script = script
            case.call_and_validate(checks=checks)

        try:
            check()
        except Unsatisfiable:  # nothing to break: no body and no parameters (GET /health, /v1/models)
            assert mode is GenerationMode.NEGATIVE
        except Exception as exc:  # report every operation's first failure together
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}"[:3000])
    return failures


def test_document_covers_every_route_with_real_status_codes(fuzzed):
    _, app, _ = fuzzed
    document = app.openapi()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (method, path)
            assert "200" in operation["responses"], (method, path)
            if method == "post" and not path.endswith(("/finetune-assets", "/cancel")):  # multipart; OpenAI's cancel has no body
                assert "application/json" in operation["requestBody"]["content"], path
    run = document["paths"]["/client/v4/accounts/{account_id}/ai/run/{model}"]["post"]
    assert set(run["responses"]) == {"200", "400", "403", "404", "408", "413", "415", "429", "503"}
    assert "text/event-stream" in run["responses"]["200"]["content"]
    # Hunt round 18 C-F3: what generates ends its requests with a 503 on SIGTERM (`SHUTTING_DOWN`); a delete the data
    # directory refuses is one too (`Service.write`).
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/client/v4/accounts/{account_id}/ai/v1/chat/completions"):
        assert "503" in document["paths"][path]["post"]["responses"], path
    assert "503" in document["paths"]["/v1/responses/{response_id}"]["delete"]["responses"]


def test_fuzz_valid_bodies_get_documented_answers(fuzzed):
    failures = run_operations(fuzzed, GenerationMode.POSITIVE, CHECKS, max_examples=30)
    assert not failures, "\n\n".join(failures)


def test_fuzz_invalid_bodies_are_refused(fuzzed):
    failures = run_operations(fuzzed, GenerationMode.NEGATIVE, CHECKS + [refuses_truly_invalid_bodies], max_examples=30)
    assert not failures, "\n\n".join(failures)
