"""`previous_response_id` and `/v1/responses/{id}` (retrieve, delete, input_items, cancel): finished responses kept in
the data directory's SQLite file, and background ones from their start (`in_progress`, replaced when they end).

Each finished response is kept twice over: as the response object (what `retrieve` returns) and as the
input items that would replay it: its own input, then its output turned back into input (reasoning,
assistant text, function calls). A follow-up naming it gets those items in front of its own input.
Every replayed item has an id, as OpenAI's items do: an output item keeps its own (`msg_`, `rs_`, `fc_`), an input
item keeps the one it was sent with or gets one when first stored (a background response is stored twice), so
`input_items` names the same item alike in every response of a conversation. Each item is also kept by its id
(table `response_items`, a row per response holding it), so an `item_reference` in a later input finds it: the AI
SDK sends one for each earlier output item rather than the item. Kept on disk so a restart does not break a
conversation; bounded by count and by age.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pydantic import TypeAdapter

from ossrun.api.errors import ApiError, bad_input
from ossrun.api.schemas import ResponsesInput
from ossrun.harmony.shapes import InputItem, InputMessage, ItemReference
from ossrun.storage import open_database

R = TypeVar("R", bound=ResponsesInput)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY, created_at REAL NOT NULL, replay TEXT NOT NULL, response TEXT NOT NULL,
    size INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS responses_age ON responses(created_at);
"""
# Each stored item by the id `input_items` lists it with, one row per response holding it, for `item_reference`. Made
# with the rows of the responses already stored when missing (a file of an older version): `_index_stored_items`.
_ITEMS_SCHEMA = (
    "CREATE TABLE response_items (id TEXT NOT NULL, response_id TEXT NOT NULL, item TEXT NOT NULL, "
    "PRIMARY KEY (id, response_id))",
    "CREATE INDEX response_items_response ON response_items(response_id)",
    # Whatever deletes a response (DELETE, expiry, the count bound) deletes its items.
    "CREATE TRIGGER responses_items AFTER DELETE ON responses BEGIN DELETE FROM response_items WHERE response_id = old.id; END",
)


# The stored responses' bytes (their replay and JSON), newest kept: the count and age bounds alone let a client fill the
# disk with responses of large inputs (hunt round 15 B-F3: 9 MB each, 10,000 kept), and the batch queue and the
# fine-tunes share the data directory. The oldest go first, as past the count.
STORED_BYTES = 2 << 30
_DROP_PAST_BYTES = ("DELETE FROM responses WHERE id IN (SELECT id FROM (SELECT id, SUM(size) OVER "
                    "(ORDER BY created_at DESC, id DESC) AS newer FROM responses) WHERE newer > ?)")


# The most characters (the stored items' JSON) the `item_reference`s of one request may read: the body cap
# (`app.MAX_BODY_BYTES`), so that references let a request read no more than it could send inline. A conversation
# that fits the context window (131,072 tokens, a few characters each) takes a small part of it; the window's own
# rule (a conversation of more messages than it could hold is refused before it is rendered) applies after the
# references are resolved.
REFERENCED_CHARS = 10 * 1024 * 1024


def _stored_size(replay: str, response: str) -> int:
    return len(replay.encode()) + len(response.encode())


_ITEMS = TypeAdapter(list[InputItem])
_ITEM = TypeAdapter(InputItem)


def as_input_items(input_: str | Sequence[InputItem]) -> list[InputItem]:
    """A Responses `input` (string or items) as a list of items."""
    if isinstance(input_, str):
        return [InputMessage(role="user", content=input_)]
    return list(input_)


def output_as_input(item: dict[str, Any]) -> dict[str, Any] | None:
    """One output item of a response (our own JSON) as the input item that replays it (with the item's id)."""
    if item["type"] == "reasoning":  # its summary (with `reasoning.summary`) too, so `input_items` lists it as it was
        summary = {"summary": item["summary"]} if item.get("summary") else {}
        return {"type": "reasoning", "id": item["id"], "content": item.get("content", []), **summary}
    if item["type"] == "message":  # its phase says whether it was a preamble (commentary) or the answer
        text = "".join(part.get("text", "") for part in item.get("content", []))
        return {"role": "assistant", "id": item["id"], "content": text, **_kept(item, "phase")}
    if item["type"] == "function_call":  # its status says whether it was cut (`incomplete`: it needs no output)
        called = {"type": "function_call", "id": item["id"], "call_id": item["call_id"], "name": item["name"], "arguments": item["arguments"]}
        return {**called, **_kept(item, "namespace", "status")}
    return None


