"""An unexpected error on the real engine's app: the 500 is counted and logged like every answer, its traceback once;
and a Responses answer that exists is answered even when storing it fails (storage faults injected, model real)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3

import httpx
import pytest

from ossrun import harmony
from ossrun.api.app import AppSettings, build_app
from ossrun.engine.async_engine import AsyncEngine
from tests.server_util import MODEL


@pytest.fixture(scope="module")
def served(checkpoints, tmp_path_factory):
    engine = AsyncEngine.from_model(checkpoints["original"], "float32", precision="exact", decode_token=harmony.token_bytes,
                                    kv_cache_bytes=16 * 1024**2)
    app = build_app(engine, AppSettings(data_dir=tmp_path_factory.mktemp("errors-data"), rate_limit_per_minute=0))
    yield app
    engine.shutdown()


def _disk_error(*args, **kwargs):
    raise sqlite3.OperationalError("disk I/O error")


def _bug(*args, **kwargs):
    """An unexpected error (a disk that refuses a write is no longer one: a named 503, tests/test_batch_server.py)."""
    raise sqlite3.OperationalError("no such table: items")


async def _post(app, path: str, body: dict) -> tuple[httpx.Response, str]:
    """The answer (the app's own exceptions are raised here, as the server would log them again) and /metrics after."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=120) as client:
        answer = await client.post(path, json=body)
        return answer, (await client.get("/metrics")).text


def test_a_500_is_counted_logged_once_and_carries_its_id(served, monkeypatch, caplog):
    monkeypatch.setattr(served.state.service.batch_store, "create", _bug)
    caplog.set_level(logging.INFO)
    answer, metrics = asyncio.run(_post(served, f"/client/v4/accounts/a/ai/run/{MODEL}",
                                        {"requests": [{"prompt": "Hi", "max_tokens": 2}]}))
    assert answer.status_code == 500 and answer.json()["errors"][0]["code"] == 3000
    assert 'ossrun_requests_total{route="/client/v4/accounts/{account_id}/ai/run/{model:path}",status="500"} 1.0' in metrics
    request_id = answer.headers["x-request-id"]
    lines = [r for r in caplog.records if f"request_id={request_id}" in r.getMessage()]
    assert [r.levelname for r in lines] == ["ERROR", "WARNING"]  # the traceback, then the answer's line
    assert lines[0].exc_info is not None and " 500 " in lines[1].getMessage()


async def _health(app) -> str:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=30) as client:
        return (await client.get("/health")).json()["batch_store"]


def _writes_work_again(app, monkeypatch) -> None:
    """The disk takes writes again: the next response kept ends the streak (the module's app is shared)."""
    monkeypatch.undo()
    answer, _ = asyncio.run(_post(app, "/v1/responses", {"model": MODEL, "input": "Hi", "max_output_tokens": 4}))
    assert answer.status_code == 200 and asyncio.run(_health(app)) == "ok", answer.text


def test_a_response_that_cannot_be_stored_is_still_answered(served, monkeypatch, caplog):
    """Before (hunt round 13 C-F5): each refused store logged a full traceback, even without -v; now the data
    directory's failure streak logs one line, no traceback (the batch queue's `StorageHealth`), and /health says so."""
    monkeypatch.setattr(served.state.service.responses, "remember", _disk_error)
    caplog.set_level(logging.INFO)
    for _ in range(2):
        answer, _ = asyncio.run(_post(served, "/v1/responses", {"model": MODEL, "input": "Hi", "max_output_tokens": 8}))
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] in ("completed", "incomplete") and answer.json()["usage"]["output_tokens"] > 0
    refused = [r for r in caplog.records if "refused (disk I/O error)" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelname == "ERROR" and "cannot be continued" in refused[0].getMessage()
    assert not any(r.exc_info for r in caplog.records), [r.getMessage() for r in caplog.records if r.exc_info]
    assert asyncio.run(_health(served)) == "failing"
    _writes_work_again(served, monkeypatch)
    assert any("takes writes again" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("stream", [False, True])
def test_a_background_response_the_store_refuses_is_a_503_before_it_runs(served, monkeypatch, stream):
    """Before (hunt round 13 C-F1): with the data directory refusing writes, a background create was answered
    `queued` and run, and its result lost (retrieve: 404). Its store is all a background run is for: refused, with
    the batch queue's 503 (3040) in OpenAI's shape, and nothing started."""
    service = served.state.service
    started: list[str] = []
    monkeypatch.setattr(service.responses, "remember", _disk_error)
    monkeypatch.setattr(service.background, "start", lambda key, *args, **kwargs: started.append(key))
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 8, "background": True, "stream": stream}
    answer, _ = asyncio.run(_post(served, "/v1/responses", body))
    assert answer.status_code == 503, answer.text
    error = answer.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "3040", error
    assert "cannot be written (disk I/O error)" in error["message"], error
    assert started == [] and asyncio.run(_health(served)) == "failing"
    _writes_work_again(served, monkeypatch)


def test_logits_all_nan_are_a_500_naming_them_not_made_up_tokens(checkpoints, tmp_path, caplog):
    """Weights that make every logit NaN were answered 200 with noise (hunt round 22 B-F4)."""
    from tests.test_checkpoint_errors import _overflowing, _weights

    _weights(_overflowing)(checkpoints["original"], tmp_path, "original")
    engine = AsyncEngine.from_model(tmp_path, "float32", precision="exact", kv_cache_bytes=16 * 1024**2)
    try:
        app = build_app(engine, AppSettings(data_dir=tmp_path / "data", rate_limit_per_minute=0))
        for _ in range(2):
            answer, _ = asyncio.run(_post(app, f"/client/v4/accounts/a/ai/run/{MODEL}", {"prompt": "Hi", "max_tokens": 2}))
            assert answer.status_code == 500 and answer.json()["errors"][0] == {
                "code": 3000, "message": "AiError: the model's logits are all NaN or infinite (broken weights?)"}
    finally:
        engine.shutdown()
    assert len([r for r in caplog.records if "logits are all NaN" in r.getMessage()]) == 1
