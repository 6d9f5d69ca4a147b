"""What a hostile client gets from the real server that the token does not cover (hunt_security round 4, #4, #6, #7):
web pages the user opens (cross-origin "simple" POSTs, DNS rebinding) against a server without `--api-token`,
forged lines in the `-v` log, and guessing the token at full speed."""

from __future__ import annotations

import httpx
import openai
import pytest

from pathlib import Path

from tests.server_util import MODEL, Server, start_server

LISTED = "http://app.example:3000"
EVIL = "http://evil.example"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
FINETUNES = "/client/v4/accounts/acct/ai/finetunes"


def demo_server(data_dir: Path, *args: str, token: str | None = None) -> Server:
    from ossrun.model.resolve import resolve_model

    return start_server(resolve_model("demo"), data_dir, "--rate-limit", "0", *args, token=token)


@pytest.fixture(scope="module")
def open_server(tmp_path_factory):
    """The default setup the attacks target: loopback, no token."""
    s = demo_server(tmp_path_factory.mktemp("browsers"), "-v")
    yield s
    s.stop()


def post_text(server: Server, path: str, body: str, **headers: str) -> httpx.Response:
    """A body as a page's `fetch(url, {method: "POST", mode: "no-cors", body})` sends it: text/plain, no preflight."""
    return httpx.post(server.base + path, content=body, timeout=60, headers={"Content-Type": "text/plain;charset=UTF-8", **headers})


