"""`x-request-id` on the real server: every answer (sync, stream, error, on both surfaces) carries a unique id
of the server's own, the openai SDK hands it to the caller, and the server's log line for that answer has it."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from tests.server_util import MODEL

HI = [{"role": "user", "content": "What is 2 + 3?"}]
REQUEST_ID = re.compile(r"req_[0-9a-f]{32}")


@pytest.fixture(scope="module")
def server(demo_server):
    return demo_server


def test_every_answer_names_its_request(server):
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="secret", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HI, max_tokens=40, temperature=0)
    assert REQUEST_ID.fullmatch(raw.request_id) and raw.parse()._request_id == raw.request_id
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=HI, temperature=9)
    assert REQUEST_ID.fullmatch(refused.value.request_id)
    with httpx.stream("POST", f"{server.base}/v1/chat/completions", headers=server.headers, timeout=120,
                      json={"model": MODEL, "messages": HI, "max_tokens": 20, "stream": True}) as stream:
        stream.read()
    ids = [raw.request_id, refused.value.request_id, stream.headers["x-request-id"]]
    for answer in (httpx.post(server.run_url(), json={"prompt": "Hi", "max_tokens": 5}, headers=server.headers, timeout=120),
                   httpx.get(f"{server.base}/v1/nowhere", headers=server.headers),
                   httpx.get(f"{server.base}/v1/models")):  # 200 on /ai/run, 404, 403 (no token)
        ids.append(answer.headers["x-request-id"])
    assert all(REQUEST_ID.fullmatch(i) for i in ids) and len(set(ids)) == len(ids)


def test_the_log_line_of_an_answer_has_its_id_and_the_clients(server):
    """The id is always the server's (unique): a client's own `x-request-id` is logged beside it, not reused."""
    ids = [httpx.post(server.run_url(), json={"prompt": "Hi", "max_tokens": 3}, timeout=120,
                      headers={**server.headers, "x-request-id": "trace-42"}).headers["x-request-id"] for _ in range(2)]
    assert ids[0] != ids[1] and "trace-42" not in ids
    log = server.log.read_text()
    for request_id in ids:
        line = next(line for line in log.splitlines() if f"request_id={request_id}" in line)
        assert "POST /client/v4/accounts/acct/ai/run/@cf/openai/gpt-oss-20b 200 " in line and "x-request-id='trace-42'" in line


def test_the_startup_banner_shows_how_to_pass_the_token_not_the_token(server):
    banner = [line for line in server.log.read_text().splitlines() if "curl " in line or "OpenAI SDK" in line]
    assert len(banner) == 2 and all(server.token not in line for line in banner), banner
    assert '"Authorization: Bearer $OSSRUN_API_TOKEN"' in banner[0] and "os.environ['OSSRUN_API_TOKEN']" in banner[1]
