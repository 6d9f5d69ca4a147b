"""A client that leaves ends its request, whatever the route; SIGTERM ends the server promptly.

A sync request has no stream to close: the server must notice the closed connection itself,
or every SDK timeout (and its retry) leaves an orphan generating until `max_tokens`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import httpx
import openai
import pytest

from ossrun.batch.store import SQLiteBatchStore
from ossrun.connections import LINGER_S
from tests.server_util import MODEL, start_server

LONG = 4000  # far more tokens than the tiny model makes in the client's timeout
CLIENT_TIMEOUT = 0.5  # seconds; the native CPU blocks make the tiny model fast enough to finish 4000 tokens in 1.5 s


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    s = start_server(checkpoints["original"], tmp_path_factory.mktemp("data-aborts"), "--rate-limit", "100000")
    yield s
    s.stop()


def leave_early(server, path: str, body: dict) -> None:
    """Send until one request is still generating when its client gives up (the random model may draw an
    end token early on a quiet machine; a request that ended by itself proves nothing about orphans)."""
    for seed in range(8):
        try:
            httpx.post(server.base + path, json={**body, "seed": seed}, timeout=CLIENT_TIMEOUT)
        except httpx.ReadTimeout:
            return
    pytest.fail("every request ended before its client's timeout: nothing left early")


@pytest.mark.parametrize("route", ["ai-run", "chat", "completions", "responses"])
def test_sync_request_ends_when_its_client_leaves(server, route):
    if route == "ai-run":
        leave_early(server, "/client/v4/accounts/a/ai/run/" + MODEL, {"prompt": "Hi", "max_tokens": LONG})
    elif route == "chat":  # the official client, the same way as leave_early
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="x", timeout=CLIENT_TIMEOUT, max_retries=0)
        for seed in range(8):
            try:
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=LONG, seed=seed + 1)
            except openai.APITimeoutError:
                break
        else:
            pytest.fail("every request ended before its client's timeout: nothing left early")
    elif route == "completions":
        leave_early(server, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": LONG})
    else:
        leave_early(server, "/v1/responses", {"model": MODEL, "input": "Hi", "max_output_tokens": LONG})
    stats = server.wait_idle(within=1.0)
    assert stats["running"] == 0 and stats["waiting"] == 0, f"an orphan still runs after its client left: {stats}"


def read_a_long_stream(server) -> None:
    """A streamed request of LONG tokens, read to its end or until the server goes away."""
    try:
        with httpx.stream("POST", server.run_url(), json={"prompt": "Hi", "max_tokens": LONG, "stream": True}, timeout=60) as r:
            for _ in r.iter_bytes():
                pass
    except httpx.HTTPError:
        pass


def _cpu_s(pid: int) -> float:
    """The process's CPU seconds so far (user and system)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _post_raw(server, path: str, body: bytes, send: int | None = None) -> socket.socket:
    """A connection that has sent a POST of `body` (its first `send` bytes only, when given), without reading."""
    connection = socket.create_connection(("127.0.0.1", server.port))
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    connection.sendall(head + body[:send])
    return connection


def _slow_batch() -> bytes:
    """A batch of 1000 items (the most one may have) that its checks take seconds over: 40 long messages an item."""
    words = " ".join(f"word{i}" for i in range(30))  # 8 MB: under the 10 MB a body may have
    messages = [{"role": ("user", "assistant")[i % 2], "content": f"m{i} {words}"} for i in range(40)]
    return json.dumps({"requests": [{"messages": messages, "max_tokens": 5}] * 1000}).encode()


def test_a_batchs_item_checks_stop_when_its_client_leaves(checkpoints, tmp_path):
    """Hunt round 23 A-F1: a batch's items are checked on a thread, which a departed client's cancellation did not
    reach: the checks ran on for nobody (seconds of CPU each), and at a stop `asyncio.run` waited for them all, holding
    the data directory's lock. Here two clients leave once their checks are under way; the server goes idle."""
    server = start_server(checkpoints["original"], tmp_path / "data", "--rate-limit", "100000")
    try:
        body, before = _slow_batch(), _cpu_s(server.process.pid)
        clients = [_post_raw(server, f"/client/v4/accounts/a/ai/run/{MODEL}?queueRequest=true", body) for _ in range(2)]
        deadline = time.monotonic() + 60
        while _cpu_s(server.process.pid) - before < 2.0 and time.monotonic() < deadline:  # the bodies are parsed by now
            time.sleep(0.1)
        for client in clients:  # a reset, as a killed client leaves
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            client.close()
        time.sleep(1.0)
        start = _cpu_s(server.process.pid)
        time.sleep(3.0)
        assert _cpu_s(server.process.pid) - start < 1.0, "the item checks ran on after their clients left"
    finally:
        server.stop()


