"""The durable batch queue: every accepted request is on disk before the client hears "queued".

`BatchStore` is the interface (a networked database can implement it for several replicas);
`SQLiteBatchStore` is the embedded default, one file in the server's data directory, in WAL mode.
An item's result is written in the same transaction that marks it done, so after a crash an
item is either done (reported as it was) or not (run again): each is reported exactly once.
"""

from __future__ import annotations

import heapq
import json
import math
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ossrun.storage import open_database


@dataclass(slots=True)
class BatchItem:
    batch_id: str
    index: int
    body: dict[str, Any]
    external_reference: str | None = None
    state: str = "queued"  # queued | running | done
    success: bool | None = None
    result: Any = None  # the sync result, or the error object when not successful
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str = ""


@dataclass(slots=True)
class Batch:
    batch_id: str
    model: str
    created_at: float
    items: list[BatchItem] = field(default_factory=list)
    collected: bool = False  # polled once it was done: its results may make room for new batches (`STORED_BYTES`)

    @property
    def status(self) -> str:
        return status_of({item.state for item in self.items})


def status_of(states: set[str]) -> str:
    """A batch's status from its items' states: done when all are, running once any has started, else queued."""
    if states == {"done"}:
        return "done"
    return "running" if states & {"running", "done"} else "queued"


class QueueFull(Exception):
    """The queue holds `STORED_BYTES` (or the store's own bound): a new batch is refused, nothing queued is dropped."""

    def __init__(self, used: int, adding: int, limit: int):
        super().__init__(f"the batch queue holds {used} of its {limit} bytes; a batch of {adding} does not fit")
        self.used, self.adding, self.limit = used, adding, limit


# The bytes the batch queue may hold (items' bodies, `external_reference`s and results): the age bound alone (7 days)
# let one client fill the disk with cheap batches (hunt round 17 A-F5: 9 MB each, ~13 MB/s, kept 7 days), and
# the stored responses and the fine-tunes share the data directory. A durable queue drops nothing it acknowledged: past
# the bound the oldest batches whose results were collected (polled once done) go first, and when they do not make
# room the new batch is refused (503) until polls, retention or finished items do. 2 GiB, as the stored responses':
# ~200 batches of the largest body, far more than a server's batch backlog for a week.
STORED_BYTES = 2 << 30


