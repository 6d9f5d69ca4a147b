"""Server-sent event frames (spec §5). Every stream ends with `data: [DONE]`."""

from __future__ import annotations

import json
import logging
from typing import Any

from ossrun.api.errors import ApiError

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


def frame(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def error_frame(exc: Exception) -> bytes:
    if isinstance(exc, ApiError):
        return frame({"error": {"message": exc.message, "code": exc.code}})
    log.exception("stream failed")
    return frame({"error": {"message": "internal error", "code": 3000}})
