"""The FastAPI app, built by a factory that takes the engine (so tests run it on the tiny model).

Cross-cutting checks live here as one middleware, in the order a request meets them: a browser's `Host` and
`Origin` (a CORS preflight answered there), body size, authentication (wrong-token streaks first), rate limit.
Errors leave in the envelope of the surface they came in on. Around it, HEAD is answered as GET without the body,
an absolute-form target is read as its path, every request gets its `x-request-id` and its log line
(`request_ids.py`), and outermost a trusted proxy's `X-Forwarded-*` headers are read (`ForwardedHeaders`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from ossrun.api import body, docs_page, openai_routes, playground, request_ids, workers_ai
from ossrun.api.access import (BrowserPolicy, RateLimiter, TrustedProxies, WrongTokens, bearer_token, client_address,
                               host_name, token_matches)
from ossrun.api.disconnect import KEEPALIVE_S, Stopping, unless_stopping
from ossrun.api.errors import (AUTH_FAILED, CLIENT_GONE, ApiError, bad_input, envelope_error, is_openai_path, openai_error,
                               openai_unauthorized, param_of, rate_limited, refused, too_large)
from ossrun.api.metering import Metering
from ossrun.api.service import Service
from ossrun.batch.store import SQLiteBatchStore
from ossrun.engine.client import EngineClient
from ossrun.batch.worker import BatchWorker
from ossrun.connections import REFUSED
from ossrun.finetunes import MAX_ASSET_BYTES, FinetuneStore
from ossrun.storage import DATABASE

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 10 * 1024 * 1024
# Adapter uploads may be up to 300 MB (spec §7); the multipart framing needs a little more (under a MB: the 413 says 300).
MAX_ASSET_BODY_BYTES = MAX_ASSET_BYTES + 64 * 1024


# Liveness and metrics stay open for probes and scrapers; the API document is behind the token like the API.
OPEN_PATHS = frozenset({"/health", "/metrics"})


def body_limit(path: str) -> int:
    # `…/finetune-assets/` too: the route is served with a trailing `/`, as Cloudflare's curl commands write it
    return MAX_ASSET_BODY_BYTES if path.endswith(("/finetune-assets", "/finetune-assets/")) else MAX_BODY_BYTES


class RequestBody:
    """The body as routes read it: capped, decoded and on time. Counts the bytes a body really has, so a chunked
    upload without Content-Length meets the same cap, and decodes `Content-Encoding: gzip` / `deflate` with the cap on
    the decoded bytes too (`body.decoder`: another coding is a 415, a corrupt stream a 400), handing a network chunk's
    decoded bytes on a piece at a time (`body.DECODED_PIECE`: one chunk may inflate to hundreds of MB). A body that stops
    coming is a 408 (`body.BodyClock`); once it is complete, waiting on the connection (for a client that leaves)
    is not timed. A body still arriving when the server starts shutting down (`stopping`, set by the drain) is the 503
    "shutting down" at once: waited on, it was cancelled at the end of uvicorn's grace period, which answers a bare 500.

    Raising from `receive` lands in the route, whose exception handler answers in the surface's envelope; a route
    that reads no body is never refused for it.
    """

    def __init__(self, app, stopping: Stopping, patience_s: float = 30.0):
        self.app = app
        self.stopping = stopping
        self.patience_s = patience_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, seen, decoder = body_limit(scope["path"]), 0, None
        coding = ", ".join(value.decode("latin-1") for name, value in scope["headers"] if name == b"content-encoding")
        clock: body.BodyClock | None = body.BodyClock(self.patience_s)
        pieces: Iterator[bytes] | None = None  # the decoded pieces of the last message, handed on one a call
        ended = False  # that message was the body's last

        async def counted():
            nonlocal seen, decoder, clock, pieces, ended
            while True:
                if pieces is not None:
                    if (piece := next(pieces, None)) is not None:
                        return {"type": "http.request", "body": piece, "more_body": True}
                    pieces = None
                    if ended:
                        return {"type": "http.request", "body": b"", "more_body": False}
                message = await (unless_stopping(self.stopping, clock.next(receive)) if clock is not None else receive())
                if refusal := scope["state"].get(REFUSED):  # the server could not read the rest (a malformed chunk)
                    raise refused(*refusal)
                if message["type"] != "http.request":
                    return message
                ended = not message.get("more_body", False)
                if ended:
                    clock = None  # the body is complete
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise too_large(limit)
                if coding and decoder is None:
                    decoder = body.decoder(coding, limit)  # None for identity; a 415 for a coding we cannot decode
                if decoder is None:
                    return message
                pieces = decoder.pieces(message.get("body", b""), final=ended)

        await self.app(scope, counted, send)


# RFC 9112 §3.2.2: "a server MUST accept the absolute-form in requests" (`POST http://host/v1/... HTTP/1.1`).
ABSOLUTE_FORM = re.compile(rb"(?i)https?://(?:[^/@]*@)?([^/]*)(/.*)?")


class OriginForm:
    """An absolute-form request target served as its origin form: uvicorn hands the whole target over as the path,
    which no route matches. The target's authority stands for the Host header, as the RFC says. Outside every check,
    so each sees the path."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (target := ABSOLUTE_FORM.fullmatch(scope.get("raw_path") or scope["path"].encode())):
            authority, path = target[1], target[2] or b"/"
            headers = [(name, value) for name, value in scope["headers"] if name != b"host"] + [(b"host", authority)]
            scope = {**scope, "raw_path": path, "path": unquote(path.decode("latin-1")), "headers": headers}
        await self.app(scope, receive, send)


