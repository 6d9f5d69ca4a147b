"""The playground page at `/`: static HTML/JS/CSS shipped in the package (no build step), talking to
this server's own `/v1/chat/completions` and `/ai/run` routes from the browser.

The page itself is public (it holds nothing); the API calls it makes carry the token the user types
when the server was started with `--api-token`.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

FILES = Path(__file__).with_name("playground")
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}

router = APIRouter(include_in_schema=False)


def is_playground_path(path: str) -> bool:
    """Paths served without a token: the page and its assets."""
    return path == "/" or path.startswith("/playground/")


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(FILES / "index.html", media_type=MEDIA_TYPES[".html"])


@router.get("/playground/{name}")
async def asset(name: str) -> FileResponse:
    path = FILES / name
    if path.suffix not in MEDIA_TYPES or path.parent != FILES or not path.is_file():
        raise HTTPException(status_code=404)
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix])