def test_a_page_from_another_origin_cannot_drive_a_server_without_token(open_server):
    """Served before: a chat answer, a fine-tune created and an adapter config uploaded by any web page."""
    chat = post_text(open_server, "/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": "Hi"}]}' % MODEL,
                     Origin=EVIL)
    assert chat.status_code == 403 and "evil.example" in chat.json()["error"]["message"]
    assert "access-control-allow-origin" not in chat.headers  # its page reads nothing, not even why
    planted = post_text(open_server, FINETUNES, '{"model": "%s", "name": "planted"}' % MODEL, Origin="null")
    assert planted.status_code == 403 and planted.json()["errors"][0]["code"] == 10000
    upload = httpx.post(open_server.base + FINETUNES + "/planted/finetune-assets", headers={"Origin": EVIL}, timeout=60,
                        data={"file_name": "adapter_config.json"}, files={"file": ("adapter_config.json", b'{"r": 8}')})
    assert upload.status_code == 403
    assert "planted" not in httpx.get(open_server.base + FINETUNES, timeout=60).text
    preflight = httpx.options(open_server.base + "/v1/chat/completions", timeout=60,
                              headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers


def test_clients_without_origin_and_the_servers_own_pages_are_served(open_server):
    client = openai.OpenAI(base_url=f"{open_server.base}/v1", api_key="unused", max_retries=0)
    assert client.chat.completions.create(**CHAT).choices[0].finish_reason in ("stop", "length")
    own = httpx.post(open_server.base + "/v1/chat/completions", json=CHAT, headers={"Origin": open_server.base}, timeout=60)
    assert own.status_code == 200 and "access-control-allow-origin" not in own.headers  # same origin: no CORS needed
    https_proxy = httpx.get(open_server.base + "/v1/models", headers={"Origin": f"https://127.0.0.1:{open_server.port}"}, timeout=60)
    assert https_proxy.status_code == 200  # behind a TLS proxy the page is https and the server sees http


def test_a_rebinding_host_is_refused_and_local_names_are_not(open_server):
    """A DNS-rebinding page reaches 127.0.0.1 under its own name, and the browser lets it read the answers."""
    port = open_server.port
    rebound = httpx.get(open_server.base + "/v1/models", headers={"Host": f"rebind.evil.example:{port}"}, timeout=60)
    assert rebound.status_code == 403 and "rebind.evil.example" in rebound.json()["error"]["message"]
    assert httpx.get(open_server.base + "/health", headers={"Host": f"rebind.evil.example:{port}"}, timeout=60).status_code == 403
    for host in (f"localhost:{port}", f"LocalHost.:{port}", f"ui.localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}",
                 f"10.1.2.3:{port}"):  # local names and IP literals: no DNS answer makes a browser send them for a page
        assert httpx.get(open_server.base + "/v1/models", headers={"Host": host}, timeout=60).status_code == 200, host


def test_a_listed_origin_gets_cors(tmp_path):
    """`--allowed-origins`: what a web app on another origin needs, a preflight answered and the answers readable;
    the origin's host is a name the server answers to (a proxy in front of it may keep `Host`)."""
    open_server = demo_server(tmp_path, "--allowed-origins", f"{LISTED}/,http://localhost:5173")
    try:
        _check_cors(open_server)
        assert httpx.get(open_server.base + "/v1/models", headers={"Host": "app.example"}, timeout=60).status_code == 200
        assert httpx.get(open_server.base + "/v1/models", headers={"Origin": EVIL}, timeout=60).status_code == 403
    finally:
        open_server.stop()


def _check_cors(open_server: Server) -> None:
    preflight = httpx.options(open_server.base + "/v1/chat/completions", timeout=60,
                              headers={"Origin": LISTED, "Access-Control-Request-Method": "POST",
                                       "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
                                       "Access-Control-Request-Private-Network": "true"})
    assert preflight.status_code == 204, preflight.text
    assert preflight.headers["access-control-allow-origin"] == LISTED
    assert set(preflight.headers["access-control-allow-methods"].replace(" ", "").split(",")) == {"OPTIONS", "POST"}
    assert preflight.headers["access-control-allow-headers"] == "authorization, content-type, x-stainless-os"
    assert preflight.headers["access-control-allow-private-network"] == "true"
    answer = httpx.post(open_server.base + "/v1/chat/completions", json=CHAT, headers={"Origin": LISTED}, timeout=60)
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == LISTED
    assert "x-request-id" in answer.headers["access-control-expose-headers"] and "Origin" in answer.headers["vary"]


def test_a_path_cannot_forge_log_lines(open_server):
    """A percent-encoded CR/LF in the path wrote a line of the client's choosing, looking like the server's own."""
    forged = "2026-12-01 22:20:00,000 INFO ossrun.api.request_ids: POST /v1/chat/completions 200 0.100s request_id=req_forged"
    path = "/v1/x%0a" + forged.replace(" ", "%20") + "%0d"
    answer = httpx.get(open_server.base + path, timeout=60)
    assert answer.status_code == 404
    lines = open_server.log.read_text().splitlines()
    assert not any(line.startswith("2026-12-01 22:20:00,000") for line in lines)
    line = next(line for line in lines if answer.headers["x-request-id"] in line)
    assert " GET /v1/x%0a2026-12-01%2022:20:00,000%20INFO" in line and line.endswith("client=127.0.0.1")


def test_a_token_server_answers_any_host(tmp_path):
    """With a token a rebinding page has nothing to read: the token guards, and proxies may name the server freely. Wrong
    tokens are bounded per client address; the right one is refused too while the address guesses, or guessing would
    go on at full speed."""
    server = demo_server(tmp_path, token="secret")
    try:
        url = server.base + "/v1/models"
        assert httpx.get(url, headers={**server.headers, "Host": "models.example.com"}, timeout=60).status_code == 200
        assert {httpx.get(url, timeout=60).status_code for _ in range(25)} == {401}  # OpenAI's status on /v1; no token is no guess (a browser on /docs)
        assert [httpx.get(url, headers={"Authorization": f"Bearer guess{i}"}, timeout=60).status_code for i in range(20)] == [401] * 20
        for headers in ({"Authorization": "Bearer guess20"}, server.headers):
            blocked = httpx.get(url, headers=headers, timeout=60)
            assert blocked.status_code == 429 and 1 <= int(blocked.headers["Retry-After"]) <= 60
            assert "wrong API tokens" in blocked.json()["error"]["message"]
        assert httpx.get(server.base + "/health", timeout=60).status_code == 200  # open paths stay open
        warnings = [line for line in server.log.read_text().splitlines() if "wrong API tokens" in line]
        assert len(warnings) == 1 and "WARNING" in warnings[0] and "127.0.0.1" in warnings[0]
    finally:
        server.stop()


# -- hunt_edges round 5: origins that can never match (#2), a proxy that rewrites Host (#3), `*` proxies (#4) --------

PROXY = "127.0.0.7"  # a second loopback address: the "proxy" the servers below trust, where 127.0.0.1 is a client


def _get(server: Server, source: str = "127.0.0.1", path: str = "/v1/models", **headers: str) -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=60) as client:
        return client.get(server.base + path, headers={**server.headers, **headers})