def _answer(connection: socket.socket) -> tuple[str, dict[str, str], bytes]:
    """The status line, headers (lower-case names) and body of the response on `connection`, read to its close."""
    connection.settimeout(30)
    raw = b""
    while chunk := connection.recv(65536):
        raw += chunk
    head, _, content = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    return status, {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}, content


@pytest.mark.parametrize("path, half", [(f"/client/v4/accounts/a/ai/run/{MODEL}", True),
                                        (f"/client/v4/accounts/a/ai/run/{MODEL}?queueRequest=true", False)])
def test_sigterm_answers_a_request_receiving_its_body_or_checking_it_503(checkpoints, tmp_path, path, half):
    """Hunt round 23 A-F2: at SIGTERM a request still receiving its body, or whose batch was still being checked on a
    thread, was cancelled when uvicorn's grace period ended: uvicorn's bare text/plain 500 and an ERROR traceback. The
    drain now ends it with the documented 503 3040 in the route's envelope, and closes the connection."""
    server = start_server(checkpoints["original"], tmp_path / "data", "--rate-limit", "100000")
    try:
        body, before = _slow_batch(), _cpu_s(server.process.pid)
        client = _post_raw(server, path, body, send=len(body) // 2 if half else None)
        deadline = time.monotonic() + 60
        while not half and _cpu_s(server.process.pid) - before < 1.5 and time.monotonic() < deadline:  # checks under way
            time.sleep(0.1)
        time.sleep(1.0 if half else 0)  # the half that was sent has arrived
        server.process.terminate()
        status, headers, content = _answer(client)
        assert status == "HTTP/1.1 503 Service Unavailable", (status, content[:300])
        assert headers["connection"] == "close"
        answer = json.loads(content)
        assert answer["success"] is False and answer["errors"][0]["code"] == 3040, answer
        assert answer["errors"][0]["message"] == "The server is shutting down, please try again."
        server.process.wait(timeout=30)
        assert "Traceback" not in server.log.read_text(), server.log.read_text()[-3000:]
    finally:
        server.stop()


def test_sigterm_with_requests_in_flight_exits_within_5s(checkpoints, tmp_path):
    server = start_server(checkpoints["original"], tmp_path / "data", "--rate-limit", "100000")
    try:
        def sync():
            try:
                httpx.post(server.run_url(), json={"prompt": "Hi", "max_tokens": LONG}, timeout=60)
            except httpx.HTTPError:
                pass

        def stream():
            read_a_long_stream(server)

        batch = httpx.post(server.run_url(), params={"queueRequest": "true"}, timeout=30,
                           json={"requests": [{"prompt": f"item {i}", "max_tokens": LONG} for i in range(2)]}).json()["result"]["request_id"]
        threads = [threading.Thread(target=f, daemon=True) for f in (sync, sync, sync, stream, stream)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while server.health()["running"] < len(threads) + 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.health()["running"] == len(threads) + 2
        started = time.monotonic()
        server.process.terminate()
        server.process.wait(timeout=30)
        assert time.monotonic() - started < 5.0
        for t in threads:
            t.join(timeout=5)
            assert not t.is_alive()
        # the batch items were interrupted, not failed: they run again at the next start
        store = SQLiteBatchStore(tmp_path / "data" / "batch.sqlite")
        assert [(item.state, item.success) for item in store.get(batch).items] == [("running", None)] * 2
        store.close()
    finally:
        server.stop()


def test_a_second_sigint_during_shutdown_exits_quietly(checkpoints, tmp_path):
    """Hunt round 13 C-F2: Ctrl-C in `make demo` reached the server twice (the terminal's SIGINT to the process group,
    then the demo's own), and uvicorn raised both again once it had shut down: a KeyboardInterrupt thrown through the
    closing event loop, a traceback from the app's lifespan, 4 times in 4 with the signals 50 ms apart. A second
    signal now closes the open connections and the server exits at once, quietly."""
    server = start_server(checkpoints["original"], tmp_path / "data", "--rate-limit", "100000")
    try:
        def stream():
            read_a_long_stream(server)

        threads = [threading.Thread(target=stream, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while server.health()["running"] < len(threads) and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.monotonic()
        server.process.send_signal(signal.SIGINT)
        time.sleep(0.05)
        server.process.send_signal(signal.SIGINT)
        server.process.wait(timeout=30)
        assert time.monotonic() - started < 5.0
        log = server.log.read_text()
        assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    finally:
        server.stop()


def _catches_sigint(pid: int) -> bool:
    """Whether the process has a handler of its own for SIGINT (its SigCgt mask in /proc), not the default or ignore."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGINT - 1) & 1)
    raise AssertionError("no SigCgt line")


def test_a_signal_while_the_interpreter_finishes_still_exits_0(checkpoints, tmp_path):
    """Found fixing hunt round 23 A-F3: an idle server's second Ctrl-C 0.3-0.6 s after the first killed it (rc -2):
    once `serve` has returned, Python's finalisation puts back the default handlers, which die of the signal, for its
    last ~0.5 s. Here the second SIGINT comes when the process no longer catches SIGINT itself."""
    server = start_server(checkpoints["original"], tmp_path / "data", "--rate-limit", "100000")
    try:
        server.process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 30
        try:
            while _catches_sigint(server.process.pid) and time.monotonic() < deadline:
                time.sleep(0.001)
            server.process.send_signal(signal.SIGINT)
        except (FileNotFoundError, ProcessLookupError):
            pass  # ended first
        assert server.process.wait(timeout=30) == 0
    finally:
        server.stop()


def test_a_second_sigint_drops_a_connection_still_sending_at_once(checkpoints, tmp_path):
    """Hunt round 23 A-F3: a connection whose client is still sending its body closes lingering (`LINGER_S`, for its
    answer to arrive), and a second Ctrl-C closed it the same way: the server waited out the linger before it exited.
    The second signal now drops it at once: the client's next sends meet a reset, long before LINGER_S."""
    server = start_server(checkpoints["original"], tmp_path / "data", "--rate-limit", "100000")
    try:
        body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}).encode()
        client = _post_raw(server, "/v1/chat/completions", body, send=10)
        time.sleep(1.0)  # the head and the first bytes have arrived
        server.process.send_signal(signal.SIGINT)
        status, _, _ = _answer(client)  # answered (503) and half closed: the server lingers for the rest of the body
        assert status == "HTTP/1.1 503 Service Unavailable"
        server.process.send_signal(signal.SIGINT)
        sent, started = 0, time.monotonic()
        with pytest.raises(OSError):
            while time.monotonic() - started < LINGER_S:
                client.sendall(b" " * 100)
                sent += 1
                time.sleep(0.02)
        assert time.monotonic() - started < LINGER_S / 2, f"the connection lingered after the second signal ({sent} sends)"
        server.process.wait(timeout=30)
    finally:
        server.stop()


def _frames(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) of each SSE frame."""
    out = []
    for block in text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in lines:
            out.append((lines.get("event"), lines["data"]))
    return out


def test_a_stream_cut_by_shutdown_ends_in_its_surfaces_error_shape(checkpoints, tmp_path):
    """Before: every stream ended with `{"error": {"message", "code": 3040}}`: on /v1 chat not OpenAI's error object
    (no type, no param, an integer code), on /v1/responses no Responses event at all (no `event:` line, no type, no
    sequence_number, no `response.failed`)."""
    import json

    server = start_server(checkpoints["original"], tmp_path / "data", "--rate-limit", "100000")
    bodies = {server.run_url(): {"prompt": "Hi", "max_tokens": LONG},
              f"{server.base}/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": LONG},
              f"{server.base}/v1/responses": {"model": MODEL, "input": "Hi", "max_output_tokens": LONG}}
    texts: dict[str, list[str]] = {url: [] for url in bodies}

    def read(url: str) -> None:
        with httpx.stream("POST", url, json={**bodies[url], "stream": True, "temperature": 0}, timeout=60) as r:
            for piece in r.iter_text():
                texts[url].append(piece)

    try:
        threads = [threading.Thread(target=read, args=(url,), daemon=True) for url in bodies]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while min("".join(t).count("data: ") for t in texts.values()) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)  # each stream is generating: its answer has begun
        server.process.terminate()
        for t in threads:
            t.join(timeout=30)
    finally:
        server.stop()
    run, chat, responses = (_frames("".join(texts[url])) for url in bodies)
    for frames in (run, chat, responses):
        assert frames[-1] == (None, "[DONE]")
    assert json.loads(run[-2][1]) == {"error": {"message": "The server is shutting down, please try again.", "code": 3040}}
    assert json.loads(chat[-2][1]) == {"error": {"message": "The server is shutting down, please try again.",
                                                 "type": "server_error", "param": None, "code": "3040"}}
    events = [json.loads(data) for _, data in responses[:-1]]
    assert [name for name, _ in responses[:-1]] == [e["type"] for e in events]  # every frame an event of its name
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    failed = events[-1]
    assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed"
    assert failed["response"]["error"] == {"code": "server_error", "message": "The server is shutting down, please try again."}
    assert failed["response"]["id"] == events[0]["response"]["id"] and failed["response"]["output"]


def test_response_failed_carries_the_output_streamed_so_far(checkpoints, tmp_path):
    """Before: `response.failed`'s response had the open item as it was opened (a message with `content: []` and
    `status: "in_progress"`, `output_text: ""`) while its usage counted every token: the partial answer was lost to a
    client reading the terminal object. Now each item holds its streamed text and none is left `in_progress`."""
    server = start_server(checkpoints["original"], tmp_path / "data", "--rate-limit", "100000")
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="x", timeout=60, max_retries=0)
    events: list = []

    def read() -> None:
        for event in client.responses.create(model=MODEL, input="Hi", max_output_tokens=LONG, temperature=0, stream=True):
            events.append(event)

    try:
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        deadline = time.monotonic() + 20
        while sum(e.type.endswith(".delta") for e in list(events)) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.process.terminate()
        reader.join(timeout=30)
    finally:
        server.stop()
    failed = events[-1]
    assert failed.type == "response.failed" and failed.response.status == "failed"
    streamed: dict[str, str] = {}
    for event in events:
        if event.type.endswith(".delta"):
            streamed[event.item_id] = streamed.get(event.item_id, "") + event.delta
    assert sum(map(len, streamed.values())) > 0
    output = failed.response.output
    assert [item.id for item in output] == [e.item.id for e in events if e.type == "response.output_item.added"]
    for item in output:
        held = item.arguments if item.type == "function_call" else "".join(part.text for part in item.content)
        assert held == streamed.get(item.id, "")
        assert item.type == "reasoning" or item.status in ("completed", "incomplete")
    assert output[-1].type == "reasoning" or output[-1].status == "incomplete"  # the failure cut it
    assert failed.response.output_text == "".join(streamed.get(item.id, "") for item in output if item.type == "message")


def _background_stream(server, seed: int, max_tokens: int = LONG):
    """A background stream's response, its id read from `response.created`, the connection still open."""
    import json

    response = httpx.stream("POST", f"{server.base}/v1/responses", timeout=60, json={
        "model": MODEL, "input": "Hi", "max_output_tokens": max_tokens, "background": True, "stream": True, "seed": seed})
    opened = response.__enter__()
    assert opened.status_code == 200
    lines = opened.iter_lines()
    for line in lines:
        if line.startswith("data: "):
            return response, json.loads(line[len("data: "):])["response"]["id"], lines
    pytest.fail("no response.created")


def _poll(server, rid: str, within: float = 30) -> dict:
    deadline = time.monotonic() + within
    while True:
        stored = httpx.get(f"{server.base}/v1/responses/{rid}", timeout=10).json()
        if stored.get("status") != "in_progress" or time.monotonic() > deadline:
            return stored
        time.sleep(0.05)


def test_a_background_stream_runs_on_when_its_client_leaves(server):
    """Before: a `background: true` stream whose connection dropped was aborted like any stream and never stored, so
    the retrieve OpenAI's background mode is made for was a 404. Now the run goes on to its end and is stored; while
    it runs, retrieve answers `in_progress` and `?stream=true` follows it (from the first event, or after
    `starting_after`) to its end."""
    import json

    for seed in range(8):
        response, rid, _ = _background_stream(server, seed, max_tokens=200)  # seconds of work here, not a minute
        response.__exit__(None, None, None)  # the client leaves
        running = httpx.get(f"{server.base}/v1/responses/{rid}", timeout=10)
        assert running.status_code == 200, running.text
        if running.json()["status"] == "in_progress":
            break
    else:
        pytest.fail("every background run ended before its client left")
    assert running.json()["background"] is True and running.json()["output"] == []
    with httpx.stream("GET", f"{server.base}/v1/responses/{rid}", params={"stream": "true", "starting_after": 1},
                      timeout=60) as followed:
        assert followed.headers["content-type"].startswith("text/event-stream")
        frames = [line[len("data: "):] for line in followed.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    events = [json.loads(data) for data in frames[:-1]]
    assert [e["sequence_number"] for e in events] == list(range(2, len(events) + 2))
    assert events[-1]["type"] in ("response.completed", "response.incomplete")
    stored = _poll(server, rid)
    assert stored == events[-1]["response"] and stored["status"] in ("completed", "incomplete")
    assert stored["usage"]["output_tokens"] > 0


def test_cancel_ends_a_running_background_response(server):
    """Before: no cancel route (404 7000), and a background run could not be stopped but by dropping its stream. Now
    `responses.cancel` aborts the engine request and the response is kept `cancelled` with the output made so far;
    cancelling it again returns it unchanged, and its open stream ends."""
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="x", timeout=60, max_retries=0)
    for seed in range(8):
        response, rid, lines = _background_stream(server, seed)
        try:
            cancelled = client.responses.cancel(rid)
        except openai.APIStatusError:
            response.__exit__(None, None, None)
            raise
        if cancelled.status == "cancelled":
            break
        response.__exit__(None, None, None)
    else:
        pytest.fail("every background run ended before it was cancelled")
    rest = [line for line in lines if line.startswith("data: ")]  # the stream ends
    response.__exit__(None, None, None)
    assert rest[-1] == "data: [DONE]"
    stats = server.wait_idle(within=1.0)
    assert stats["running"] == 0 and stats["waiting"] == 0, f"the cancelled run still runs: {stats}"
    assert client.responses.retrieve(rid).model_dump() == cancelled.model_dump()
    assert client.responses.cancel(rid).model_dump() == cancelled.model_dump()
    assert cancelled.background is True and cancelled.usage is not None


def _events_of(lines) -> list[dict]:
    """The JSON events of an SSE stream's `data:` lines, up to its `[DONE]` (which must come)."""
    import json

    data = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]", data[-3:]
    return [json.loads(item) for item in data[:-1]]


