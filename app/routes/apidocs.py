"""``GET /docs`` (Swagger UI) and ``GET /redoc`` (ReDoc), served without internet.

FastAPI's own pages load their scripts from a CDN, so they are blank on a machine without
internet. Here their files come from the ``fastapi-offline`` package, served by the app from
a fixed list under ``/docs-assets/``; every URL carries the proxy's root path, so the pages
work under a sub-path too. The pages' one inline script (the viewer's start) runs by a nonce
of its response's Content-Security-Policy, which allows nothing from another origin.
"""

from __future__ import annotations

import functools
import secrets
from importlib import resources

from fastapi import APIRouter, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html

from app.errors import ApiError

router = APIRouter(include_in_schema=False)

ASSETS = resources.files("fastapi_offline") / "static"
FILES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
}
ASSET_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "public, max-age=86400",
}
TITLE = "wordrnn API"


def _page(html: bytes, nonce: str) -> Response:
    """``html`` with its inline scripts allowed by ``nonce`` and nothing from elsewhere
    (ReDoc draws with inline styles and runs its search in a worker from a blob)."""
    html = html.replace(b"<script>", f'<script nonce="{nonce}">'.encode())
    policy = (
        f"default-src 'none'; script-src 'self' 'nonce-{nonce}'; style-src 'self' "
        "'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; connect-src 'self'; "
        "worker-src 'self' blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    headers = {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff"}
    return Response(html, media_type="text/html; charset=utf-8", headers=headers)


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


@router.get("/docs")
async def swagger_ui(request: Request) -> Response:
    root = _root(request)
    page = get_swagger_ui_html(
        openapi_url=f"{root}/openapi.json",
        title=TITLE,
        swagger_js_url=f"{root}/docs-assets/swagger-ui-bundle.js",
        swagger_css_url=f"{root}/docs-assets/swagger-ui.css",
        swagger_favicon_url=f"{root}/static/favicon.svg",
    )
    return _page(bytes(page.body), secrets.token_urlsafe(16))


@router.get("/redoc")
async def redoc(request: Request) -> Response:
    root = _root(request)
    page = get_redoc_html(
        openapi_url=f"{root}/openapi.json",
        title=TITLE,
        redoc_js_url=f"{root}/docs-assets/redoc.standalone.js",
        redoc_favicon_url=f"{root}/static/favicon.svg",
        with_google_fonts=False,
    )
    return _page(bytes(page.body), secrets.token_urlsafe(16))


@functools.cache
def _read(name: str) -> bytes:
    """A file of the fixed list, read once (Swagger UI's bundle is over a megabyte)."""
    return (ASSETS / name).read_bytes()


@router.get("/docs-assets/{name}")
async def asset(name: str) -> Response:
    media_type = FILES.get(name)
    if media_type is None:
        raise ApiError(404, f"no documentation file {name!r}")
    return Response(_read(name), media_type=media_type, headers=ASSET_HEADERS)
