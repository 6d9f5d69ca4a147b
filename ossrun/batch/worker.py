"""Feeds queued batch items to the engine at batch priority and writes each result back once.

The executor is the server's own sync path (so a batch result is exactly what the sync call would
have returned); the worker only decides how many items are in flight and keeps the store honest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ossrun.batch.store import BatchItem, BatchStore
from ossrun.storage import StorageHealth, write_refusal

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ItemOutcome:
    success: bool
    result: Any  # the sync result, or {"code", "message"} on failure
    prompt_tokens: int = 0
    completion_tokens: int = 0


# (model, body, the item's key: its batch id and index, the same when a restart runs it again) → its outcome
Executor = Callable[[str, dict[str, Any], str], Awaitable[ItemOutcome]]


def _ignore(outcome: ItemOutcome) -> None:
    pass


class BatchWorker:
    """Runs the queue; a store that fails (a full disk, an I/O error) is retried with back-off, never given up on,
    because an accepted item must be finished eventually and the disk usually comes back."""

    max_backoff_s = 5.0

    def __init__(self, store: BatchStore, execute: Executor, concurrency: int = 16, retention_s: float = 7 * 24 * 3600,
                 poll_s: float = 0.5, on_done: Callable[[ItemOutcome], None] = _ignore, health: StorageHealth | None = None):
        """`on_done` hears of every item whose result was written (the server's metrics count them); `health` is
        the data directory's record of failing writes, shared with the API's own writes."""
        self.store = store
        self.execute = execute
        self.on_done = on_done
        self.concurrency = concurrency
        self.retention_s = retention_s
        self.poll_s = poll_s
        self._active: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.health = health or StorageHealth()

    def start(self) -> None:
        requeued = self.store.requeue_running()
        if requeued:
            log.info("batch queue: %d items interrupted by the last shutdown are queued again", requeued)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ossrun-batch-worker")
        self._task.add_done_callback(_report_death)

    @property
    def store_ok(self) -> bool:
        """False while the store keeps failing: /health and /metrics say so, since the queue then stands still."""
        return self.health.ok

    def notify(self) -> None:
        """New work was queued: look now rather than at the next poll."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop taking work; items in flight stay 'running' in the store and are queued again at the next start."""
        tasks = [t for t in (self._task, *self._active) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        last_cleanup = 0.0
        while True:
            free = self.concurrency - len(self._active)
            if free > 0:
                for item in await self._store("claim queued items", "claim", self.store.claim, free):
                    task = asyncio.create_task(self._process(item))
                    self._active.add(task)
                    task.add_done_callback(self._finished)
            await self.health.recheck()
            if time.time() - last_cleanup > 60:
                last_cleanup = time.time()
                await self._store("delete old batches", "cleanup", self.store.delete_finished_before, time.time() - self.retention_s)
            self._wake.clear()
            # Not `asyncio.wait_for`: on Python 3.11 a cancellation that lands as the wake-up does is swallowed there
            # (the woken wait's result is returned instead), and `stop` then waited for this loop forever.
            try:
                async with asyncio.timeout(self.poll_s):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _finished(self, task: asyncio.Task) -> None:
        self._active.discard(task)
        self._wake.set()

    async def _process(self, item: BatchItem) -> None:
        try:
            outcome = await self.execute(item.model, item.body, f"{item.batch_id}/{item.index}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # one bad item never stops the queue
            log.exception("batch item %s/%d failed", item.batch_id, item.index)
            outcome = ItemOutcome(False, {"code": 3000, "message": f"AiError: {exc}"})
        # Until the result is written the item stays 'running' and holds its slot; a restart meanwhile queues it again.
        key = f"result {item.batch_id}/{item.index}"
        await self._store(f"write the result of batch item {item.batch_id}/{item.index}", key, self.store.complete, item,
                          outcome.success, outcome.result, outcome.prompt_tokens, outcome.completion_tokens)
        self.on_done(outcome)

    async def _store(self, what: str, key: str, call: Callable[..., Any], *args: Any) -> Any:
        """`call(*args)` in a thread, retried with back-off until the store accepts it. `key` names the write in
        `health`: only this write working again ends its part of a failure streak (an empty claim that works while
        results cannot be written ends nothing)."""
        delay = self.poll_s
        while True:
            try:
                result = await asyncio.to_thread(call, *args)
            except Exception as exc:
                cause = write_refusal(exc) or f"{type(exc).__name__}: {exc}"
                self.health.failed(key, f"batch queue: the store failed to {what} ({cause}); retrying until it works again",
                                   retried=True, exc=exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)
                continue
            self.health.worked(key)
            return result


def _report_death(task: asyncio.Task) -> None:
    """The loop is not meant to end but by cancellation; if it does, say so rather than let the queue stop unheard."""
    if not task.cancelled() and task.exception() is not None:
        log.error("batch queue: the worker stopped; queued items will not run until a restart", exc_info=task.exception())
