"""`x-request-id`: every answer names its request, and the server's log line for that answer carries the same id.

OpenAI sends the header on every answer, and its SDKs hand it to the caller (`response._request_id`,
`with_raw_response.request_id`, `APIStatusError.request_id`) for bug reports; with it, one call is found in this
server's log (`ossrun serve -v`: one line per answer, 5xx ones at warning level).

The id is always the server's own (`req_` and 32 hex digits, as OpenAI spells its ids), never a client's
`x-request-id`: an id must name one request, and a client's may repeat (an SDK's retries resend the same
headers, a proxy may reuse one) or hold anything. An incoming `x-request-id` or `x-client-request-id` (OpenAI's
header for a caller's own id) is logged beside ours instead, so a client's or proxy's trace still finds the line.
"""

from __future__ import annotations

import contextvars
import logging
import secrets
import time
from typing import Any
from urllib.parse import quote

from starlette.datastructures import MutableHeaders

log = logging.getLogger(__name__)

HEADER = "x-request-id"
CLIENT_HEADERS = (b"x-request-id", b"x-client-request-id")
MAX_LOGGED_CLIENT_ID = 128  # a client's id is logged cut to this, and quoted: it is text the server did not write
# What a logged path keeps as is: the URL's own punctuation and existing %-escapes; a space, a control character or
# a byte beyond ASCII is %-escaped.
PATH_SAFE = "/!$&'()*+,;=:@%~"

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def current() -> str | None:
    """The id of the request this task serves (None outside one): for log lines written deeper down, such as a
    stream's failure."""
    return _current.get()


def new_request_id() -> str:
    return f"req_{secrets.token_hex(16)}"


def of_scope(scope: dict[str, Any]) -> str | None:
    """The id `RequestIds` gave this request (error handlers outside the middleware read it here)."""
    return scope.get("state", {}).get("request_id")


def _client_ids(scope: dict[str, Any]) -> str:
    """The client's own ids, as ` x-request-id='…'` (cut and quoted)."""
    return "".join(f" {name.decode()}={value.decode('latin-1')[:MAX_LOGGED_CLIENT_ID]!r}"
                   for name, value in scope["headers"] if name in CLIENT_HEADERS)


def escaped(text: str | bytes) -> str:
    """`text` for a field of a log line: a space, a control character or a byte beyond ASCII %-escaped, since a CR or
    LF would write forged lines into the log and a space would forge the fields of its own line (status, id, client)."""
    return quote(text, safe=PATH_SAFE)


def logged_path(scope: dict[str, Any]) -> str:
    """The path as the client sent it (`raw_path`, still %-encoded), `escaped`: the decoded path may hold a CR or LF
    (`%0d%0a`) or spaces."""
    return escaped(scope.get("raw_path") or scope["path"].encode())


def logged_client(scope: dict[str, Any]) -> str:
    """The client's address, `escaped`: behind a proxy it is text the proxy forwarded (`TrustedProxies.client` keeps
    only IP addresses; this holds whatever else sets `scope["client"]`)."""
    client = scope.get("client")
    return escaped(str(client[0])) if client else "?"


def log_answer(scope: dict[str, Any], status: int, seconds: float) -> None:
    """The request's one log line: method, path, status, time to the answer's start (a stream's first byte), ids."""
    level = logging.WARNING if status >= 500 else logging.INFO
    log.log(level, "%s %s %d %.3fs request_id=%s client=%s%s", scope["method"], logged_path(scope), status, seconds,
            of_scope(scope), logged_client(scope), _client_ids(scope))


class RequestIds:
    """Outermost: gives each HTTP request its id, sends it as `x-request-id` on the answer's start (success,
    error and stream alike) and logs the answer's line. A route's unhandled exception is answered 500 by the
    app's guard, inside this middleware; only an error outside the guard reaches the handler on Starlette's
    ServerErrorMiddleware, which adds the header itself."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id, started = new_request_id(), time.monotonic()
        scope.setdefault("state", {})["request_id"] = request_id  # the same dict the error handlers' scope holds
        token = _current.set(request_id)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = request_id
                log_answer(scope, message["status"], time.monotonic() - started)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _current.reset(token)
