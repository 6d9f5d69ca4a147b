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
for the keep-alive interval (`KEEPALIVE_S`, or `OSSRUN_SSE_KEEPALIVE_S` as `serve` reads it) gets an SSE comment
(`with_keepalives`), so a long prompt read on a CPU does not outlast the client's read timeout.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ossrun.api.errors import CLIENT_GONE, SHUTTING_DOWN, ApiError

T = TypeVar("T")


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (the body has already been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """The result of `work`; if the client leaves first, `work` is cancelled and ApiError(499) raised; if the server
    starts shutting down first (`app.state.stopping`, set by the drain), it is cancelled and the 503 raised, in the
    route's envelope rather than uvicorn's bare 500 when its grace period ends (hunt round 23 A-F2)."""
    return await _unless(work, {_disconnected(request): ApiError(*CLIENT_GONE),
                                request.app.state.stopping.wait(): shutting_down()})


class Stopping:
    """Set once, by the drain; awaited by requests on any event loop. Not an `asyncio.Event`, which binds to the first
    loop that waits on it: an app driven from several loops (the ASGI tests, an `asyncio.run` a call) got a RuntimeError
    from the watch on the second, which `_unless` read as the 503 "shutting down" of a server that was not stopping."""

    def __init__(self) -> None:
        self._set = False
        self._waiters: set[asyncio.Future[None]] = set()

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        for waiter in list(self._waiters):
            waiter.get_loop().call_soon_threadsafe(_resolve, waiter)

    async def wait(self) -> None:
        if self._set:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await waiter
        finally:
            self._waiters.discard(waiter)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def unless_stopping(stopping: Stopping, work: Awaitable[T]) -> T:
    """The result of `work`, or the 503 once the server starts shutting down (a body still arriving: `RequestBody`)."""
    return await _unless(work, {stopping.wait(): shutting_down()})


def shutting_down() -> ApiError:
    """The 503 for a request the drain ends: the connection closes after it (its body may still be on its way)."""
    return ApiError(*SHUTTING_DOWN, headers={"Connection": "close"})


async def _unless(work: Awaitable[T], refusals: dict[Awaitable[object], ApiError]) -> T:
    """The result of `work`, or the refusal whose watch ends first; whatever has not ended is cancelled."""
    task = asyncio.ensure_future(work)
    watches = {asyncio.ensure_future(watch): refusal for watch, refusal in refusals.items()}
    try:
        await asyncio.wait({task, *watches}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise next(refusal for watch, refusal in watches.items() if watch.done())
    finally:
        for pending in (task, *watches):
            if not pending.done():
                pending.cancel()
        await asyncio.gather(task, *watches, return_exceptions=True)


async def stoppable_thread(call: Callable[..., T], *args: Any) -> T:
    """`call(*args, stop)` on a worker thread, `stop` (a threading.Event) set when the await is cancelled (its client
    left, or the server is stopping): a thread cannot be cancelled, so a long loop checks `stop` at each step and ends.
    Without it the work ran on for nobody, and `asyncio.run` waits for every such thread at exit with no timeout: a
    stop took 15 s, holding the data directory's lock (hunt round 23 A-F1)."""
    stop = threading.Event()
    try:
        return await asyncio.to_thread(call, *args, stop)
    except asyncio.CancelledError:
        stop.set()
        raise


SSE = "text/event-stream"
NO_CACHE = {"Cache-Control": "no-cache"}  # no proxy may buffer or replay a stream

# A stream silent this long gets an SSE comment line, which every SSE parser skips (openai-python's and Cloudflare's
# SDKs, eventsource-parser, the browser's EventSource): on a CPU a long prompt is read for minutes before its first
# token (20b, 4k tokens: ~2 minutes on 2 cores), and a client's read timeout (60 s is common; httpx's default is 5 s)
# or a proxy's would end the stream meanwhile. A stream that is not silent never carries one. The default; `serve` reads
# OSSRUN_SSE_KEEPALIVE_S once at start and refuses a value that is not a finite number of seconds above 0.
KEEPALIVE_S = 3.0
KEEPALIVE = b": keep-alive\n\n"
_END = object()


async def with_keepalives(body: AsyncGenerator[bytes, None], every: float) -> AsyncGenerator[bytes, None]:
    """`body`'s frames, and a keep-alive comment once `every` seconds (checked twice as often) pass without one.
    `every` is above 0: at 0 the timer fired on every turn of the loop and its keep-alives took the queue before each
    frame could, so a stream never ended (hunt round 18 A-F1).

    The body is read by a task of its own into a one-frame queue (so a client that does not read still holds it back),
    and a timer puts a keep-alive in the queue when the body has been silent: per frame this costs a queue handoff
    (~3 us), where awaiting each frame with a timeout cost ~15 us (a task and a wait a frame: 12k frames/s at 256
    streams). Closing this stops the reader and closes `body` before it returns (its `finally`: the engine aborts)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue(maxsize=1)
    last = loop.time()

    async def read() -> None:
        nonlocal last
        try:
            async for frame in body:
                last = loop.time()
                await queue.put(frame)
        except Exception as exc:  # the consumer raises it (cancellation is the consumer's own doing)
            await queue.put(exc)
            return
        await queue.put(_END)

    def watch() -> None:
        nonlocal last, timer
        if loop.time() - last >= every and queue.empty():
            queue.put_nowait(KEEPALIVE)
            last = loop.time()
        timer = loop.call_later(every / 2, watch)

    reader = asyncio.ensure_future(read())
    timer = loop.call_later(every / 2, watch)
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            yield item  # type: ignore[misc]
    finally:
        timer.cancel()
        if not reader.done():  # closed early: stop the reader where it waits (in the body, or on the queue)
            reader.cancel()
            try:
                await reader
            except asyncio.CancelledError:
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

    def __init__(self, body: AsyncGenerator[bytes, None], keepalive_s: float):
        body = with_keepalives(body, keepalive_s)
        super().__init__(body, media_type=SSE, headers=NO_CACHE)
        self.generator = body  # (`body_iterator` is typed as any async iterable)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.generator.aclose()
