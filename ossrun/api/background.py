"""Responses' background mode: a run that outlives the connection that started it.

A stream's frames normally flow straight from the generator chain to the socket, and a client that leaves closes the
chain, aborting the engine request (`disconnect.py`). OpenAI's `background: true` promises the opposite: the response
is generated to its end whoever listens, then fetched (`GET /v1/responses/{id}`, `?stream=true` to follow it) or
stopped (`POST /v1/responses/{id}/cancel`). So a background run's chain is read by a task of its own into a buffer,
and each listener (the creating request, any resuming one) follows the buffer: a listener that leaves stops only
itself. The buffer holds the run's frames until it ends; then the stored response (`conversations.py`) serves it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing

from ossrun.api.surfaces.frames import DONE

log = logging.getLogger(__name__)


class BackgroundRun:
    """One run's frames as its task reads them; `follow` streams them to a listener. Frame i of a Responses stream is
    its event with sequence_number i (every frame is an event, numbered from 0), so `follow(after)` skips by index."""

    def __init__(self, frames: AsyncGenerator[bytes, None], on_cancel: Callable[[], None], ended: Callable[[], None]):
        self.frames: list[bytes] = []
        self.done = False
        self._grew = asyncio.Event()  # replaced after each wake-up: a listener waits on the one it saw
        self.task = asyncio.get_running_loop().create_task(self._pump(frames, on_cancel, ended))

    async def _pump(self, frames: AsyncGenerator[bytes, None], on_cancel: Callable[[], None], ended: Callable[[], None]) -> None:
        try:
            async with aclosing(frames) as source:  # closed however the run ends: the engine request is aborted
                async for frame in source:
                    if frame != DONE:  # `follow` ends every listener's stream with its own
                        self._add(frame)
        except asyncio.CancelledError:
            on_cancel()  # `cancel`: the response is kept `cancelled` before any listener learns the run has ended
        except Exception:  # the stream turns generation's failures into its failure frames: this is a bug
            log.exception("background run failed")
        finally:
            self.done = True
            ended()
            self._wake()

    def _add(self, frame: bytes) -> None:
        self.frames.append(frame)
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
    """The background runs in progress, by response id; a run leaves when it ends (its response is stored by then)."""

    def __init__(self) -> None:
        self._runs: dict[str, BackgroundRun] = {}

    def start(self, key: str, frames: AsyncGenerator[bytes, None], on_cancel: Callable[[], None]) -> BackgroundRun:
        run = BackgroundRun(frames, on_cancel, ended=lambda: self._runs.pop(key, None))
        self._runs[key] = run
        return run

    def get(self, key: str) -> BackgroundRun | None:
        return self._runs.get(key)