def _resumed(server, rid: str, after: int) -> list[dict]:
    """`GET /v1/responses/{id}?stream=true&starting_after=after`: the events it sends."""
    with httpx.stream("GET", f"{server.base}/v1/responses/{rid}", params={"stream": "true", "starting_after": after},
                      timeout=60) as resumed:
        assert resumed.status_code == 200, resumed.read()
        return _events_of(resumed.iter_lines())


@pytest.fixture(scope="module")
def stopped_under_a_run(checkpoints, tmp_path_factory):
    """A server stopped (SIGTERM) while a background run it had streamed 20 events of was going, then started again on
    its data directory: (the new server, the response's id, the last sequence_number its client saw)."""
    data = tmp_path_factory.mktemp("data-restart")
    first = start_server(checkpoints["original"], data, "--rate-limit", "100000")
    try:
        for seed in range(8):
            response, rid, lines = _background_stream(first, seed)
            seen: list[str] = []
            for line in lines:
                if line.startswith("data: "):
                    seen.append(line)
                if len(seen) == 20 or line == "data: [DONE]":
                    break
            if seen[-1] != "data: [DONE]":
                break
            response.__exit__(None, None, None)
        else:
            pytest.fail("every background run ended within 20 events")
        import json

        last_seen = json.loads(seen[-1][len("data: "):])["sequence_number"]
        first.process.terminate()
        first.process.wait(timeout=30)
        response.__exit__(None, None, None)
    finally:
        first.stop()
    second = start_server(checkpoints["original"], data, "--rate-limit", "100000")
    yield second, rid, last_seen
    second.stop()