def test_listed_wildcards_and_default_ports_match_and_refusals_name_the_list(tmp_path):
    """Before: `https://*.example.com`, `http://localhost:*` and `https://app.example.com:443` were taken and never
    matched a browser's `Origin` (all three pages got a 403 telling the operator to use the flag they had set)."""
    server = demo_server(tmp_path, "--allowed-origins", "https://*.example.com,http://localhost:*,https://app.example.com:443",
                         "--forwarded-allow-ips", PROXY)
    try:
        for origin in ("https://a.example.com", "https://b.c.example.com", "http://localhost:5173", "http://localhost",
                       "https://app.example.com"):
            answer = _get(server, Origin=origin)
            assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == origin, (origin, answer.text)
        for origin in ("https://example.com", "http://a.example.com", "https://a.example.com:8443", "https://localhost:5173"):
            refused = _get(server, Origin=origin)
            assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers, origin
            message = refused.json()["error"]["message"]
            assert repr(origin) in message and "https://*.example.com, http://localhost:*, https://app.example.com" in message
        assert _get(server, Host="api.example.com").status_code == 200  # a listed pattern's names are answered
        # A page whose proxy's X-Forwarded-Host is not believed (127.0.0.1 is no proxy named) is told why.
        untrusted = _get(server, Origin="https://llm.example.org", **{"X-Forwarded-Host": "llm.example.org"})
        assert untrusted.status_code == 403 and "--forwarded-allow-ips" in untrusted.json()["error"]["message"]
        # From the proxy named, a DNS-rebinding page's name is still no local name: its own origin does not count.
        rebound = _get(server, PROXY, Origin="http://evil.example", **{"X-Forwarded-Host": "evil.example"})
        assert rebound.status_code == 403 and "evil.example" in rebound.json()["error"]["message"]
    finally:
        server.stop()


@pytest.fixture(scope="module")
def any_proxy_server(tmp_path_factory):
    """A token server that believes any peer's proxy headers, as in Docker where the proxy's address is not known."""
    s = demo_server(tmp_path_factory.mktemp("any-proxy"), "--forwarded-allow-ips", "*", token="secret")
    yield s
    s.stop()


def test_the_playground_behind_a_proxy_that_rewrites_host_is_its_own_origin(any_proxy_server):
    """Before: nginx's default `proxy_set_header Host $proxy_host` made the playground's own requests foreign (`Origin`
    the public name, `Host` the upstream's): every one a 403, whatever --forwarded-allow-ips said."""
    server = any_proxy_server
    proxied = {"Host": f"127.0.0.1:{server.port}", "Origin": "https://llm.example.com", "X-Forwarded-Host": "llm.example.com",
               "X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
    page = httpx.post(server.base + "/v1/chat/completions", json=CHAT, headers={**server.headers, **proxied}, timeout=60)
    assert page.status_code == 200 and "access-control-allow-origin" not in page.headers, page.text
    assert _get(server, **{**proxied, "Origin": "https://evil.example"}).status_code == 403


def test_the_playground_on_a_non_default_port_behind_nginx_host_is_its_own_origin(any_proxy_server):
    """hunt_proxy #3: nginx's usual `proxy_set_header X-Forwarded-Host $host` carries no port, and the page's `Origin`
    on `listen 8443` has `:8443`: every playground request was a 403. The name decides; another site's page does not
    pass, nor does a port the proxy did name."""
    server = any_proxy_server
    proxied = {"Host": f"127.0.0.1:{server.port}", "Origin": "https://llm.example.com:8443",
               "X-Forwarded-Host": "llm.example.com", "X-Forwarded-For": "203.0.113.9"}
    page = httpx.post(server.base + "/v1/chat/completions", json=CHAT, headers={**server.headers, **proxied}, timeout=60)
    assert page.status_code == 200 and "access-control-allow-origin" not in page.headers, page.text
    assert _get(server, **{**proxied, "Origin": "https://evil.example:8443"}).status_code == 403
    assert _get(server, **{**proxied, "X-Forwarded-Host": "llm.example.com:9443"}).status_code == 403


def test_any_proxy_takes_the_address_the_proxy_saw_and_warns(any_proxy_server):
    """Before: with `--forwarded-allow-ips '*'` uvicorn took the leftmost X-Forwarded-For entry, which the client writes
    (a proxy appends the address it saw): guesses at the token from rotating made-up addresses were never slowed, and
    without a token the rate limit was void too. Now the rightmost entry counts, and the start warns that a client
    reaching the port directly still names itself."""
    server = any_proxy_server
    guesses = [_get(server, Authorization=f"Bearer guess{i}", **{"X-Forwarded-For": f"198.51.100.{i}, 127.0.0.1"}).status_code
               for i in range(21)]
    assert guesses == [401] * 20 + [429]  # OpenAI's status for a wrong key on /v1
    lines = server.log.read_text().splitlines()
    assert len([line for line in lines if "--forwarded-allow-ips '*'" in line and "WARNING" in line]) == 1
