"""The API document's page at `/docs`: Swagger UI over `/openapi.json`, its script and style served by this server.

FastAPI's own `/docs` (and `/redoc`) load their scripts from a CDN, so on a machine without the internet, which is
where ossrun runs, the page stayed blank. The assets come from the `fastapi-swagger` package (Swagger UI 5, which
reads OpenAPI 3.1). Like the playground's files they hold nothing and are served without a token; the page itself
and the document it loads stay behind `--api-token` as the API does.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, HTTPException
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response

ASSET_PREFIX = "/docs/assets/"
ASSETS = {"swagger-ui-bundle.js": "text/javascript; charset=utf-8", "swagger-ui.css": "text/css; charset=utf-8",
          "favicon-32x32.png": "image/png"}

router = APIRouter(include_in_schema=False)


def is_asset_path(path: str) -> bool:
    """Paths served without a token: Swagger UI's own files."""
    return path.startswith(ASSET_PREFIX)


@router.get("/docs")
async def page() -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="ossrun API",
                               swagger_js_url=ASSET_PREFIX + "swagger-ui-bundle.js",
                               swagger_css_url=ASSET_PREFIX + "swagger-ui.css",
                               swagger_favicon_url=ASSET_PREFIX + "favicon-32x32.png")


@router.get(ASSET_PREFIX + "{name}")
async def asset(name: str) -> Response:
    if name not in ASSETS:
        raise HTTPException(status_code=404)
    content = resources.files("fastapi_swagger.resources").joinpath(name).read_bytes()
    return Response(content, media_type=ASSETS[name], headers={"Cache-Control": "public, max-age=86400"})
