"""The async batch queue through the real server: results, crash safety with kill -9, interactive latency."""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from tests.server_util import MODEL, start_server


def queue(server, requests: list[dict]) -> str:
    response = httpx.post(server.run_url(), params={"queueRequest": "true"}, json={"requests": requests}, timeout=60)
    assert response.status_code == 200, response.text
    result = response.json()["result"]
    assert result["status"] == "queued" and result["model"] == "@cf/openai/gpt-oss-20b"
    return result["request_id"]


def poll(server, request_id: str) -> dict:
    response = httpx.post(server.run_url(), json={"request_id": request_id}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["result"]


def wait_done(server, request_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = poll(server, request_id)
        if "responses" in result:
            return result
        assert result["status"] in ("queued", "running")
        time.sleep(0.3)
    raise AssertionError("batch did not finish")


def items(n: int, max_tokens: int = 4) -> list[dict]:
    shapes = [
        lambda i: {"prompt": f"item {i}", "max_tokens": max_tokens, "temperature": 0},
        lambda i: {"messages": [{"role": "user", "content": f"item {i}"}], "max_tokens": max_tokens, "temperature": 0},
        lambda i: {"input": f"item {i}", "max_output_tokens": max_tokens, "temperature": 0},
    ]
    return [{**shapes[i % 3](i), "external_reference": f"ref-{i}"} for i in range(n)]


def test_fifty_requests_complete_once_in_order(checkpoints, tmp_path):
    server = start_server(checkpoints["original"], tmp_path / "data")
    try:
        request_id = queue(server, items(50))
        result = wait_done(server, request_id)
        responses = result["responses"]
        assert [r["id"] for r in responses] == list(range(50))
        assert [r["external_reference"] for r in responses] == [f"ref-{i}" for i in range(50)]
        assert all(r["success"] for r in responses)
        assert "response" in responses[0]["result"] and "choices" in responses[1]["result"] and "output" in responses[2]["result"]
        assert result["usage"]["completion_tokens"] == sum(
            r["result"]["usage"].get("completion_tokens", r["result"]["usage"].get("output_tokens", 0)) for r in responses)
        # the same item sync gives the same result (greedy)
        sync = httpx.post(server.run_url(), json={"prompt": "item 0", "max_tokens": 4, "temperature": 0}, timeout=60).json()["result"]
        assert sync["response"] == responses[0]["result"]["response"]
        unknown = httpx.post(server.run_url(), json={"request_id": "00000000-0000-0000-0000-000000000000"}, timeout=30)
        assert unknown.status_code == 400 and "no queued request" in unknown.text
        bad = httpx.post(server.run_url(), params={"queueRequest": "true"}, json={"requests": [{"prompt": "ok"}, {"prompt": "x", "top_k": 99}]})
        assert bad.status_code == 400 and "requests[1]" in bad.text
    finally:
        server.stop()


def test_kill_9_loses_nothing(checkpoints, tmp_path):
    data = tmp_path / "data"
    server = start_server(checkpoints["original"], data)
    running_batch = queue(server, items(24, max_tokens=40))
    for _ in range(200):  # wait until it is under way, then kill the server mid-batch
        if poll(server, running_batch)["status"] == "running":
            break
        time.sleep(0.05)
    just_queued = queue(server, items(5))
    server.stop(signal.SIGKILL)

    server = start_server(checkpoints["original"], data)
    try:
        for request_id, n in ((running_batch, 24), (just_queued, 5)):
            result = wait_done(server, request_id)
            assert [r["id"] for r in result["responses"]] == list(range(n))
            assert all(r["success"] for r in result["responses"])
            assert [r["external_reference"] for r in result["responses"]] == [f"ref-{i}" for i in range(n)]
    finally:
        server.stop()


def test_interactive_requests_are_answered_while_a_batch_runs(checkpoints, tmp_path):
    server = start_server(checkpoints["original"], tmp_path / "data")
    try:
        request_id = queue(server, items(60, max_tokens=30))
        time.sleep(0.5)
        assert poll(server, request_id)["status"] == "running"  # the batch fills the engine while we ask
        latencies = []
        for i in range(5):
            start = time.monotonic()
            reply = httpx.post(server.run_url(), json={"prompt": f"now {i}", "max_tokens": 8}, timeout=120)
            assert reply.status_code == 200
            latencies.append(time.monotonic() - start)
        print(f"interactive latency during a 60-item batch: {[round(x, 2) for x in latencies]}")
        wait_done(server, request_id)
    finally:
        server.stop()


def test_external_reference_is_a_string_echoed_as_sent(checkpoints, tmp_path):
    """Hosted, it is a string; anything else is refused up front, naming the item, never echoed as Python's str(). At
    most 512 characters (hunt round 17 A-F5: a 9 MB one was stored a week with a near-free item and echoed in every
    poll), as the document states."""
    server = start_server(checkpoints["original"], tmp_path, "--max-model-len", "256")
    try:
        for index, reference in enumerate([{"a": 1}, 5, True, ["x"], "r" * 513]):
            body = {"requests": [{"prompt": "hi", "max_tokens": 2}] * index + [{"prompt": "hi", "max_tokens": 2, "external_reference": reference}]}
            response = httpx.post(server.run_url(), params={"queueRequest": "true"}, json=body, timeout=60)
            assert response.status_code == 400, response.text
            error = response.json()["errors"][0]
            assert error["code"] == 5006 and f"/requests/{index}/external_reference" in error["message"], error
        done = wait_done(server, queue(server, [{"prompt": "hi", "max_tokens": 2, "external_reference": "ref {'a': 1}"},
                                                {"prompt": "hi", "max_tokens": 2}, {"prompt": "hi", "max_tokens": 2, "external_reference": "r" * 512}]))
        # always there, null when not sent, as the hosted poll examples show it (hunt round 12 A-F4)
        assert [r["external_reference"] for r in done["responses"]] == ["ref {'a': 1}", None, "r" * 512]
        document = httpx.get(server.base + "/openapi.json", timeout=30).json()["components"]["schemas"]
        assert all(document[f"Queued{shape}"]["properties"]["external_reference"]["anyOf"][0] == {"type": "string", "maxLength": 512}
                   for shape in ("Prompt", "Messages", "Responses"))
    finally:
        server.stop()


def test_a_second_server_on_the_same_data_dir_is_refused_and_takes_no_work(checkpoints, tmp_path):
    """It used to start, take the first server's running batch items for abandoned and run them again."""
    data = tmp_path / "data"
    first = start_server(checkpoints["original"], data)
    try:
        batch = queue(first, items(8, max_tokens=24))
        for _ in range(200):
            if poll(first, batch)["status"] == "running":
                break
            time.sleep(0.05)
        with pytest.raises(RuntimeError, match="server exited \\(2\\)") as refused:
            start_server(checkpoints["original"], data)
        assert f"{data} is in use by another ossrun server (pid {first.process.pid})" in str(refused.value)
        result = wait_done(first, batch)
        assert [r["id"] for r in result["responses"]] == list(range(8)) and all(r["success"] for r in result["responses"])
    finally:
        first.stop()
    again = start_server(checkpoints["original"], data)  # the lock goes with the process
    again.stop()


def test_a_deleted_lock_file_does_not_let_a_second_server_in(checkpoints, tmp_path):
    """Hunt round 15 A-F4: the lock was a flock on `server.lock`, so deleting that file (a "stale lock" reflex) let a
    second server start on the directory, queue the first one's running batch items again and fail its live background
    responses. The directory itself is locked now."""
    data = tmp_path / "data"
    first = start_server(checkpoints["original"], data)
    try:
        (data / "server.lock").unlink()
        with pytest.raises(RuntimeError, match="server exited \\(2\\)") as refused:
            start_server(checkpoints["original"], data).stop()  # stopped when it starts: the failure leaves no server
        assert f"{data} is in use by another ossrun server (pid unknown); give each server its own --data-dir" in str(refused.value)
        assert "Traceback" not in str(refused.value) and first.health()["status"] == "ok"
    finally:
        first.stop()


def metrics(server) -> dict[str, float]:
    """Every sample of /metrics by its name and labels, e.g. `ossrun_batch_items{state="queued"}`."""
    lines = httpx.get(server.base + "/metrics", timeout=30).text.splitlines()
    return {name: float(value) for name, _, value in (line.rpartition(" ") for line in lines if not line.startswith("#"))}


def test_batch_items_are_not_cut_at_the_sync_request_timeout(checkpoints, tmp_path):
    """Before: each item ran under `--request-timeout` (meant for a client waiting on a connection), with the time it
    waited behind its own batch counted, so all failed with 3007; the tokens they generated were in /metrics but in
    no usage, and the batch's total was 0."""
    server = start_server(checkpoints["original"], tmp_path / "data", "--request-timeout", "0.3")
    long_item = {"prompt": "count", "max_tokens": 400, "temperature": 0}
    try:
        sync = httpx.post(server.run_url(), json=long_item, timeout=120)
        assert sync.status_code == 408 and sync.json()["errors"][0]["code"] == 3007  # alone it outlasts the timeout
        server.wait_idle()  # the timed-out run may meter a last token after its 408 (CI once read 1 more after)
        before = metrics(server)
        result = wait_done(server, queue(server, [long_item] * 4))
        after = metrics(server)
        assert [r["success"] for r in result["responses"]] == [True] * 4, result["responses"][0]
        usages = [r["result"]["usage"] for r in result["responses"]]
        assert result["usage"]["completion_tokens"] == sum(u["completion_tokens"] for u in usages) > 4
        for kind in ("prompt", "completion"):  # the batch's usage is what /metrics billed for it
            assert after[f'ossrun_tokens_total{{kind="{kind}"}}'] - before[f'ossrun_tokens_total{{kind="{kind}"}}'] \
                == result["usage"][f"{kind}_tokens"]
    finally:
        server.stop()


def test_the_queue_answers_before_compiling_schemas_and_an_item_the_grammar_refuses_fails_alone(checkpoints, tmp_path):
    """Before: the queue POST compiled every item's schema and searched its shortest answer (about 2 s an item
    with its own schema) before answering, so a big batch took minutes to acknowledge, and a schema the grammar
    engine refuses made the whole POST a 400. Now the cheap checks run at queue time (a bad field is still a 400
    naming the item), the grammar's when the item runs: its error is that item's, in the poll result."""
    server = start_server(checkpoints["original"], tmp_path / "data")

    def item(name: str, schema: dict | None = None) -> dict:
        schema = schema or {"type": "object", "properties": {name: {"type": "string", "format": "email"}}, "required": [name]}
        return {"prompt": "What is the capital of Peru?", "max_tokens": 40, "temperature": 0,
                "response_format": {"type": "json_schema", "json_schema": schema}}

    try:
        refused = item("a", {"type": "object", "properties": {"a": {"type": "strnig"}}})
        result = wait_done(server, queue(server, [refused, {"prompt": "hi", "max_tokens": 4}]))
        first, second = result["responses"]
        assert first["success"] is False and first["result"] == {}, first
        assert first["errors"][0]["code"] == 5006 and "Invalid type: strnig" in first["errors"][0]["message"]
        assert first["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        assert second["success"] is True
        bad = httpx.post(server.run_url(), params={"queueRequest": "true"}, timeout=60,
                         json={"requests": [item("b"), {**item("c"), "max_tokens": 10**9}]})
        assert bad.status_code == 400 and bad.json()["errors"][0]["code"] == 8 and "requests[1]" in bad.text

        start = time.monotonic()
        queue(server, [item(f"distinct_{i}") for i in range(20)])  # about 40 s before, on two busy cores
        assert time.monotonic() - start < 10
    finally:
        server.stop()


def test_metrics_show_the_batch_backlog_and_keep_batch_latency_apart(checkpoints, tmp_path):
    """Before: 40 queued items showed nowhere on /metrics (`ossrun_queue_depth` counts the engine's waiting requests
    only), and each item's minutes went into the interactive latency histogram."""
    server = start_server(checkpoints["original"], tmp_path / "data")
    try:
        before = metrics(server)
        request_id = queue(server, items(40, max_tokens=30))
        during = metrics(server)
        backlog = during['ossrun_batch_items{state="queued"}'] + during['ossrun_batch_items{state="running"}']
        assert 0 < backlog <= 40
        result = wait_done(server, request_id)
        after = metrics(server)
        assert after['ossrun_batch_items{state="queued"}'] == after['ossrun_batch_items{state="running"}'] == 0
        assert after['ossrun_batch_items_finished_total{success="true"}'] == 40 == len(result["responses"])
        assert after['ossrun_batch_items_finished_total{success="false"}'] == 0
        assert after["ossrun_batch_item_seconds_count"] - before["ossrun_batch_item_seconds_count"] == 40
        assert after["ossrun_request_seconds_count"] == before["ossrun_request_seconds_count"]
    finally:
        server.stop()


def _until(check, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the condition did not come in time"
        time.sleep(0.2)


def test_health_and_metrics_say_when_the_batch_store_keeps_failing(checkpoints, tmp_path):
    """Before: with the store failing, /health said ok with nothing about the queue standing still, and /metrics
    answered 500 (its backlog query raised). The store is broken from outside, as a failing disk would: its
    items table renamed away by another connection, then back."""
    import sqlite3

    server = start_server(checkpoints["original"], tmp_path / "data")
    try:
        assert server.health()["batch_store"] == "ok"
        outside = sqlite3.connect(tmp_path / "data" / "batch.sqlite", isolation_level=None)
        outside.execute("ALTER TABLE items RENAME TO items_away")
        _until(lambda: server.health()["batch_store"] == "failing")
        health = server.health()
        assert health["status"] == "ok"  # interactive requests are still served: liveness stays
        metrics = httpx.get(server.base + "/metrics", timeout=30)
        assert metrics.status_code == 200 and "ossrun_batch_store_up 0.0" in metrics.text
        outside.execute("ALTER TABLE items_away RENAME TO items")
        outside.close()
        _until(lambda: server.health()["batch_store"] == "ok")
        assert "ossrun_batch_store_up 1.0" in httpx.get(server.base + "/metrics", timeout=30).text
        request_id = queue(server, items(2))
        assert all(r["success"] for r in wait_done(server, request_id)["responses"])  # the queue moves again
    finally:
        server.stop()


def test_a_write_the_disk_refuses_is_a_named_503_and_health_says_failing(checkpoints, tmp_path):
    """Before: with the data directory's disk full, queueing a batch and creating a fine-tune were a bare 500 "internal
    error" with a traceback in the log, and /health still said `batch_store: ok`. The disk refuses writes for real,
    unprivileged: the server's file-size limit (RLIMIT_FSIZE) is set to 0 after it started, so every write to a file
    fails in the kernel (EFBIG; SQLite says "disk I/O error"), as on a full disk, then lifted again."""
    import resource

    server = start_server(checkpoints["original"], tmp_path / "data")
    finetunes = server.base + "/client/v4/accounts/acct/ai/finetunes"
    try:
        _, hard = resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (0, hard))
        refused = httpx.post(server.run_url(), params={"queueRequest": "true"}, json={"requests": items(1)}, timeout=60)
        assert refused.status_code == 503, refused.text
        error = refused.json()["errors"][0]
        assert error["code"] == 3040 and "the storage of the batch queue cannot be written (disk I/O error)" in error["message"]
        created = httpx.post(finetunes, json={"model": "@cf/openai/gpt-oss-20b", "name": "ft1"}, timeout=60)
        assert created.status_code == 503 and "the storage of the fine-tunes cannot be written" in created.text, created.text
        # The Responses store shares the file (hunt round 13 C-F1): a background create, whose result would be lost, is
        # refused in OpenAI's shape; a sync answer is still sent, only not kept.
        response = {"model": MODEL, "input": "Hi", "max_output_tokens": 4}
        background = httpx.post(server.base + "/v1/responses", json={**response, "background": True}, timeout=60)
        assert background.status_code == 503, background.text
        assert background.json()["error"]["code"] == "3040" and "the storage of the responses" in background.text
        assert httpx.post(server.base + "/v1/responses", json=response, timeout=60).status_code == 200
        assert server.health()["batch_store"] == "failing"
        time.sleep(1.5)  # the worker's recheck finds the disk still full: no flapping
        assert server.health()["batch_store"] == "failing"
        assert "ossrun_batch_store_up 0.0" in httpx.get(server.base + "/metrics", timeout=30).text
        resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (hard, hard))  # space freed
        _until(lambda: server.health()["batch_store"] == "ok")
        request_id = queue(server, items(2))
        assert all(r["success"] for r in wait_done(server, request_id)["responses"])
        assert httpx.post(finetunes, json={"model": "@cf/openai/gpt-oss-20b", "name": "ft1"}, timeout=60).status_code == 200
    finally:
        server.stop()
    log = server.log.read_text()
    assert "unhandled error" not in log and "Traceback" not in log
    assert "storage: the data directory takes writes again" in log


def test_a_batch_of_responses_items_is_also_answered_as_the_model_schema_documents(checkpoints, tmp_path):
    """Before: gpt-oss's own model schema documents a finished batch of Responses items as `{"results": [Response…]}`
    and ossrun answered only the generic batch pages' `responses: [{id, result, success}]` (hunt round 12 A-F2). Now
    both: `results` holds the items' Response objects in request order, a failed one `status: "failed"` with its
    `error`; `responses` is as it was. A batch with other shapes in it has no `results`."""
    server = start_server(checkpoints["original"], tmp_path / "data")
    try:
        refused = {"input": "hi", "max_output_tokens": 40, "text": {"format": {"type": "json_schema", "name": "x",
                                                                               "schema": {"type": "strnig"}}}}
        done = wait_done(server, queue(server, [{"input": "What is the capital of France?", "reasoning": {"effort": "low"}, "max_output_tokens": 4},
                                                refused, {"input": [{"role": "user", "content": "Hi"}], "max_output_tokens": 4}]))
        assert [r["success"] for r in done["responses"]] == [True, False, True]
        results = done["results"]
        assert [r["object"] for r in results] == ["response"] * 3
        assert results[0] == done["responses"][0]["result"] and results[2] == done["responses"][2]["result"]
        assert results[0]["id"].startswith("resp_") and results[0]["error"] is None and results[0]["output"]
        failed = results[1]
        assert failed["status"] == "failed" and failed["output"] == [] and failed["id"] is None, failed
        assert failed["error"]["code"] == "5006" and "strnig" in failed["error"]["message"], failed
        assert failed["usage"] == {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
        mixed = wait_done(server, queue(server, [{"input": "hi", "max_output_tokens": 2}, {"prompt": "hi", "max_tokens": 2}]))
        assert "results" not in mixed and len(mixed["responses"]) == 2
    finally:
        server.stop()


def test_a_database_that_refuses_writes_keeps_health_failing_though_a_small_file_fits(checkpoints, tmp_path):
    """Hunt round 15 A-F6: /health said `ok` again 1.5 s after a refused write, though the database still refused every
    write, because its probe only wrote a 2-byte file. Here a file-size limit of 1 KB lets that file through while no
    SQLite write fits (a WAL frame is 4 KB); the probe now commits a row in the database too."""
    import resource

    server = start_server(checkpoints["original"], tmp_path / "data")
    background = {"model": MODEL, "input": "Hi", "max_output_tokens": 4, "background": True}
    try:
        _, hard = resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (1024, hard))
        for _ in range(2):
            refused = httpx.post(server.base + "/v1/responses", json=background, timeout=60)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "3040", refused.text
            time.sleep(2)  # four of the worker's rechecks
            assert server.health()["batch_store"] == "failing"
            assert metrics(server)["ossrun_batch_store_up"] == 0
        resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (hard, hard))
        _until(lambda: server.health()["batch_store"] == "ok")
        assert httpx.post(server.base + "/v1/responses", json=background, timeout=60).status_code == 200
    finally:
        server.stop()
    log = server.log.read_text()
    assert "Traceback" not in log and log.count("storage: the data directory takes writes again") == 1, log


def test_another_process_holding_the_write_lock_neither_freezes_the_server_nor_makes_500s(checkpoints, tmp_path):
    """Hunt round 15 A-F2: while another process held batch.sqlite's write lock (an operator's sqlite3 shell in a
    transaction), queueing a batch, a background create and a DELETE each waited SQLite's busy timeout on the event
    loop, so /health and every stream stood still for 5 s at a time, then answered 500 "internal error". The writes now
    wait on threads, the reads a poll or /health make never wait behind them, and a write still locked out after the
    busy timeout is the storage 503 (3040) naming the lock; a sync answer is still sent (not kept). Once the lock is
    released, writes work again."""
    import sqlite3
    from concurrent.futures import ThreadPoolExecutor

    server = start_server(checkpoints["original"], tmp_path / "data")
    response = {"model": MODEL, "input": "Hi", "max_output_tokens": 4}
    try:
        stored = httpx.post(server.base + "/v1/responses", json=response, timeout=60).json()["id"]
        batch = queue(server, items(1))
        outside = sqlite3.connect(tmp_path / "data" / "batch.sqlite", isolation_level=None)
        outside.execute("BEGIN IMMEDIATE")
        with ThreadPoolExecutor(4) as pool:
            writes = {"queue": pool.submit(httpx.post, server.run_url(), params={"queueRequest": "true"},
                                           json={"requests": items(1)}, timeout=60),
                      "background": pool.submit(httpx.post, server.base + "/v1/responses", json={**response, "background": True}, timeout=60),
                      "delete": pool.submit(httpx.delete, f"{server.base}/v1/responses/{stored}", timeout=60)}
            answered = pool.submit(httpx.post, server.base + "/v1/responses", json=response, timeout=60)
            slowest = 0.0
            while not all(write.done() for write in writes.values()):
                started = time.monotonic()
                assert server.health()["status"] == "ok" and poll(server, batch)["status"] in ("queued", "running", "done")
                slowest = max(slowest, time.monotonic() - started)
                time.sleep(0.1)
            assert answered.result().status_code == 200, answered.result().text
        assert slowest < 1, f"/health and a poll took {slowest:.1f} s while writes waited for the lock"
        assert server.health()["batch_store"] == "failing"
        for name, write in writes.items():
            answer = write.result()
            assert answer.status_code == 503, (name, answer.text)
            error = answer.json()["error"] if "error" in answer.json() else answer.json()["errors"][0]
            assert str(error["code"]) == "3040" and "(database is locked: another process has held its write lock" in error["message"], error
        outside.execute("ROLLBACK")
        outside.close()
        _until(lambda: server.health()["batch_store"] == "ok")
        assert httpx.delete(f"{server.base}/v1/responses/{stored}", timeout=60).status_code == 200
        assert all(r["success"] for r in wait_done(server, queue(server, items(1)))["responses"])
    finally:
        server.stop()
    log = server.log.read_text()
    assert "unhandled error" not in log and "Traceback" not in log


def test_a_responses_item_run_again_after_a_crash_replaces_its_first_stored_response(checkpoints, tmp_path):
    """Hunt round 18 B-F4: a Responses item's answer is stored (`store`) before the item is marked done, in another
    transaction: a crash between the two ran it again at the next start and stored a second response, the first left
    an orphan no client knew (30 days against the bounds, and what an `item_reference` to its items read). The run
    again now stores its response under the first run's id, replacing it. The crash is the state it leaves on disk:
    the response stored, the item `running` with no result."""
    import sqlite3

    data = tmp_path / "data"
    server = start_server(checkpoints["original"], data)
    try:
        batch = queue(server, [{"input": "Hi", "max_output_tokens": 4, "temperature": 0}])
        (first,) = wait_done(server, batch)["responses"]
    finally:
        server.stop()
    db = sqlite3.connect(data / "batch.sqlite")
    db.execute("UPDATE items SET state = 'running', success = NULL, result = NULL, prompt_tokens = 0, completion_tokens = 0")
    db.execute("UPDATE batches SET finished_at = NULL, collected_at = NULL")
    db.commit()
    server = start_server(checkpoints["original"], data)
    try:
        (again,) = wait_done(server, batch)["responses"]
        assert again["result"]["id"] == first["result"]["id"]
        assert httpx.get(f"{server.base}/v1/responses/{first['result']['id']}", timeout=30).json() == again["result"]
    finally:
        server.stop()
    assert db.execute("SELECT id FROM responses").fetchall() == [(first["result"]["id"],)]
    db.close()
