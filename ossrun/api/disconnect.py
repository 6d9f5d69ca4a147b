"""A client that leaves ends its engine requests, sync or streamed.

A sync request writes nothing until the end, so without watching it would generate to `max_tokens`
for nobody (SDKs time out and retry, each retry leaving another orphan). Cancelling the work closes
its engine stream, which aborts the request at the engine's next step.

The watch waits on the connection's next ASGI message (after the body, only `http.disconnect`
can come) instead of polling `Request.is_disconnected()`: under Starlette's BaseHTTPMiddleware a
poll never sees the disconnect, because the middleware's task group swallows the message when
the poll's cancel scope fires.

A stream is an async generator chain (surface frames → service → engine stream) whose `finally`s
abort the engine requests; `EventStream` closes it however the response ends (see there), and each
link closes the one it reads with `contextlib.aclosing`, so nothing waits for the garbage collector. A stream silent
for `KEEPALIVE_S` gets an SSE comment (`with_keepalives`), so a long prompt read on a CPU does not outlast the
client's read timeout.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, Awaitable
from typing import TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ossrun.api.errors import CLIENT_GONE, ApiError

T = TypeVar("T")


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (the body has already been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """The result of `work`; if the client leaves first, `work` is cancelled and ApiError(499) raised."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ApiError(*CLIENT_GONE)
    finally:
        for pending in (task, watch):
            if not pending.done():
                pending.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)


SSE = "text/event-stream"
NO_CACHE = {"Cache-Control": "no-cache"}  # no proxy may buffer or replay a stream

# A stream silent this long gets an SSE comment line, which every SSE parser skips (openai-python's and Cloudflare's
# SDKs, eventsource-parser, the browser's EventSource): on a CPU a long prompt is read for minutes before its first
# token (20b, 4k tokens: ~2 minutes on 2 cores), and a client's read timeout (60 s is common; httpx's default is 5 s)
# or a proxy's would end the stream meanwhile. A stream that is not silent never carries one.
KEEPALIVE_S = float(os.environ.get("OSSRUN_SSE_KEEPALIVE_S", "4"))
KEEPALIVE = b": keep-alive\n\n"


async def with_keepalives(body: AsyncGenerator[bytes, None], every: float) -> AsyncGenerator[bytes, None]:
    """`body`'s frames, and a keep-alive comment whenever `every` seconds pass without one. The next frame is
    awaited in a task of its own, so a keep-alive does not interrupt it; closing this closes `body`."""
    step: asyncio.Future[bytes] | None = None
    try:
        while True:
            if step is None:
                step = asyncio.ensure_future(anext(body))
            done, _ = await asyncio.wait((step,), timeout=every)
            if not done:
                yield KEEPALIVE
                continue
            finished, step = step, None
            try:
                frame = finished.result()
            except StopAsyncIteration:
                return
            yield frame
    finally:
        if step is not None:  # closed while a frame was awaited: the body is stopped there (its cleanup runs)
            step.cancel()
            try:
                await step
            except (asyncio.CancelledError, StopAsyncIteration, Exception):
                pass
        await body.aclose()


class EventStream(StreamingResponse):
    """Server-sent events whose body generator is closed however the response ends, so a client that
    leaves aborts its engine requests at once.

    When the client disconnects, Starlette (ASGI spec < 2.4, as uvicorn speaks) cancels the writer task.
    If that lands while the writer waits in `send` (a socket that no longer drains) rather than in the
    body, the body stays suspended at its `yield` and Starlette never closes it: its `finally` (the
    engine abort) would run only when the garbage collector reached it, seconds later, the request
    generating for nobody meanwhile. Closed here, shielded from the cancellation, it runs now."""

    def __init__(self, body: AsyncGenerator[bytes, None]):
        body = with_keepalives(body, KEEPALIVE_S)
        super().__init__(body, media_type=SSE, headers=NO_CACHE)
        self.generator = body  # (`body_iterator` is typed as any async iterable)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.generator.aclose()
