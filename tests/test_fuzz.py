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