def test_a_resume_after_a_restart_still_gets_the_end(stopped_under_a_run):
    """Before (hunt_new H1): after a restart the run's frames are gone and the replay of the stored (`failed`) response
    has a few events; resuming with the last number the client saw (past the replay's) got none, so the client never
    learned the run had failed. Now the replay always ends with its terminal event, numbered after the cursor when the
    cursor is past the replay's own numbering."""
    server, rid, last_seen = stopped_under_a_run
    stored = httpx.get(f"{server.base}/v1/responses/{rid}", timeout=10).json()
    assert stored["status"] == "failed"
    resumed = _resumed(server, rid, last_seen)
    assert [(e["type"], e["sequence_number"]) for e in resumed] == [("response.failed", last_seen + 1)]
    assert resumed[0]["response"] == stored
    whole = _resumed(server, rid, 0)  # a cursor inside the replay's numbering reads the replay from there
    assert whole[0]["sequence_number"] == 1 and whole[-1]["type"] == "response.failed"
    assert [e["sequence_number"] for e in whole] == list(range(1, len(whole) + 1))


def test_a_failed_background_response_cannot_be_continued(stopped_under_a_run):
    """Before (hunt_new L2): a background response stored `failed` (here: the server stopped under it) was accepted
    as `previous_response_id`, and the model continued a conversation whose last turn never happened; a failed
    response that is not in the background is not stored at all, so naming it is a 400. Now both are that 400."""
    server, rid, _ = stopped_under_a_run
    answer = httpx.post(f"{server.base}/v1/responses", timeout=60,
                        json={"model": MODEL, "input": "Go on", "max_output_tokens": 4, "previous_response_id": rid})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "previous_response_id" and error["code"] == "5006" and "failed" in error["message"]
    counted = httpx.post(f"{server.base}/v1/responses/input_tokens", timeout=60,
                         json={"model": MODEL, "input": "Go on", "previous_response_id": rid})
    assert counted.status_code == 400 and counted.json()["error"] == error


