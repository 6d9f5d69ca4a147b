"""Responses' background mode: a run that outlives the connection that started it.

A stream's frames normally flow straight from the generator chain to the socket, and a client that leaves closes the
chain, aborting the engine request (`disconnect.py`). OpenAI's `background: true` promises the opposite: the response
is generated to its end whoever listens, then fetched (`GET /v1/responses/{id}`, `?stream=true` to follow it) or
stopped (`POST /v1/responses/{id}/cancel`). So a background run's chain is read by a task of its own into a buffer,
and each listener (the creating request when it streams, any resuming one) follows the buffer: a listener that leaves
stops only itself. A create without `stream` starts the same run and answers at once (`queued`), listening to nothing. The buffer outlives the run for a while (`BackgroundRuns`): a client that resumes after the end
(`starting_after=N`) gets the events numbered as the live stream numbered them. Past that, the stored response
(`conversations.py`) serves it as a replay (`surfaces.responses.replay`), numbered its own way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing

from ossrun.api.surfaces.frames import DONE

log = logging.getLogger(__name__)


class BackgroundRun:
    """One run's frames as its task reads them; `follow` streams them to a listener. Frame i of a Responses stream is
    its event with sequence_number i (every frame is an event, numbered from 0), so `follow(after)` skips by index."""

    def __init__(self, frames: AsyncGenerator[bytes, None], on_cancel: Callable[[], Awaitable[None]], ended: Callable[[], None]):
        self.frames: list[bytes] = []
        self.size = 0  # bytes of the frames
        self.done = False
        self._grew = asyncio.Event()  # replaced after each wake-up: a listener waits on the one it saw
        self.task = asyncio.get_running_loop().create_task(self._pump(frames, on_cancel, ended))

    async def _pump(self, frames: AsyncGenerator[bytes, None], on_cancel: Callable[[], Awaitable[None]],
                    ended: Callable[[], None]) -> None:
        try:
            async with aclosing(frames) as source:  # closed however the run ends: the engine request is aborted
                async for frame in source:
                    if frame != DONE:  # `follow` ends every listener's stream with its own
                        self._add(frame)
        except asyncio.CancelledError:
            await on_cancel()  # `cancel`: the response is kept `cancelled` before any listener learns the run has ended
        except Exception:  # the stream turns generation's failures into its failure frames: this is a bug
            log.exception("background run failed")
        finally:
            self.done = True
            ended()
            self._wake()

    def _add(self, frame: bytes) -> None:
        self.frames.append(frame)
        self.size += len(frame)
        self._wake()

    def _wake(self) -> None:
        grew, self._grew = self._grew, asyncio.Event()
        grew.set()

    async def follow(self, after: int | None = None) -> AsyncIterator[bytes]:
        """The run's frames after the one numbered `after` (all without it), those to come as they come, then `[DONE]`."""
        at = 0 if after is None else after + 1
        while True:
            grew = self._grew
            while at < len(self.frames):
                yield self.frames[at]
                at += 1
            if self.done:
                break
            await grew.wait()
        yield DONE

    async def cancel(self) -> None:
        """Stop the run (its engine request is aborted) and wait until it has ended; nothing if it already had."""
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


class BackgroundRuns:
    """The background runs by response id: those in progress, and the `kept` that ended last, each for `grace_s` after
    its end and together at most `kept_bytes` of frames, so a resume after the end is served from the frames the live
    stream sent (a cursor names the same event either way). A deleted response's run is dropped (`drop`): nothing
    serves it any more. The bytes are bounded apart from the count: each full-object event repeats what the response
    echoes (a 9 MB `metadata` made a run's buffer 29 MB, 64 runs 1.9 GB, hunt round 15 B-F4), while a long answer's
    buffer takes about 1 MB (4000 tokens)."""

    def __init__(self, kept: int = 64, grace_s: float = 15 * 60, kept_bytes: int = 256 * 2**20) -> None:
        self.kept, self.grace_s, self.kept_bytes = kept, grace_s, kept_bytes
        self._runs: dict[str, BackgroundRun] = {}
        self._ended: OrderedDict[str, tuple[float, BackgroundRun]] = OrderedDict()  # oldest end first

    def start(self, key: str, frames: AsyncGenerator[bytes, None], on_cancel: Callable[[], Awaitable[None]]) -> BackgroundRun:
        run = BackgroundRun(frames, on_cancel, ended=lambda: self._end(key))
        self._runs[key] = run
        return run

    def get(self, key: str) -> BackgroundRun | None:
        """The run in progress under `key`, or the one that ended within the grace period; None if neither."""
        self._forget_old()
        run = self._runs.get(key)
        if run is None and key in self._ended:
            run = self._ended[key][1]
        return run

    def drop(self, key: str) -> None:
        """Forget the run under `key` (its response is deleted); a run in progress must have been cancelled first."""
        self._runs.pop(key, None)
        self._ended.pop(key, None)

    def _end(self, key: str) -> None:
        run = self._runs.pop(key, None)
        if run is not None:
            self._ended[key] = (time.monotonic(), run)
            # Its grace period ends on an idle server too (hunt round 16 C-F1: pruned only when the next background
            # request came, up to 64 runs and 256 MiB of frames stayed for good on a server that saw none).
            asyncio.get_running_loop().call_later(self.grace_s, self._forget_old)
        self._forget_old()

    def _forget_old(self) -> None:
        """Ended runs past the grace period, past the `kept` newest, or beyond `kept_bytes` of frames go, oldest first
        (the stored response still replays them)."""
        too_old = time.monotonic() - self.grace_s
        size = sum(run.size for _, run in self._ended.values())
        while self._ended and (len(self._ended) > self.kept or size > self.kept_bytes
                               or next(iter(self._ended.values()))[0] < too_old):
            size -= self._ended.popitem(last=False)[1][1].size
