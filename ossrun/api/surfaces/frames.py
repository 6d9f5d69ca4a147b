"""Server-sent event frames (spec §5). Every stream ends with `data: [DONE]`."""

from __future__ import annotations

import json
import logging
from typing import Any

from ossrun.api import request_ids
from ossrun.api.errors import ApiError, openai_error_object

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"

# JSON may carry U+2028, U+2029 and U+0085 raw, and SSE ends lines only at CR and LF; but readers that split lines as
# `str.splitlines` does (httpx's `iter_lines`, some SSE libraries) end a line there and cut the frame in two. Escaped,
# they are the same JSON value. (The other characters `splitlines` breaks at are controls, which JSON always escapes.)
_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def frame(data: Any, event: str | None = None) -> bytes:
    """The one writer of a stream's frames: `data: <json>`, after `event: <name>` when given. Strict JSON, as a sync
    answer's (`JSONResponse`): a value JSON cannot carry (inf, NaN) fails the stream with its error frame rather than
    send Python's `Infinity`, which `JSON.parse` refuses."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False, allow_nan=False).translate(_LINE_BREAKS)}\n\n".encode()


def stream_error(exc: Exception) -> ApiError:
    """What a stream that failed mid-way tells its client: the error itself, or (logged here) an internal error."""
    if isinstance(exc, ApiError):
        return exc
    log.exception("stream failed request_id=%s", request_ids.current())
    return ApiError(500, 3000, "internal error")


def error_frames(error: ApiError, openai_shape: bool) -> list[bytes]:
    """The frame a chunk stream ends with when generation fails: OpenAI's error object on the /v1 routes (what the
    SDKs raise `APIError` from), Workers AI's `{message, code}` on /ai/run."""
    detail = openai_error_object(error) if openai_shape else {"message": error.message, "code": error.code}
    return [frame({"error": detail})]


async def nothing_to_keep() -> None:
    """A surface's `keep` where the answer's end writes nothing (every surface but the Responses one)."""
