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
link closes the one it reads with `contextlib.aclosing`, so nothing waits for the garbage collector.
"""

from __future__ import annotations

import asyncio
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


class EventStream(StreamingResponse):
    """Server-sent events whose body generator is closed however the response ends, so a client that
    leaves aborts its engine requests at once.

    When the client disconnects, Starlette (ASGI spec < 2.4, as uvicorn speaks) cancels the writer task.
    If that lands while the writer waits in `send` (a socket that no longer drains) rather than in the
    body, the body stays suspended at its `yield` and Starlette never closes it: its `finally` (the
    engine abort) would run only when the garbage collector reached it, seconds later, the request
    generating for nobody meanwhile. Closed here, shielded from the cancellation, it runs now."""

    def __init__(self, body: AsyncGenerator[bytes, None]):
        super().__init__(body, media_type=SSE, headers=NO_CACHE)
        self.generator = body  # (`body_iterator` is typed as any async iterable)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.generator.aclose()