class BatchStore(Protocol):
    def create(self, model: str, bodies: list[dict[str, Any]], priority_hint: int = 0) -> str: ...
    def get(self, batch_id: str) -> Batch | None: ...
    def status(self, batch_id: str) -> str | None: ...
    def collect(self, batch_id: str) -> None: ...
    def claim(self, limit: int) -> list[BatchItem]: ...
    def complete(self, item: BatchItem, success: bool, result: Any, prompt_tokens: int, completion_tokens: int) -> None: ...
    def requeue_running(self) -> int: ...
    def delete_finished_before(self, cutoff: float) -> int: ...
    def backlog(self) -> dict[str, int]: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, model TEXT NOT NULL, created_at REAL NOT NULL, finished_at REAL
);
CREATE TABLE IF NOT EXISTS items (
    batch_id TEXT NOT NULL REFERENCES batches(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    body TEXT NOT NULL,
    external_reference TEXT,
    state TEXT NOT NULL DEFAULT 'queued',
    success INTEGER,
    result TEXT,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, idx)
);
CREATE INDEX IF NOT EXISTS items_state ON items(state, batch_id, idx);
"""
# Added to a file of an older version by `_measure_batches`: a batch's bytes (its items' bodies, references and results)
# and when its results were first polled.
_SIZE_COLUMNS = ("ALTER TABLE batches ADD COLUMN size INTEGER NOT NULL DEFAULT 0",
                 "ALTER TABLE batches ADD COLUMN collected_at REAL",
                 "UPDATE batches SET size = (SELECT COALESCE(SUM(length(CAST(body AS BLOB)) + COALESCE(length(CAST("
                 "external_reference AS BLOB)), 0) + COALESCE(length(CAST(result AS BLOB)), 0)), 0) FROM items "
                 "WHERE items.batch_id = batches.id)")
# The collected batches to drop, oldest finished first, until `?` bytes are freed.
_DROP_COLLECTED = ("DELETE FROM batches WHERE id IN (SELECT id FROM (SELECT id, size, SUM(size) OVER (ORDER BY finished_at, id) "
                   "AS freed FROM batches WHERE collected_at IS NOT NULL AND finished_at IS NOT NULL) WHERE freed - size < ?)")


# Per batch with items queued, oldest first: (its id, items running, items queued). Read on the state index.
_BACKLOG_BY_BATCH = ("SELECT i.batch_id, SUM(i.state = 'running'), SUM(i.state = 'queued') FROM items i JOIN batches b "
                     "ON b.id = i.batch_id WHERE i.state IN ('queued', 'running') GROUP BY i.batch_id "
                     "HAVING SUM(i.state = 'queued') > 0 ORDER BY b.created_at, b.rowid")
# A batch's next `?` queued items, in request order.
_NEXT_QUEUED = ("SELECT i.batch_id, i.idx, i.body, i.external_reference, i.state, i.success, i.result, i.prompt_tokens, "
                "i.completion_tokens, b.model FROM items i JOIN batches b ON b.id = i.batch_id "
                "WHERE i.batch_id = ? AND i.state = 'queued' ORDER BY i.idx LIMIT ?")


def _fair_shares(backlog: list[tuple[str, int, int]], limit: int) -> dict[str, int]:
    """How many of `limit` items each batch gets, in the order first given: one at a time to the batch with the fewest
    running (those given here counted), ties to the oldest (`backlog` is oldest first), none past its queued ones. So a
    small batch starts as soon as a slot frees, whatever an earlier batch still has queued, and batches that are
    queued alone run as before, each in turn."""
    heap = [(running, age, batch_id, queued) for age, (batch_id, running, queued) in enumerate(backlog)]
    heapq.heapify(heap)
    shares: dict[str, int] = {}
    for _ in range(limit):
        if not heap:
            break
        running, age, batch_id, queued = heapq.heappop(heap)
        shares[batch_id] = shares.get(batch_id, 0) + 1
        if queued > 1:
            heapq.heappush(heap, (running + 1, age, batch_id, queued - 1))
    return shares


def _bytes(text: str | None) -> int:
    return 0 if text is None else len(text.encode())


class SQLiteBatchStore:
    """SQLite in WAL mode (`storage.open_database`: "queued" means on disk); a connection for writes and one for reads,
    each behind its own lock (the queue is not the hot path). A write can wait out another process's write lock
    (`storage.BUSY_TIMEOUT_S`, on the worker's or the API's thread); a read (a poll's status and a /metrics scrape on
    the event loop, a finished batch's results on a worker thread) never waits behind it."""

    def __init__(self, path: str | Path, capacity_bytes: int = STORED_BYTES):
        self.path, self.capacity_bytes = Path(path), capacity_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = open_database(self.path)
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._measure_batches()
        self._read_lock = threading.Lock()
        self._reader = open_database(self.path)

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._db.close()
            self._reader.close()

    def _measure_batches(self) -> None:
        """A file of an older version has no `size` and `collected_at` columns: added, every batch measured, once."""
        with self._lock, self._transaction():
            if any(column[1] == "size" for column in self._db.execute("PRAGMA table_info(batches)")):
                return
            for statement in _SIZE_COLUMNS:
                self._db.execute(statement)

    def create(self, model: str, bodies: list[dict[str, Any]], priority_hint: int = 0) -> str:
        """Queue a batch; `QueueFull` (nothing written) when it does not fit `capacity_bytes` even after the collected
        batches, oldest finished first, made room."""
        batch_id = str(uuid.uuid4())
        rows = []
        for index, body in enumerate(bodies):
            body = dict(body)
            reference = body.pop("external_reference", None)
            rows.append((batch_id, index, json.dumps(body), None if reference is None else str(reference)))
        size = sum(_bytes(body) + _bytes(reference) for _, _, body, reference in rows)
        with self._lock, self._transaction():
            self._make_room(size)
            self._db.execute("INSERT INTO batches (id, model, created_at, size) VALUES (?, ?, ?, ?)",
                             (batch_id, model, time.time(), size))
            self._db.executemany("INSERT INTO items (batch_id, idx, body, external_reference) VALUES (?, ?, ?, ?)", rows)
        return batch_id

    def _make_room(self, size: int) -> None:
        """Room for `size` more bytes within `capacity_bytes`: collected batches dropped, oldest finished first, as
        few as free it; else `QueueFull`. The caller holds the lock, in a transaction."""
        used = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM batches").fetchone()[0]
        if used + size <= self.capacity_bytes:
            return
        self._db.execute(_DROP_COLLECTED, (used + size - self.capacity_bytes,))
        used = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM batches").fetchone()[0]
        if used + size > self.capacity_bytes:
            raise QueueFull(used, size, self.capacity_bytes)

    def collect(self, batch_id: str) -> None:
        """A poll answered the finished batch's results: from now on they may make room for new batches."""
        with self._lock, self._transaction():
            self._db.execute("UPDATE batches SET collected_at = ? WHERE id = ? AND collected_at IS NULL AND finished_at IS NOT NULL",
                             (time.time(), batch_id))

    def get(self, batch_id: str) -> Batch | None:
        with self._read_lock:
            self._reader.execute("BEGIN")  # one snapshot: the batch and its items as one commit left them
            try:
                row = self._reader.execute("SELECT id, model, created_at, collected_at FROM batches WHERE id = ?",
                                           (batch_id,)).fetchone()
                items = [] if row is None else self._reader.execute(
                    "SELECT batch_id, idx, body, external_reference, state, success, result, prompt_tokens, completion_tokens "
                    "FROM items WHERE batch_id = ? ORDER BY idx", (batch_id,)).fetchall()
            finally:
                self._reader.execute("COMMIT")
        return None if row is None else Batch(row[0], row[1], row[2], [_item(r, row[1]) for r in items], row[3] is not None)

    def status(self, batch_id: str) -> str | None:
        """The batch's status (None: unknown), read on the state index without its items' bodies and results: cheap
        enough for the event loop, where a poll of a batch not done reads it, so it never waits for a thread that
        writes may all be holding (SQLite's busy timeout, another process holding the write lock)."""
        with self._read_lock:
            rows = self._reader.execute("SELECT DISTINCT state FROM items WHERE batch_id = ?", (batch_id,)).fetchall()
        return status_of({row[0] for row in rows}) if rows else None

    def claim(self, limit: int) -> list[BatchItem]:
        """Mark up to `limit` queued items running and return them, fairly between batches (`_fair_shares`), each
        batch's in order. Claimed oldest batch first, a 1-item batch waited until every item of a 1000-item one queued
        before it had been claimed (hunt round 20 C-F2)."""
        with self._lock, self._transaction():
            shares = _fair_shares(self._db.execute(_BACKLOG_BY_BATCH).fetchall(), limit)
            rows = [row for batch_id, count in shares.items() for row in self._db.execute(_NEXT_QUEUED, (batch_id, count))]
            self._db.executemany("UPDATE items SET state = 'running' WHERE batch_id = ? AND idx = ?", [(r[0], r[1]) for r in rows])
        items = [_item(r[:-1], r[-1]) for r in rows]
        for item in items:
            item.state = "running"
        return items

    def complete(self, item: BatchItem, success: bool, result: Any, prompt_tokens: int, completion_tokens: int) -> None:
        kept = _json_text(result)
        with self._lock, self._transaction():
            done = self._db.execute(
                "UPDATE items SET state = 'done', success = ?, result = ?, prompt_tokens = ?, completion_tokens = ? "
                "WHERE batch_id = ? AND idx = ? AND state != 'done'",
                (int(success), kept, prompt_tokens, completion_tokens, item.batch_id, item.index)).rowcount
            if done:  # counted against the bound, never refused: the work was acknowledged when it was queued
                self._db.execute("UPDATE batches SET size = size + ? WHERE id = ?", (_bytes(kept), item.batch_id))
            remaining = self._db.execute("SELECT COUNT(*) FROM items WHERE batch_id = ? AND state != 'done'", (item.batch_id,)).fetchone()[0]
            if remaining == 0:
                self._db.execute("UPDATE batches SET finished_at = ? WHERE id = ? AND finished_at IS NULL", (time.time(), item.batch_id))

    def requeue_running(self) -> int:
        """After a restart: items a dead process was running go back to the queue (their results were never written)."""
        with self._lock, self._transaction():
            return self._db.execute("UPDATE items SET state = 'queued' WHERE state = 'running'").rowcount

    def delete_finished_before(self, cutoff: float) -> int:
        with self._lock, self._transaction():
            return self._db.execute("DELETE FROM batches WHERE finished_at IS NOT NULL AND finished_at < ?", (cutoff,)).rowcount

    def backlog(self) -> dict[str, int]:
        """{"queued": n, "running": m}: items not done yet (counted on the state index, so a scrape costs what the
        backlog holds, not what the retained results do)."""
        with self._read_lock:
            rows = self._reader.execute("SELECT state, COUNT(*) FROM items WHERE state IN ('queued', 'running') "
                                        "GROUP BY state").fetchall()
        return {"queued": 0, "running": 0, **dict(rows)}

    def _transaction(self):
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, value, traceback):
        if kind is None:
            try:
                self.db.execute("COMMIT")
                return False
            except sqlite3.Error:
                self._rollback()  # a failed COMMIT can leave the transaction open, and every later BEGIN would fail
                raise
        self._rollback()
        return False

    def _rollback(self) -> None:
        if self.db.in_transaction:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the error that got us here is the one to report


def _json_text(value: Any) -> str:
    """A result as JSON text, a non-finite number written null as JavaScript's `JSON.stringify` writes it: Python's
    `Infinity` is no JSON, and read back as inf it made every poll of the batch a 500 (its other results lost)."""
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(value), allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _item(row: tuple, model: str) -> BatchItem:
    """A row as an item; `Infinity` or `NaN` in a result an older version stored is read as the null it now writes."""
    batch_id, index, body, reference, state, success, result, prompt_tokens, completion_tokens = row
    return BatchItem(batch_id, index, json.loads(body), reference, state, None if success is None else bool(success),
                     None if result is None else json.loads(result, parse_constant=lambda _: None), prompt_tokens,
                     completion_tokens, model)
