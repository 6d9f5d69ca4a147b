"""`previous_response_id` and `GET /v1/responses/{id}`: finished responses kept in the data directory's SQLite file.

Each finished response is kept twice over: as the response object (what `retrieve` returns) and as the
input items that would replay it: its own input, then its output turned back into input (reasoning,
assistant text, function calls). A follow-up naming it gets those items in front of its own input.
Kept on disk so a restart does not break a conversation; bounded by count and by age.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import TypeAdapter

from ossrun.api.errors import bad_input
from ossrun.api.schemas import ResponsesInput
from ossrun.harmony.shapes import InputItem, InputMessage

R = TypeVar("R", bound=ResponsesInput)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY, created_at REAL NOT NULL, replay TEXT NOT NULL, response TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_age ON responses(created_at);
"""


_ITEMS = TypeAdapter(list[InputItem])


def as_input_items(input_: str | Sequence[InputItem]) -> list[InputItem]:
    """A Responses `input` (string or items) as a list of items."""
    if isinstance(input_, str):
        return [InputMessage(role="user", content=input_)]
    return list(input_)


def output_as_input(item: dict[str, Any]) -> dict[str, Any] | None:
    """One output item of a response (our own JSON) as the input item that replays it."""
    if item["type"] == "reasoning":
        return {"type": "reasoning", "content": item.get("content", [])}
    if item["type"] == "message":
        return {"role": "assistant", "content": "".join(part.get("text", "") for part in item.get("content", []))}
    if item["type"] == "function_call":
        return {"type": "function_call", "call_id": item["call_id"], "name": item["name"], "arguments": item["arguments"]}
    return None


class ResponseStore:
    """SQLite (WAL, one connection behind a lock); `capacity` newest responses no older than `retention_s`."""

    def __init__(self, path: str | Path, capacity: int = 10_000, retention_s: float = 30 * 24 * 3600):
        self.capacity, self.retention_s = capacity, retention_s
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def continue_from(self, request: R) -> R:
        """The request with the named response's conversation in front of its input; 400 if unknown."""
        previous = request.previous_response_id
        row = self._row("replay", previous)
        if row is None:
            raise bad_input(f"Error: at '/previous_response_id': no stored response {previous!r} (unknown, or expired)",
                            "previous_response_id")
        return request.model_copy(update={"input": _ITEMS.validate_python(json.loads(row)) + as_input_items(request.input)})

    def get(self, response_id: str) -> dict[str, Any] | None:
        """The stored response object, or None."""
        row = self._row("response", response_id)
        return None if row is None else json.loads(row)

    def remember(self, response_id: str, items: str | Sequence[InputItem], store: bool, response: dict[str, Any]) -> None:
        """Keep a finished response (unless the client sent `store: false`), then drop what is past retention."""
        if not store or self.capacity <= 0:
            return
        replay = _ITEMS.dump_python(as_input_items(items), mode="json", exclude_unset=True)
        replay += [i for i in map(output_as_input, response.get("output") or []) if i is not None]
        now = time.time()
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses (id, created_at, replay, response) VALUES (?, ?, ?, ?)",
                             (response_id, now, json.dumps(replay), json.dumps(response)))
            self._db.execute("DELETE FROM responses WHERE created_at < ? OR id IN "
                             "(SELECT id FROM responses ORDER BY created_at DESC LIMIT -1 OFFSET ?)", (now - self.retention_s, self.capacity))

    def _row(self, column: str, response_id: str) -> str | None:
        with self._lock:
            row = self._db.execute(f"SELECT {column} FROM responses WHERE id = ? AND created_at >= ?",
                                   (response_id, time.time() - self.retention_s)).fetchone()
        return None if row is None else row[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