def _kept(item: dict[str, Any], *keys: str) -> dict[str, Any]:
    """The fields of `item` among `keys` that it has and are not null."""
    return {key: item[key] for key in keys if item.get(key) is not None}


# An input item's id prefix, by type, as OpenAI spells them.
_ID_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def _with_id(item: dict[str, Any], given: str | None = None) -> dict[str, Any]:
    """A stored input item (JSON) with an id: its own, the one `given` it when first stored, or a new one."""
    from ossrun.api.results import new_id  # results imports the service, which imports this module

    if isinstance(item.get("id"), str):
        return item
    return {**item, "id": given or new_id(_ID_PREFIX[item.get("type", "message")])}


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
    """SQLite (`storage.open_database`: WAL); the `capacity` newest responses no older than `retention_s`, within
    `capacity_bytes` (`STORED_BYTES`) of stored JSON. A connection for
    writes and one for reads, each behind its own lock: a write (on a thread: `Service.write`) can wait out another
    process's write lock, and a read (a retrieve, a `previous_response_id`, on the event loop) never waits behind it.

    A response stored again whose new copy the file refuses (a background run's end on a disk that filled up meanwhile)
    is held in memory (`held` newest) and read before the file's snapshot: a poller sees it end rather than
    `in_progress` until a restart fails it. It cannot be continued (its output is not in the file)."""

    def __init__(self, path: str | Path, capacity: int = 10_000, retention_s: float = 30 * 24 * 3600, held: int = 256,
                 capacity_bytes: int = STORED_BYTES, referenced_chars: int = REFERENCED_CHARS):
        self.capacity, self.retention_s, self.held, self.capacity_bytes = capacity, retention_s, held, capacity_bytes
        self.referenced_chars = referenced_chars
        self._held: OrderedDict[str, dict[str, Any]] = OrderedDict()  # by id: ends the file refused, oldest first
        self._unkept: OrderedDict[str, None] = OrderedDict()  # answered responses whose only copy it refused, oldest first
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = open_database(path)
        self._db.executescript(_SCHEMA)
        self._measure_stored_rows()
        self.damaged = self._damaged_rows()  # the server names them once at start (`Service`)
        self._index_stored_items()
        self._fail_interrupted()
        self._read_lock = threading.Lock()
        self._reader = open_database(path)

    def expand(self, request: R) -> R:
        """The request as the model reads it: each `item_reference` in its input replaced by the stored item it names
        (as if sent inline, its id kept), then a `previous_response_id`'s conversation in front. An item of the input
        whose id is already there is a 400, as OpenAI answers it: the model would read it twice. An id repeated in the
        input itself is refused before any reference is looked up (each lookup is a query and a parse: 30,000
        references to one 40 KB item took 57 s and 1.1 GB before the duplicate was found, hunt round 17 A-F9), so each
        id is resolved once at most. Reads the file and parses what it holds: callers run it on a worker thread."""
        if not isinstance(request.input, str):
            _refuse_duplicates(0, list(request.input))
        request = self._resolve_references(request)
        expanded = request if request.previous_response_id is None else self.continue_from(request)
        _refuse_duplicates(expanded._stored_items, as_input_items(expanded.input))
        return expanded

    def _resolve_references(self, request: R) -> R:
        if isinstance(request.input, str) or not any(isinstance(item, ItemReference) for item in request.input):
            return request
        read = [0]  # the characters of the stored items read so far
        return request.model_copy(update={"input": [self._referenced(item, i, read) if isinstance(item, ItemReference) else item
                                                    for i, item in enumerate(request.input)]})

    def _referenced(self, reference: ItemReference, index: int, read: list[int]) -> InputItem:
        """The stored item `input[index]` names; a 400 in OpenAI's words if none. The oldest response holding it is read
        (the one that made it, or was first given it): a later request sending another item under that id (an edited
        copy) does not change what the id names. `read` counts the characters the references read, a 400 past
        `referenced_chars` (REFERENCED_CHARS), before the item that would pass it is parsed."""
        with self._read_lock:
            row = self._reader.execute("SELECT i.item FROM response_items i JOIN responses r ON r.id = i.response_id "
                                       "WHERE i.id = ? AND r.created_at >= ? ORDER BY r.created_at ASC, r.rowid ASC LIMIT 1",
                                       (reference.id, time.time() - self.retention_s)).fetchone()
        if row is None:
            raise bad_input(f"Error: at '/input/{index}/id': Item with id {reference.id!r} not found.", f"input[{index}].id")
        read[0] += len(row[0])
        if read[0] > self.referenced_chars:
            raise bad_input(f"Error: at '/input/{index}/id': the items referenced take more than the {self.referenced_chars} "
                            "characters (as stored JSON) that references may read, as much as a body may send inline; "
                            "send fewer references (or the items themselves)", f"input[{index}].id")
        return _ITEM.validate_python(json.loads(row[0]))

    def continue_from(self, request: R) -> R:
        """The request with the named response's conversation in front of its input; 400 if unknown."""
        previous = request.previous_response_id
        row = self._row("replay", previous)
        if row is None and self.unkept(previous):
            raise bad_input(f"Error: at '/previous_response_id': response {previous!r} was answered while the data "
                            "directory refused writes (a full disk?), so it was not stored; it cannot be continued",
                            "previous_response_id")
        if row is None:
            raise bad_input(f"Error: at '/previous_response_id': no stored response {previous!r} (unknown, or expired)",
                            "previous_response_id")
        if self._held.get(previous) is not None:
            raise bad_input(f"Error: at '/previous_response_id': response {previous!r} ended while the data directory "
                            "refused writes, so its output was not stored; it cannot be continued", "previous_response_id")
        status = _loaded(self._row("response", previous) or "{}", previous, 400, "previous_response_id").get("status")
        if status == "in_progress":  # a background run: its output is not there yet
            raise bad_input(f"Error: at '/previous_response_id': response {previous!r} is still in progress; continue "
                            "from it once it has ended", "previous_response_id")
        if status == "failed":  # only a background one is stored failed; another is not stored, so the same 400
            raise bad_input(f"Error: at '/previous_response_id': response {previous!r} failed; a failed response is no "
                            "conversation to continue (continue from the one before it)", "previous_response_id")
        stored = _ITEMS.validate_python(_loaded(row, previous, 400, "previous_response_id"))
        continued = request.model_copy(update={"input": stored + as_input_items(request.input)})
        continued._stored_items = len(stored)
        return continued

    def get(self, response_id: str) -> dict[str, Any] | None:
        """The stored response object (held in memory if the file refused its last copy), or None."""
        held = self._held.get(response_id)  # written on a writer's thread: read once
        if held is not None:
            return held
        row = self._row("response", response_id)
        return None if row is None else _loaded(row, response_id)

    def unkept(self, response_id: str) -> bool:
        """Whether `response_id` was answered while the file refused to store it (`_holding_if_refused`): its later
        retrieve or continuation says so rather than "unknown" (hunt round 23 C-F3). In memory: until a restart."""
        return response_id in self._unkept

    def input_items(self, response_id: str) -> list[dict[str, Any]] | None:
        """The items a stored response was generated from, in order (a previous response's conversation included:
        what the model read), each with its id; None if unknown. The replay is these items then the output's."""
        with self._read_lock:
            row = self._reader.execute("SELECT replay, response FROM responses WHERE id = ? AND created_at >= ?",
                                       (response_id, time.time() - self.retention_s)).fetchone()
        if row is None:
            return None
        inputs, _ = _split(_loaded(row[0], response_id), _loaded(row[1], response_id))
        return [listed_item({**item, "id": item_id}, item_id) for item_id, item in zip(_listed_ids(response_id, inputs), inputs)]

    def delete(self, response_id: str) -> bool:
        """Forget a stored response (it can no longer be retrieved or continued); False if there was none."""
        with self._lock:
            deleted = self._db.execute("DELETE FROM responses WHERE id = ? AND created_at >= ?",
                                       (response_id, time.time() - self.retention_s)).rowcount
            self._held.pop(response_id, None)
        return deleted > 0

    def remember(self, response_id: str, items: str | Sequence[InputItem], store: bool, response: dict[str, Any],
                 replacing: bool = False) -> None:
        """Keep a finished response (unless the client sent `store: false`), then drop what is past retention.
        `replacing`: only over the copy the file holds (a background run's end over its snapshot), so a response
        deleted while it ran stays deleted."""
        if not store or self.capacity <= 0:
            return
        sent = _ITEMS.dump_python(as_input_items(items), mode="json", exclude_unset=True)
        outputs = [i for i in map(output_as_input, response.get("output") or []) if i is not None]
        now = time.time()
        with self._lock, self._holding_if_refused(response_id, response), self._transaction():
            if replacing and not self._holds_a_copy(response_id):
                return
            given = self._input_ids(response_id, len(sent))
            self._store(response_id, [_with_id(item, item_id) for item, item_id in zip(sent, given)], outputs, response, now)

    def _store(self, response_id: str, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]], response: dict[str, Any],
               now: float) -> None:
        """One response's row and items written, then what is past retention dropped. The caller holds the lock, in a
        transaction."""
        # Deleted, not replaced: INSERT OR REPLACE fires no delete trigger, so a background response's snapshot
        # would leave its item rows behind.
        self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,))
        replay, kept = json.dumps(inputs + outputs), json.dumps(response)
        self._db.execute("INSERT INTO responses (id, created_at, replay, response, size) VALUES (?, ?, ?, ?, ?)",
                         (response_id, now, replay, kept, _stored_size(replay, kept)))
        self._db.executemany(_INSERT_ITEM, _item_rows(response_id, inputs, outputs))
        # The trigger `responses_items` drops the items of every response deleted here.
        self._db.execute("DELETE FROM responses WHERE created_at < ? OR id IN "
                         "(SELECT id FROM responses ORDER BY created_at DESC LIMIT -1 OFFSET ?)", (now - self.retention_s, self.capacity))
        self._db.execute(_DROP_PAST_BYTES, (self.capacity_bytes,))

    def write_held(self) -> bool:
        """The ends held in memory (`_holding_if_refused`) written over their snapshots, oldest first, once the data
        directory takes writes again (`StorageHealth.recheck`) and at a graceful stop: they were kept in memory only,
        so a restart read each as interrupted though a poller had seen it complete (hunt round 23 C-F2). One the file
        still refuses stays held (and those after it); one deleted meanwhile stays deleted. True once none is held."""
        with self._lock:
            for response_id, response in list(self._held.items()):
                try:
                    with self._transaction():
                        self._store_held(response_id, response)
                except sqlite3.Error:  # the streak goes on (`StorageHealth.recheck` tries again)
                    return False
                del self._held[response_id]
        return True

    def _store_held(self, response_id: str, response: dict[str, Any]) -> None:
        """A held end written with the input items (and their ids) of the snapshot it replaces. The caller holds the
        lock, in a transaction."""
        inputs = self._stored_inputs(response_id)
        if inputs is not None:
            outputs = [i for i in map(output_as_input, response.get("output") or []) if i is not None]
            self._store(response_id, inputs, outputs, response, time.time())

    @contextmanager
    def _holding_if_refused(self, response_id: str, response: dict[str, Any]) -> Iterator[None]:
        """A write of a response the file already holds (a snapshot) that fails: the new copy is held in memory; one it
        does not hold is named as not kept (`unkept`). Then the error raised as it was (the caller reports it). A write
        that works ends the hold. The caller holds the lock."""
        try:
            yield
        except sqlite3.Error:
            if self._holds_a_copy(response_id):
                _bounded_put(self._held, response_id, response, self.held)
            else:
                _bounded_put(self._unkept, response_id, None, self.held)
            raise
        self._held.pop(response_id, None)

    def _holds_a_copy(self, response_id: str) -> bool:
        try:
            return self._db.execute("SELECT 1 FROM responses WHERE id = ?", (response_id,)).fetchone() is not None
        except sqlite3.Error:  # the file cannot be read either: its last copy is as good as lost
            return True

    def _input_ids(self, response_id: str, count: int) -> list[str | None]:
        """The ids the `count` input items of a response stored again (a background one: its `in_progress` snapshot,
        then its end) were given the first time, so they are listed by the same ids throughout; Nones if it was not
        stored with as many. The caller holds the lock."""
        inputs = self._stored_inputs(response_id) or []
        if len(inputs) != count:
            return [None] * count
        return [item.get("id") for item in inputs]

    def _stored_inputs(self, response_id: str) -> list[dict[str, Any]] | None:
        """The input items of the copy the file holds (with their ids), None if none. The caller holds the lock."""
        row = self._db.execute("SELECT replay, response FROM responses WHERE id = ?", (response_id,)).fetchone()
        return None if row is None else _split(json.loads(row[0]), json.loads(row[1]))[0]

    def _fail_interrupted(self) -> None:
        """A background response still `in_progress` in the file was running when the last process ended, or ended while
        the data directory refused writes until the process stopped (its end held in memory, `write_held`): it will
        never be stored, so it is kept `failed` (a poller waiting for it to end stops), its output as its snapshot had
        it. The message says both, not only that it was interrupted (hunt round 23 C-F2)."""
        error = json.dumps({"code": "server_error", "message": "the server stopped before this background response's end "
                            "was stored (it was still running, or the data directory refused to store it)"})
        with self._lock:
            self._db.execute("UPDATE responses SET response = json_set(response, '$.status', 'failed', '$.error', json(?)) "
                             "WHERE CASE WHEN json_valid(response) THEN json_extract(response, '$.status') END = 'in_progress'",
                             (error,))

    def _damaged_rows(self) -> tuple[str, ...]:
        """The ids of the stored responses whose JSON cannot be read (a hand edit, a partial restore), which the passes
        over every row at start skip: one such row stopped the server ("malformed JSON"), and the error said to move the
        whole file aside, the batch queue with it (hunt round 18 B-F3)."""
        with self._lock:
            return tuple(row[0] for row in self._db.execute(
                "SELECT id FROM responses WHERE NOT (json_valid(replay) AND json_valid(response))"))

    def _measure_stored_rows(self) -> None:
        """A file of an older version has no `size` column: added, with every stored row's size, once."""
        with self._lock, self._transaction():
            if any(column[1] == "size" for column in self._db.execute("PRAGMA table_info(responses)")):
                return
            self._db.execute("ALTER TABLE responses ADD COLUMN size INTEGER NOT NULL DEFAULT 0")
            self._db.execute("UPDATE responses SET size = length(CAST(replay AS BLOB)) + length(CAST(response AS BLOB))")

    def _index_stored_items(self) -> None:
        """A file without `response_items` (an older version's) gets it, with every stored response's items, in one
        transaction: a reference to an item of a conversation held across the upgrade is found."""
        with self._lock, self._transaction():
            if self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'response_items'").fetchone():
                return
            for statement in _ITEMS_SCHEMA:
                self._db.execute(statement)
            rows = self._db.execute("SELECT id, replay, response FROM responses WHERE json_valid(replay) AND json_valid(response)")
            for response_id, replay, response in rows.fetchall():
                self._index_stored_row(response_id, json.loads(replay), json.loads(response))

    def _index_stored_row(self, response_id: str, replay: list[dict[str, Any]], response: dict[str, Any]) -> None:
        """One stored response's items indexed; a replay of the versions that first stored responses (f5078f8, from
        222d994 to 622520b), whose items have no ids, is written again with them (`_named_items`), so a continuation
        carries the ids its items are listed and referenced by (hunt round 18 B-F1: a KeyError here kept the server
        from starting). The caller holds the lock, in a transaction."""
        inputs, outputs = _named_items(response_id, *_split(replay, response), response)
        if inputs + outputs != replay:
            named, kept = json.dumps(inputs + outputs), json.dumps(response)
            self._db.execute("UPDATE responses SET replay = ?, size = ? WHERE id = ?", (named, _stored_size(named, kept), response_id))
        self._db.executemany(_INSERT_ITEM, _item_rows(response_id, inputs, outputs))

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One transaction (the caller holds the lock): a response is kept with its items, or not at all."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _row(self, column: str, response_id: str) -> str | None:
        with self._read_lock:
            row = self._reader.execute(f"SELECT {column} FROM responses WHERE id = ? AND created_at >= ?",
                                       (response_id, time.time() - self.retention_s)).fetchone()
        return None if row is None else row[0]

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._db.close()
            self._reader.close()


