"""``GET /``: the playground page, and ``GET /static/{name}``: its script, style and icon.

The files ship inside the package (``app/static``, package data) and are served from a fixed
list, never from a path the client builds. The page and its files carry a
Content-Security-Policy that allows this origin only: nothing is loaded from anywhere else,
and no inline script or style runs. All the page's URLs are relative, so it works under a
proxy's sub-path (``/textgen/``).
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Response

from app.errors import ApiError
from app.routes.docs import errors

router = APIRouter(tags=["playground"])

STATIC = resources.files("app") / "static"
FILES = {
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _file(name: str, media_type: str) -> Response:
    return Response((STATIC / name).read_bytes(), media_type=media_type, headers=HEADERS)


@router.get(
    "/",
    response_class=Response,
    responses={
        200: {"content": {"text/html": {}}, "description": "The playground page."},
        **errors(429),
    },
    summary="The playground",
)
async def playground() -> Response:
    """A page to try the model in a browser (`POST /` is Hugging Face's protocol)."""
    return _file("index.html", "text/html; charset=utf-8")


@router.get("/static/{name}", include_in_schema=False)
async def static_file(name: str) -> Response:
    media_type = FILES.get(name)
    if media_type is None:
        raise ApiError(404, f"no static file {name!r}")
    return _file(name, media_type)
