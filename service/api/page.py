"""The web page: ``/`` answers ``static/ui/index.html``, ``/ui/...`` its script, style and demo digits.

The files ship inside the package (``pyproject.toml`` package-data) and are plain HTML, CSS and
JavaScript, no build step; the page loads nothing from elsewhere, which its Content-Security-Policy
enforces in the browser. It is open (no key): the page asks for the API key itself and sends it
as the bearer header of the API calls it makes.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

UI_DIR = Path(__file__).resolve().parent / "static" / "ui"
# Everything from this origin only; images may also be blob: URLs (the job's noisy copies and
# curve are fetched with the key, then shown from memory).
CSP = (
    "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)


def mount_page(app: FastAPI) -> None:
    """Serve the page at ``/`` and its assets under ``/ui``; neither is in the OpenAPI document."""
    app.mount("/ui", StaticFiles(directory=UI_DIR), name="ui")

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(
            UI_DIR / "index.html",
            media_type="text/html",
            headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"},
        )