def test_deleting_a_running_background_response_cancels_it_for_good(server):
    """Before (hunt_new M1): DELETE of a running background response answered `deleted`, but the run went on and
    stored it again when it ended (retrieve, input_items and previous_response_id worked again; a later cancel stored
    it too). Now DELETE cancels the run first; the id stays a 404 everywhere."""
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="x", timeout=60, max_retries=0)
    for seed in range(8):
        response, rid, lines = _background_stream(server, seed)
        if httpx.get(f"{server.base}/v1/responses/{rid}", timeout=10).json()["status"] == "in_progress":
            break
        response.__exit__(None, None, None)
    else:
        pytest.fail("every background run ended before it was deleted")
    assert client.responses.delete(rid) is None  # the SDK's delete returns nothing on success
    rest = [line for line in lines if line.startswith("data: ")]  # the creator's stream ends (or ran to its end)
    response.__exit__(None, None, None)
    assert rest[-1] == "data: [DONE]"
    for path, params in ((rid, {}), (rid, {"stream": "true"}), (rid, {"stream": "true", "starting_after": 3}),
                         (f"{rid}/input_items", {})):
        gone = httpx.get(f"{server.base}/v1/responses/{path}", params=params, timeout=10)
        assert gone.status_code == 404, (path, params, gone.text[:200])
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel(rid)
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, input="Go on", max_output_tokens=4, previous_response_id=rid)
    assert caught.value.body["param"] == "previous_response_id"
    assert httpx.get(f"{server.base}/v1/responses/{rid}", timeout=10).status_code == 404  # still, after the cancel
    stats = server.wait_idle(within=1.0)
    assert stats["running"] == 0 and stats["waiting"] == 0, f"the deleted response's run still runs: {stats}"


