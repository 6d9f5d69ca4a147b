"""Server-sent event frames (spec §5). Every stream ends with `data: [DONE]`."""

from __future__ import annotations

import json
import logging
from typing import Any

from ossrun.api import request_ids
from ossrun.api.errors import ApiError

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"

# JSON may carry U+2028, U+2029 and U+0085 raw, and SSE ends lines only at CR and LF; but readers that split lines as
# `str.splitlines` does (httpx's `iter_lines`, some SSE libraries) end a line there and cut the frame in two. Escaped,
# they are the same JSON value. (The other characters `splitlines` breaks at are controls, which JSON always escapes.)
_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def frame(data: Any, event: str | None = None) -> bytes:
    """The one writer of a stream's frames: `data: <json>`, after `event: <name>` when given."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False).translate(_LINE_BREAKS)}\n\n".encode()


def error_frame(exc: Exception) -> bytes:
    if isinstance(exc, ApiError):
        return frame({"error": {"message": exc.message, "code": exc.code}})
    log.exception("stream failed request_id=%s", request_ids.current())
    return frame({"error": {"message": "internal error", "code": 3000}})
