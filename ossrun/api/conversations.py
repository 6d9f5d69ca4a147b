"""`previous_response_id`: the Responses API's multi-turn, from a bounded memory of recent responses.

Each finished response is kept as the input items that would replay it: its own input, then its
output turned back into input (reasoning, assistant text, function calls). A follow-up naming it
gets those items in front of its own input. Memory only: a restart forgets, and so does the LRU.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from ossrun.api.errors import bad_input


def as_input_items(input_: Any) -> list[dict[str, Any]]:
    """A Responses `input` (string or items) as a list of items."""
    if isinstance(input_, str):
        return [{"role": "user", "content": input_}]
    return list(input_)


def output_as_input(item: dict[str, Any]) -> dict[str, Any] | None:
    """One output item of a response as the input item that replays it."""
    if item["type"] == "reasoning":
        return {"type": "reasoning", "content": item.get("content", [])}
    if item["type"] == "message":
        return {"role": "assistant", "content": "".join(part.get("text", "") for part in item.get("content", []))}
    if item["type"] == "function_call":
        return {"type": "function_call", "call_id": item["call_id"], "name": item["name"], "arguments": item["arguments"]}
    return None


class ResponseMemory:
    def __init__(self, capacity: int = 1024):
        self.capacity = capacity
        self._items: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def continue_from(self, body: dict[str, Any]) -> dict[str, Any]:
        """The body with the named response's conversation in front of its input; 400 if unknown."""
        previous = body["previous_response_id"]
        with self._lock:
            items = self._items.get(previous) if isinstance(previous, str) else None
            if items is not None:
                self._items.move_to_end(previous)
        if items is None:
            raise bad_input(f"Error: at '/previous_response_id': no stored response {previous!r} (unknown, or forgotten)",
                            "previous_response_id")
        return {**body, "input": items + as_input_items(body["input"])}

    def remember(self, response_id: str, body: dict[str, Any], response: dict[str, Any]) -> None:
        """Keep a finished response (unless the client sent `store: false`)."""
        if body.get("store") is False or self.capacity <= 0:
            return
        replay = [item for item in map(output_as_input, response.get("output") or []) if item is not None]
        with self._lock:
            self._items[response_id] = as_input_items(body["input"]) + replay
            self._items.move_to_end(response_id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