def test_a_background_responses_input_items_keep_their_ids_when_it_ends(server):
    """Before (hunt_new L1): the `in_progress` snapshot and the final response were each stored giving the input items
    new ids, so `input_items` listed other ids once the run had ended, and the snapshot's item rows were left behind
    (INSERT OR REPLACE fires no delete trigger). Now an item gets its id once and a response's rows are its own."""
    import sqlite3

    for seed in range(8):
        response, rid, lines = _background_stream(server, seed, max_tokens=200)
        running = httpx.get(f"{server.base}/v1/responses/{rid}/input_items", timeout=10).json()
        if httpx.get(f"{server.base}/v1/responses/{rid}", timeout=10).json()["status"] == "in_progress":
            break
        response.__exit__(None, None, None)
    else:
        pytest.fail("every background run ended before its input items were listed")
    assert _events_of(lines)[-1]["type"] in ("response.completed", "response.incomplete")
    response.__exit__(None, None, None)
    stored = _poll(server, rid)
    assert stored["status"] in ("completed", "incomplete")
    ended = httpx.get(f"{server.base}/v1/responses/{rid}/input_items", timeout=10).json()
    assert [item["id"] for item in ended["data"]] == [item["id"] for item in running["data"]]
    db = sqlite3.connect(server.data_dir / "batch.sqlite")
    try:
        rows = {row[0] for row in db.execute("SELECT id FROM response_items WHERE response_id = ?", (rid,))}
    finally:
        db.close()
    assert rows == {item["id"] for item in ended["data"]} | {item["id"] for item in stored["output"]}
