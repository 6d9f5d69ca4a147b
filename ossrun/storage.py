"""Whether the data directory takes writes: one record the batch worker and the API's writes report to, and that
/health (`batch_store`) and /metrics (`ossrun_batch_store_up`) read, so an alert on it neither misses nor flaps."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

DATABASE = "batch.sqlite"  # the data directory's SQLite file: the batch queue and the stored Responses
# How long a write waits for another connection's write lock before SQLite gives up ("database is locked"): ours hold
# it for milliseconds; an operator's `sqlite3` shell left in a transaction holds it until it ends.
BUSY_TIMEOUT_S = 5.0

# A full disk or quota, a file-size limit, a read-only or failing filesystem, permissions taken away.
_REFUSING_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM}
_SQLITE_REFUSALS = ("database or disk is full", "disk I/O error", "readonly database", "unable to open database file")
LOCKED = "database is locked"  # SQLITE_BUSY past the busy timeout: another process holds the write lock


def open_database(path: str | Path) -> sqlite3.Connection:
    """A connection to the data directory's SQLite file as every store opens one: usable from any thread (each store
    guards its own), in autocommit (stores begin their transactions), WAL (a reader never waits for a writer),
    synchronous FULL ("stored" means on disk, power loss included), a write waiting `BUSY_TIMEOUT_S` for a lock."""
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


def write_refusal(exc: BaseException) -> str | None:
    """What the storage said when `exc` is it refusing a write, None for any other error (a bug keeps its traceback).
    Another process holding the database's write lock past `BUSY_TIMEOUT_S` (an operator's `sqlite3` shell in a
    transaction, a VACUUM) refuses it too, for as long as it holds it."""
    if isinstance(exc, sqlite3.OperationalError) and LOCKED in str(exc):
        return f"{exc}: another process has held its write lock for over {BUSY_TIMEOUT_S:g} s"
    if isinstance(exc, sqlite3.OperationalError) and any(text in str(exc) for text in _SQLITE_REFUSALS):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in _REFUSING_ERRNOS:
        return exc.strerror or str(exc)
    return None


class StorageHealth:
    """The writes that failed, by what they wrote: failing from the first until each has worked again. A read or an
    empty claim that works meanwhile writes nothing, so it ends nothing (one ERROR per streak, one WARNING at its end).

    A refused API write (a batch not queued, a fine-tune not created) is not retried by the server, so nothing would
    end its mark: `recheck` (the batch worker calls it at its pace) writes a probe file in the data directory and a
    probe row in its database, and clears those marks once both work."""

    def __init__(self, data_dir: Path | None = None, writable: Callable[[], bool] | None = None):
        self.probe = None if data_dir is None else Path(data_dir) / ".write-probe"
        self.database = None if data_dir is None else Path(data_dir) / DATABASE
        self.writable = writable  # on a thread, when a recheck finds writes work again: writes what waited for it, True once all is
        self._failing: dict[str, bool] = {}  # what failed → retried by its writer (else a refused API write)

    @property
    def ok(self) -> bool:
        return not self._failing

    def failed(self, what: str, line: str, retried: bool, exc: BaseException | None = None) -> None:
        """`line` is logged when this starts a streak; with `exc`'s traceback only when it is no storage refusal."""
        if not self._failing:
            log.error(line, exc_info=exc if exc is not None and write_refusal(exc) is None else None)
        self._failing[what] = retried

    def worked(self, what: str) -> None:
        if self._failing.pop(what, None) is not None and not self._failing:
            log.warning("storage: the data directory takes writes again")

    async def recheck(self) -> None:
        refused = [what for what, retried in self._failing.items() if not retried]
        if refused and self.probe is not None and await asyncio.to_thread(self._probe_writes):
            if self.writable is not None and not await asyncio.to_thread(self.writable):
                return  # what waited is not all written yet: still failing, tried again at the next recheck
            for what in refused:
                self.worked(what)

    def _probe_writes(self) -> bool:
        """A file written and synced, and a transaction the database commits: a disk, quota or file-size limit with a
        few KB left, a read-only or damaged database file, or another process's write lock pass the first alone."""
        try:
            with open(self.probe, "wb") as f:
                f.write(b"ok")
                f.flush()
                os.fsync(f.fileno())
            self.probe.unlink()
            self._probe_database()
        except (OSError, sqlite3.Error):
            return False
        return True

    def _probe_database(self) -> None:
        db = open_database(self.database)
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute("CREATE TABLE IF NOT EXISTS write_probe (id INTEGER PRIMARY KEY, at REAL NOT NULL)")
            db.execute("INSERT OR REPLACE INTO write_probe (id, at) VALUES (1, ?)", (time.time(),))
            db.execute("COMMIT")
        finally:
            db.close()  # a transaction left open is rolled back
