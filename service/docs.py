"""``/docs`` without the internet: Swagger UI served from files installed with the package.

FastAPI's default page loads Swagger UI from a CDN, which leaves it blank on an offline hospital
network. The JavaScript and CSS come from the ``fastapi-offline`` distribution instead and are
served under ``/docs/static``. ``/docs``, its assets and ``/openapi.json`` describe the interface
only (no patient data, no host details) and need no API key, like the health probes.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(fastapi_offline.__file__).parent / "static"
STATIC_PATH = "/docs/static"

API_DESCRIPTION = """Send one fundus photograph per request, as the raw body with its Content-Type or
as the multipart field `file` (PNG, JPEG, TIFF or DICOM). Examples:

```
curl -X POST --data-binary @sample.jpg -H 'Content-Type: image/jpeg' \\
     -H 'Authorization: Bearer $KEY' http://localhost:8000/enhance -o enhanced.png
curl -X POST -F file=@sample.jpg 'http://localhost:8000/segment?threshold=0.5' -o vessels.png
curl -X POST --data-binary @sample.jpg -H 'Content-Type: image/jpeg' \\
     'http://localhost:8000/degrade?seed=7&types=illumination,blur' -D - -o degraded.png
curl -X POST --data-binary @study.dcm -H 'Content-Type: application/dicom' \\
     'http://localhost:8000/enhance?store=true&report=json'
```

With `FUNDUS_API_KEYS` set, every endpoint but `/healthz`, `/readyz`, `/docs` and `/openapi.json`
needs a key (`Authorization: Bearer <key>` or `X-API-Key: <key>`; "Authorize" below). `fundus sample`
writes a sample photograph to try."""


def install_offline_docs(app: FastAPI) -> None:
    """Serve Swagger UI at ``/docs`` from the installed assets (the app is built with docs_url=None)."""
    app.mount(STATIC_PATH, StaticFiles(directory=STATIC), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} — API",
            swagger_js_url=f"{STATIC_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{STATIC_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{STATIC_PATH}/favicon.png",
        )