_INSERT_ITEM = "INSERT OR REPLACE INTO response_items (id, response_id, item) VALUES (?, ?, ?)"


def _bounded_put(kept: OrderedDict[str, Any], key: str, value: Any, most: int) -> None:
    """`kept[key] = value` as its newest, the oldest dropped past `most`."""
    kept[key] = value
    kept.move_to_end(key)
    while len(kept) > most:
        kept.popitem(last=False)


def _loaded(text: str, response_id: str, status: int = 404, param: str = "response_id") -> Any:
    """A stored row's JSON. A damaged one (a hand edit, a partial restore: set aside and named at start,
    `_damaged_rows`) is the 4xx an unusable id gets (404 by its path, 400 as `previous_response_id`), naming the damaged
    copy and what to do: it was a 500 with a traceback, retried twice by the SDKs (hunt round 23 C-F1)."""
    try:
        return json.loads(text)
    except ValueError:
        raise ApiError(status, 5006, f"AiError: stored response {response_id!r} cannot be read: its JSON in the data "
                                     f"directory is damaged (a hand edit, a partial restore?); delete it (DELETE "
                                     f"/v1/responses/{response_id}) or restore it", param) from None


def _split(replay: list[dict[str, Any]], response: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A stored replay as (the input items the response was generated from, its output items as input)."""
    outputs = sum(output_as_input(item) is not None for item in response.get("output") or [])
    return replay[:len(replay) - outputs], replay[len(replay) - outputs:]


def _refuse_duplicates(stored: int, items: list[InputItem]) -> None:
    """A 400 naming the first item of the caller's own input (after `stored` items of a previous response's
    conversation) whose id an item before it carries: sent or referenced twice, or already in that conversation. Only
    ids items arrive with count (an id-less item is given a new one when stored)."""
    seen = {_own_id(item) for item in items[:stored]}
    for index, item in enumerate(items[stored:]):
        item_id = _own_id(item)
        if item_id is not None and item_id in seen:
            raise bad_input(f"Error: at '/input/{index}/id': Duplicate item found with id {item_id}. Remove duplicate "
                            "items from your input and try again.", f"input[{index}].id")
        seen.add(item_id)


def _own_id(item: InputItem) -> str | None:
    item_id = getattr(item, "id", None)  # an extra field of the shape, kept as sent
    return item_id if isinstance(item_id, str) and item_id else None


def _listed_ids(response_id: str, inputs: list[dict[str, Any]]) -> list[str]:
    """The id each input item is listed (and found) by: its own, or one derived from its place (an item stored
    without one by an older version, or an id sent twice: a page ending at a repeated id would send the SDK's
    auto-paging, `after` = that id, round in circles)."""
    ids: list[str] = []
    seen: set[str] = set()
    for index, item in enumerate(inputs):
        own = item.get("id")
        ids.append(own if isinstance(own, str) and own and own not in seen else _derived_id(response_id, index, item))
        seen.add(ids[-1])
    return ids


def _item_rows(response_id: str, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The `response_items` rows of a stored response: each item it holds, by the id `input_items` lists it with."""
    named = [*zip(_listed_ids(response_id, inputs), inputs), *((item["id"], item) for item in outputs)]
    return [(item_id, response_id, json.dumps({**item, "id": item_id})) for item_id, item in named]


def _named_items(response_id: str, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]],
                 response: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A stored response's replayed items, each with an id: an input item stored without one by the id `input_items`
    lists it with (`_listed_ids`), an output item by the id of the response's output item it replays (the one the
    client was answered with, and sends back as an `item_reference`)."""
    output_ids = [item["id"] for item in response.get("output") or [] if output_as_input(item) is not None]
    return ([_with_id(item, item_id) for item, item_id in zip(inputs, _listed_ids(response_id, inputs))],
            [_with_id(item, item_id) for item, item_id in zip(outputs, output_ids)])


def _derived_id(response_id: str, index: int, item: dict[str, Any]) -> str:
    from ossrun.api.results import new_id  # results imports the service, which imports this module

    return new_id(_ID_PREFIX[item.get("type", "message")], f"{response_id}/{index}")
