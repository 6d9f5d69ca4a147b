"""`previous_response_id` and `/v1/responses/{id}` (retrieve, delete, input_items): finished responses kept in the
data directory's SQLite file.

Each finished response is kept twice over: as the response object (what `retrieve` returns) and as the
input items that would replay it: its own input, then its output turned back into input (reasoning,
assistant text, function calls). A follow-up naming it gets those items in front of its own input.
Every replayed item has an id, as OpenAI's items do: an output item keeps its own (`msg_`, `rs_`, `fc_`), an input
item keeps the one it was sent with or gets one when stored, so `input_items` names the same item alike in every
response of a conversation. Kept on disk so a restart does not break a conversation; bounded by count and by age.
"""

from __future__ import annotations

import hashlib
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
    """One output item of a response (our own JSON) as the input item that replays it (with the item's id)."""
    if item["type"] == "reasoning":
        return {"type": "reasoning", "id": item["id"], "content": item.get("content", [])}
    if item["type"] == "message":
        return {"role": "assistant", "id": item["id"], "content": "".join(part.get("text", "") for part in item.get("content", []))}
    if item["type"] == "function_call":
        return {"type": "function_call", "id": item["id"], "call_id": item["call_id"], "name": item["name"], "arguments": item["arguments"]}
    return None


# An input item's id prefix, by type, as OpenAI spells them.
_ID_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def _with_id(item: dict[str, Any]) -> dict[str, Any]:
    """A stored input item (JSON) with an id: its own, or a new one."""
    from ossrun.api.results import new_id  # results imports the service, which imports this module

    return item if isinstance(item.get("id"), str) else {**item, "id": new_id(_ID_PREFIX[item.get("type", "message")])}


def _text_parts(content: Any, role: str) -> list[Any]:
    """A message's content as OpenAI lists it: parts (`input_text`, or `output_text` for the assistant's)."""
    kind = "output_text" if role == "assistant" else "input_text"
    if content is None:
        return []
    if isinstance(content, str):
        content = [{"type": kind, "text": content}]
    parts = [{**part, "type": kind} if isinstance(part, dict) and part.get("type") == "text" else part for part in content]
    return [{"annotations": [], **part} if kind == "output_text" else part for part in parts]


def listed_item(item: dict[str, Any], fallback_id: str) -> dict[str, Any]:
    """A stored input item as `input_items` lists it (OpenAI's item shapes). `fallback_id`: for an item stored
    without one (by an older version), derived from the response and the position so it is the same on every call."""
    kind = item.get("type", "message")
    listed: dict[str, Any] = {"type": kind, **({} if kind == "reasoning" else {"status": "completed"}), **item,
                              "id": item.get("id") or fallback_id}
    if kind == "message":
        listed["role"] = item.get("role", "user")
        listed["content"] = _text_parts(item.get("content"), listed["role"])
    elif kind == "function_call":
        arguments = item.get("arguments")
        listed["arguments"] = arguments if isinstance(arguments, str) else json.dumps(arguments if arguments is not None else {})
    elif kind == "reasoning":
        listed.setdefault("summary", [])
    return listed


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
        stored = _ITEMS.validate_python(json.loads(row))
        continued = request.model_copy(update={"input": stored + as_input_items(request.input)})
        continued._stored_items = len(stored)
        return continued

    def get(self, response_id: str) -> dict[str, Any] | None:
        """The stored response object, or None."""
        row = self._row("response", response_id)
        return None if row is None else json.loads(row)

    def input_items(self, response_id: str) -> list[dict[str, Any]] | None:
        """The items a stored response was generated from, in order (a previous response's conversation included:
        what the model read), each with its id; None if unknown. The replay is these items then the output's."""
        with self._lock:
            row = self._db.execute("SELECT replay, response FROM responses WHERE id = ? AND created_at >= ?",
                                   (response_id, time.time() - self.retention_s)).fetchone()
        if row is None:
            return None
        replay, output = json.loads(row[0]), json.loads(row[1]).get("output") or []
        inputs = replay[:len(replay) - sum(output_as_input(item) is not None for item in output)]
        listed, seen = [], set()
        for index, item in enumerate(inputs):
            # An id sent twice (the same output item passed back twice) is listed once: a page ending at a repeated
            # id would send the SDK's auto-paging (`after` = that id) round in circles.
            fallback = _derived_id(response_id, index, item)
            listed.append(listed_item(item if item.get("id") not in seen else {**item, "id": fallback}, fallback))
            seen.add(listed[-1]["id"])
        return listed

    def delete(self, response_id: str) -> bool:
        """Forget a stored response (it can no longer be retrieved or continued); False if there was none."""
        with self._lock:
            deleted = self._db.execute("DELETE FROM responses WHERE id = ? AND created_at >= ?",
                                       (response_id, time.time() - self.retention_s)).rowcount
        return deleted > 0

    def remember(self, response_id: str, items: str | Sequence[InputItem], store: bool, response: dict[str, Any]) -> None:
        """Keep a finished response (unless the client sent `store: false`), then drop what is past retention."""
        if not store or self.capacity <= 0:
            return
        replay = [_with_id(item) for item in _ITEMS.dump_python(as_input_items(items), mode="json", exclude_unset=True)]
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


def _derived_id(response_id: str, index: int, item: dict[str, Any]) -> str:
    digest = hashlib.sha256(f"{response_id}/{index}".encode()).hexdigest()[:24]
    return f"{_ID_PREFIX[item.get('type', 'message')]}_{digest}"