FORWARDED_HOST = "forwarded_host"  # in the request's state: the `X-Forwarded-Host` of a trusted proxy


class ForwardedHeaders:
    """`X-Forwarded-For`, `-Proto` and `-Host` from the peers `--forwarded-allow-ips` names (`access.TrustedProxies`),
    never from another: the client's address (rate limit, wrong-token streaks, the log line), the scheme, and the host
    the browser asked for, which the same-origin check uses (nginx passes its upstream's name as `Host` by default).
    In the app rather than uvicorn's proxy headers: those cannot tell the app whether the peer was trusted, and with
    `*` they take the leftmost `X-Forwarded-For` entry, which the client wrote. Outermost, so every layer sees the
    client's address."""

    def __init__(self, app, proxies: TrustedProxies):
        self.app = app
        self.proxies = proxies

    async def __call__(self, scope, receive, send):
        peer = scope.get("client")
        if scope["type"] == "http" and self.proxies and self.proxies.trusts(peer[0] if peer else None):
            scope = self._believed(scope)
        await self.app(scope, receive, send)

    def _believed(self, scope) -> dict:
        """`scope` as the proxy's headers tell it: for the scheme and the host, the proxy's own (rightmost) entry."""
        values: dict[bytes, list[str]] = {}
        for name, value in scope["headers"]:
            if name.startswith(b"x-forwarded-"):
                values.setdefault(name, []).append(value.decode("latin-1"))
        joined = {name: ", ".join(values.get(name, [])) for name in (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host")}
        scope = {**scope, "state": scope.get("state", {})}  # the dict the request's `state` reads
        if client := self.proxies.client(joined[b"x-forwarded-for"]):
            scope["client"] = (client, 0)
        if (proto := joined[b"x-forwarded-proto"].rpartition(",")[2].strip().lower()) in ("http", "https"):
            scope["scheme"] = proto
        if host := joined[b"x-forwarded-host"].rpartition(",")[2].strip():
            scope["state"][FORWARDED_HOST] = host
        return scope


@dataclass
class AppSettings:
    data_dir: Path
    api_token: str | None = None
    rate_limit_per_minute: int = 300
    request_timeout_s: float = 600.0
    client_timeout_s: float = 30.0  # a body's patience (body.BodyClock); the server has the same for headers
    max_batch_requests: int = 1000
    batch_concurrency: int = 16
    batch_retention_s: float = 7 * 24 * 3600
    loras: dict[str, Path] = field(default_factory=dict)
    allowed_origins: tuple[str, ...] = ()  # web origins besides the server's own that may call (`access.parse_origins`)
    local_hosts: tuple[str, ...] | None = None  # on loopback: more `Host` names to answer (`access.BrowserPolicy`)
    forwarded_allow_ips: str | None = None  # proxies whose X-Forwarded-* headers are believed (`access.TrustedProxies`)
    sse_keepalive_s: float = KEEPALIVE_S  # a silent stream's keep-alive interval (`disconnect.with_keepalives`)
    conversation_date: str = "today"  # the system message's date: `harmony.check_conversation_date`'s settings


def _error_response(path: str, error: ApiError) -> JSONResponse:
    return openai_error(error) if is_openai_path(path) else envelope_error(error)


def _declared_too_large(request: Request) -> JSONResponse | None:
    """413 for a `Content-Length` over the path's cap, before anything reads the body (`RequestBody` counts the rest)."""
    try:
        length = int(request.headers.get("content-length") or 0)
    except ValueError:
        length = 0
    limit = body_limit(request.url.path)
    return _error_response(request.url.path, too_large(limit)) if length > limit else None


def _retry_later(path: str, error: ApiError, wait: int) -> JSONResponse:
    response = _error_response(path, error)
    response.headers["Retry-After"] = str(wait)
    return response


def _refusal(request: Request, settings: AppSettings, limiter: RateLimiter, wrong_tokens: WrongTokens) -> JSONResponse | None:
    """429 for an address in a wrong-token streak (its token not even looked at), 403 for a missing or wrong token (401,
    OpenAI's, on the bare `/v1` surface),
    429 (with `Retry-After`) over the rate limit; None: go on."""
    path = request.url.path
    address = client_address(request)
    token = bearer_token(request.headers.get("authorization"))
    if settings.api_token:
        if wait := wrong_tokens.retry_after(address):
            return _retry_later(path, ApiError(429, 3036, "Rate limit exceeded: too many wrong API tokens from this client "
                                                          "address, try again later."), wait)
        if not token_matches(token, settings.api_token):
            if token is not None:  # a missing token is no guess (a browser opening /docs)
                wrong_tokens.failed(address)
            return openai_unauthorized(token is not None) if path.startswith("/v1/") else _error_response(path, ApiError(*AUTH_FAILED))
    wait = limiter.retry_after(token if settings.api_token else address) if request.method == "POST" else 0
    return _retry_later(path, rate_limited("token" if settings.api_token else "client address"), wait) if wait else None


def _refused(request: Request) -> JSONResponse | None:
    """The answer to a request the server's HTTP protocol refused before any route (`connections.REFUSED`): one h11
    could not parse, with both Content-Length and Transfer-Encoding, or with a head too large; None: go on."""
    refusal = request.scope["state"].get(REFUSED)
    if refusal is None:
        return None
    error = refused(*refusal)
    response = _error_response(request.url.path, error)
    response.headers.update(error.headers)
    return response


def _browser_refusal(request: Request, policy: BrowserPolicy) -> JSONResponse | None:
    """403 for a `Host` a DNS-rebinding page could send, or an `Origin` neither the server's own nor listed (a web
    page the user happened to open); None: go on. Every path: the open ones too."""
    host, origin = request.headers.get("host"), request.headers.get("origin")
    if not policy.host_allowed(host):
        message = (f"Authentication error: this server listens on loopback without --api-token and answers local names "
                   f"only (localhost, IP addresses), not Host {host_name(host or '')[:100]!r}; --allowed-origins adds names")
    elif origin is not None and not _own_page(request, policy) and not policy.listed(origin):
        listed = ", ".join(policy.allowed_origins) or "none"
        message = (f"Authentication error: web pages from {origin[:100]!r} may not call this server: not its own origin "
                   f"(Host {(_page_host(request, policy) or '')[:100]!r}), and --allowed-origins lists {listed[:300]}")
        message += _forwarded_hint(request, policy)
    else:
        return None
    return _error_response(request.url.path, ApiError(403, AUTH_FAILED[1], message))


def _forwarded_hint(request: Request, policy: BrowserPolicy) -> str:
    """Why an `X-Forwarded-Host` did not count, for the operator reading a 403 behind a proxy."""
    forwarded = request.scope.get("state", {}).get(FORWARDED_HOST)
    if forwarded is None and request.headers.get("x-forwarded-host") is not None:
        return "; an X-Forwarded-Host counts only from the proxies --forwarded-allow-ips names"
    if forwarded is not None and not policy.host_allowed(forwarded):
        return (f"; X-Forwarded-Host {host_name(forwarded)[:100]!r} is no local name, which a loopback server without "
                "--api-token answers only when --allowed-origins lists it")
    return ""


def _forwarded_page_host(request: Request, policy: BrowserPolicy) -> str | None:
    """A trusted proxy's `X-Forwarded-Host` (`ForwardedHeaders`) when it is a name the server answers (so it never lets
    a DNS-rebinding page through the `Host` check); None otherwise."""
    forwarded = request.scope.get("state", {}).get(FORWARDED_HOST)
    return forwarded if forwarded is not None and policy.host_allowed(forwarded) else None


def _page_host(request: Request, policy: BrowserPolicy) -> str | None:
    """The host a page of the server's own was loaded from: the proxy's (`_forwarded_page_host`), else `Host`."""
    return _forwarded_page_host(request, policy) or request.headers.get("host")


def _own_page(request: Request, policy: BrowserPolicy) -> bool:
    origin, forwarded = request.headers.get("origin"), _forwarded_page_host(request, policy)
    host = forwarded or request.headers.get("host")
    return origin is not None and policy.same_origin(origin, host, forwarded=forwarded is not None)


def _preflight(app: FastAPI, request: Request) -> Response | None:
    """A CORS preflight (it passed `_browser_refusal`, so from a listed origin): 204 with what the path allows, any
    header asked for (the token is what guards), and Chrome's private-network consent. Before the token check:
    browsers never send credentials with a preflight."""
    headers = request.headers
    if request.method != "OPTIONS" or "origin" not in headers or "access-control-request-method" not in headers:
        return None
    allowed = ", ".join(sorted(_allowed_methods(app, request.scope)))
    answer = {"Allow": allowed, "Access-Control-Allow-Methods": allowed, "Access-Control-Max-Age": "600"}
    if "access-control-request-headers" in headers:
        answer["Access-Control-Allow-Headers"] = headers["access-control-request-headers"]
    if headers.get("access-control-request-private-network") == "true":
        answer["Access-Control-Allow-Private-Network"] = "true"
    return Response(status_code=204, headers=answer)


def _allow_cross_origin(request: Request, policy: BrowserPolicy, response: Response) -> None:
    """CORS headers on the answer to a listed origin (refusals included, so its page can read why), the ids the SDKs
    read exposed."""
    origin = request.headers.get("origin")
    if origin is None or _own_page(request, policy) or not policy.listed(origin):
        return  # a refused origin's page learns nothing, not even why
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Access-Control-Expose-Headers"] = f"{request_ids.HEADER}, Retry-After"
    response.headers.add_vary_header("Origin")


def _route_path(scope, routes: list) -> str:
    """The route a request is counted under: the one routing chose, or for a request refused before routing
    (413, 403, 429) the first of `routes` its path meets."""
    route = scope.get("route") or next((r for r in routes if r.matches(scope)[0] is not Match.NONE), None)
    return route.path if route is not None else "unmatched"


def _answers(app: FastAPI, scope, method: str) -> bool:
    probe = {**scope, "method": method}
    return any(route.matches(probe)[0] is Match.FULL for route in app.router.routes)


def _allowed_methods(app: FastAPI, scope) -> set[str]:
    """Every method some route answers on this path (Starlette's 405 names only the first route's); HEAD wherever GET."""
    methods = {"OPTIONS"} | {m for m in ("GET", "POST", "PUT", "PATCH", "DELETE") if _answers(app, scope, m)}
    return methods | {"HEAD"} if "GET" in methods else methods


class HeadAsGet:
    """HEAD on a path some GET route serves is that GET without its body (RFC 9110 §9.3.2: servers must support HEAD).

    FastAPI's routes register GET alone; rather than a HEAD route beside each (and a HEAD operation in the API
    document), the app answers a GET here, so status and headers, Content-Length included, are the GET's, and the
    body is dropped. Outermost, so auth and metering see the GET; the server keeps its own scope, which still says HEAD.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD" or not _answers(scope["app"], scope, "GET"):
            return await self.app(scope, receive, send)

        async def headers_only(message):
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


def _internal_error(request: Request) -> Response:
    """The 500 of an unexpected exception (called while it is being handled): its traceback logged, a bare answer."""
    log.exception("unhandled error on %s %s request_id=%s", request.method, request_ids.logged_path(request.scope),
                  request_ids.of_scope(request.scope))
    return _error_response(request.url.path, ApiError(500, 3000, "AiError: internal error"))


def build_app(engine: EngineClient, settings: AppSettings) -> FastAPI:
    service = Service(engine, settings, Metering(engine.info.served_name, engine))
    service.batch_store = SQLiteBatchStore(Path(settings.data_dir) / DATABASE)
    service.finetunes = FinetuneStore(settings.data_dir)
    for name, path in settings.loras.items():
        engine.register_adapter(name, path, resident=True)  # the operator's folder: read once
    service.load_finetunes()
    service.metering.batch_backlog = service.batch_store.backlog
    worker = BatchWorker(service.batch_store, workers_ai.batch_executor(service), settings.batch_concurrency, settings.batch_retention_s,
                         on_done=service.metering.batch_item_done, health=service.storage)
    service.metering.batch_store_ok = lambda: worker.store_ok  # the API's refused writes too (`Service.writing`)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        await worker.stop()
        await asyncio.to_thread(service.responses.write_held)  # a graceful stop loses no held background end

    # No redirect_slashes: a path one '/' off a route answers the surface's 404, not a bare 307 no client expects.
    # FastAPI's /docs and /redoc load their scripts from a CDN: `docs_page` serves /docs offline instead.
    app = FastAPI(title="ossrun", version="0.1.0", lifespan=lifespan, redirect_slashes=False, docs_url=None,
                  redoc_url=None, description="OpenAI's gpt-oss served with the Workers AI and OpenAI APIs.")
    app.state.service = service
    app.state.batch_worker = worker
    app.state.stopping = Stopping()

    async def drain() -> None:
        """Shutdown's first move (on SIGTERM, before uvicorn waits for open requests): batch items stop
        first and stay queued for the next start, then every other request ends within a step: a generation by the
        engine's abort, a body still arriving or work on a thread by `stopping` (`disconnect.unless_client_leaves`)."""
        app.state.stopping.set()
        await worker.stop()
        engine.abort_all()

    app.state.drain = drain
    limiter, wrong_tokens = RateLimiter(settings.rate_limit_per_minute), WrongTokens()
    policy = BrowserPolicy(settings.allowed_origins, None if settings.api_token else settings.local_hosts)
    app.add_middleware(RequestBody, stopping=app.state.stopping, patience_s=settings.client_timeout_s)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        open_path = path in OPEN_PATHS or playground.is_playground_path(path) or docs_page.is_asset_path(path)
        response = (_refused(request) or _browser_refusal(request, policy) or _preflight(app, request) or _declared_too_large(request)
                    or (None if open_path else _refusal(request, settings, limiter, wrong_tokens)))
        if response is None:
            try:
                response = await call_next(request)
            except Exception:  # answered here, inside the middlewares: counted, logged per request, its traceback once
                response = _internal_error(request)
        _allow_cross_origin(request, policy, response)
        service.metering.requests.labels(_route_path(request.scope, routes), str(response.status_code)).inc()  # refusals too
        return response

    app.add_middleware(HeadAsGet)
    app.add_middleware(OriginForm)
    app.add_middleware(request_ids.RequestIds)  # the outermost but one, so every answer carries its id
    app.add_middleware(ForwardedHeaders, proxies=TrustedProxies(settings.forwarded_allow_ips))  # before the log line

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        response = _error_response(request.url.path, exc)
        response.headers.update(exc.headers)
        return response

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, exc: ClientDisconnect):
        """A client that leaves while its body is still coming (an aborted upload, a dropped link) is no server
        error: the quiet 499 of one that leaves after sending (`disconnect.py`), which nobody reads."""
        return _error_response(request.url.path, ApiError(*CLIENT_GONE))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        """Unknown routes and methods in the surface's envelope, not FastAPI's `{"detail"}`."""
        if exc.status_code == 405:
            allowed = ", ".join(sorted(_allowed_methods(app, request.scope)))
            if request.method == "OPTIONS":
                return Response(status_code=204, headers={"Allow": allowed})
            response = _error_response(request.url.path, ApiError(405, 7001, f"Method {request.method} not allowed on "
                                                                                f"{request.url.path} (allowed: {allowed})"))
            response.headers["Allow"] = allowed
            return response
        elif exc.status_code == 404:
            error = ApiError(404, 7000, f"No route for {request.url.path}")
        else:
            error = ApiError(exc.status_code, 3000, str(exc.detail))
        response = _error_response(request.url.path, error)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        """A query or path parameter a route types (`input_items`' `limit`, `order`) that does not fit: the 400 names it in
        `param`, as the routes' own checks do (`after`; hunt round 23 C-F4)."""
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        path = [p for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        where = "/" + "/".join(str(p) for p in path)
        return _error_response(request.url.path, bad_input(f"Error: at '{where}': {first.get('msg')}", param_of(path)))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        """The last resort for an error outside the guard (the guard answers the routes' own): answered outside every
        middleware (Starlette's ServerErrorMiddleware), so the request id is added here."""
        response = _internal_error(request)
        request_id = request_ids.of_scope(request.scope)
        if request_id is not None:
            response.headers[request_ids.HEADER] = request_id
        return response

    @app.get("/health", tags=["Server"])
    async def health():
        """Liveness stays "ok" while the batch store fails (interactive requests are still served; a load balancer
        must not drop the server for it); `batch_store` says whether the queue can move."""
        return {"status": "ok", "model": engine.info.served_name, **engine.stats(),
                "batch_store": "ok" if worker.store_ok else "failing"}

    @app.get("/metrics", tags=["Server"])
    async def metrics():
        return Response(service.metering.render(), media_type="text/plain; version=0.0.4")

    routers = (playground.router, docs_page.router, workers_ai.router, openai_routes.prefixed, openai_routes.bare)
    for router in routers:
        app.include_router(router)
    # Every route with its path, to name the route of a request refused before routing (the app's own list holds
    # the included routers as wholes).
    routes = [r for r in app.router.routes if hasattr(r, "path")] + [r for router in routers for r in router.routes]

    def openapi() -> dict:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            from ossrun.api.openapi import Guard, finish_document
            from ossrun.api.schemas import openapi_components

            document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            document.setdefault("components", {}).setdefault("schemas", {}).update(openapi_components())
            guard = Guard(token=bool(settings.api_token), rate_limited=settings.rate_limit_per_minute > 0, open_paths=OPEN_PATHS)
            finish_document(document, service.model_names, guard)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi
    return app
