"""``GET /ui``: a small before/after viewer served by the API itself (``/`` redirects there).

Plain HTML, CSS and JavaScript shipped in the package (``service/ui``): no CDN, no build step. The
page talks only to this service (a Content-Security-Policy says so to the browser), keeps an API
key in memory only, and images live in the browser as object URLs; the server keeps nothing.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

UI = Path(__file__).parent / "ui"
#: Everything from this origin only; images also from the page's own object URLs.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def install_viewer(app: FastAPI) -> None:
    """``/ui`` (page), ``/ui/static`` (its script and style) and ``/`` → ``/ui``."""
    app.mount("/ui/static", StaticFiles(directory=UI), name="ui-static")

    @app.get("/ui", include_in_schema=False)
    async def viewer() -> FileResponse:
        return FileResponse(UI / "index.html", media_type="text/html", headers=SECURITY_HEADERS)

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/ui", status_code=307)
