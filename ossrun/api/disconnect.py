"""Sync routes watch their connection: a client that leaves ends its engine request.

A stream notices a gone client when a write fails; a sync request writes nothing until the end,
so without watching it would generate to `max_tokens` for nobody (SDKs time out and retry, each
retry leaving another orphan). Cancelling the work closes its engine stream, which aborts the
request at the engine's next step.

The watch waits on the connection's next ASGI message (after the body, only `http.disconnect`
can come) instead of polling `Request.is_disconnected()`: under Starlette's BaseHTTPMiddleware a
poll never sees the disconnect, because the middleware's task group swallows the message when
the poll's cancel scope fires.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

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
