"""Fuzz the live server from its own OpenAPI document: no 500s, no response that breaks the document."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from tests.server_util import start_server  # noqa: E402


@pytest.fixture(scope="module")
def fuzz_server(checkpoints, tmp_path_factory):
    # A 96-token context keeps every accepted request short; anything longer must be a clean 400.
    server = start_server(checkpoints["original"], tmp_path_factory.mktemp("fuzz"), "--max-model-len", "96", "--rate-limit", "0",
                          "--request-timeout", "20")
    yield server
    server.stop()


def test_openapi_fuzz(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.base + "/openapi.json")
    failures, statuses = [], {}
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance

    for operation in schema.get_all_operations():
        op = operation.ok()

        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=op.as_strategy())
        def check(case):
            response = case.call(timeout=60)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            case.validate_response(response, checks=(not_a_server_error, response_schema_conformance))

        try:
            check()
        except Exception as exc:  # collect every operation's failure, then report them all
            failures.append(f"{op.method.upper()} {op.path}: {exc}"[:2000])
    assert not failures, "\n\n".join(failures)
    print(f"fuzzed {sum(statuses.values())} requests: {statuses}")
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0  # both accepted and rejected inputs were exercised


# 400s that no schema can express: references to state (earlier calls, stored responses and items, fine-tunes; a call no later
# message answers, refused as OpenAI does), the
# served model's vocabulary (logit_bias ids, and two keys naming one id), the context window, the token budget, one field's meaning depending on another's (tool_choice 'required' with no tools;
# response_format type 'json_schema' with no schema, which OpenAI refuses too). Any other 5006 on a schema-valid body means schema and server disagree.
SEMANTIC = ("previous_response_id", "matches no earlier", "already exists", "cannot hold a valid answer", "no tool named",
            "the prompt renders to no tokens", "not loadable", "no fine-tune", "no queued request", "tool names must be unique",
            "needs at least one tool", "a JSON Schema object is required", "cannot look like a fine-tune id",
            "outside the vocabulary", "is biased twice", "needs the prompt logprobs", "did not have response messages", "No tool output found",
            "Item with id", "which is not in 'tools'", "a preceding message with 'tool_calls'", "already has its result",
            "is repeated among the calls still waiting", "already in the conversation of previous_response_id")


def test_bounded_fuzz_positive_and_negative(checkpoints, tmp_path_factory):
    """Every operation, schema-valid and schema-violating bodies, under two minutes: no 5xx, valid bodies served."""
    import time

    from schemathesis import GenerationMode
    from schemathesis.checks import negative_data_rejection, not_a_server_error

    server = start_server(checkpoints["original"], tmp_path_factory.mktemp("fuzz-bounded"), "--max-model-len", "96",
                          "--rate-limit", "0", "--request-timeout", "20")
    started, failures, rejected = time.monotonic(), [], []
    try:
        schema = schemathesis.openapi.from_url(server.base + "/openapi.json")
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            for operation in schema.get_all_operations():
                op = operation.ok()

                @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), database=None)
                @given(case=op.as_strategy(generation_mode=mode))
                def check(case):
                    response = case.call(timeout=60)
                    checks = (not_a_server_error,) if mode is GenerationMode.POSITIVE else (not_a_server_error, negative_data_rejection)
                    case.validate_response(response, checks=checks)
                    if mode is GenerationMode.POSITIVE and response.status_code == 400 and "5006" in response.text:
                        if not any(reason in response.text for reason in SEMANTIC):
                            rejected.append(f"{op.method.upper()} {op.path}: {case.body!r:.300} → {response.text[:300]}")

                try:
                    check()
                except Exception as exc:
                    if "Unsatisfiable" not in type(exc).__name__:
                        failures.append(f"{mode.name} {op.method.upper()} {op.path}: {exc}"[:1500])
    finally:
        server.stop()
    elapsed = time.monotonic() - started
    assert not failures, "\n\n".join(failures)
    assert not rejected, "schema-valid bodies refused:\n" + "\n".join(rejected[:10])
    assert elapsed < 120, f"the bounded fuzz took {elapsed:.0f} s"
