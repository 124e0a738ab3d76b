"""The manual at ``/manual/``: the site ``make docs`` builds into ``site/``, served as files.

The site is built from ``docs/`` by MkDocs with the Material theme (``mkdocs.yml``): plain HTML,
CSS, JavaScript and a search index, nothing from another origin. Its pages carry a few inline
scripts of the theme; each answer's Content-Security-Policy allows exactly those, by their
SHA-256, and otherwise only this origin, so the manual runs under a policy as strict as the web
page's. When no site was built (a fresh clone, an installed wheel), ``/manual/`` answers 404 with
a page that says how to build it. Open, like the web page: the manual is no secret.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

# The checkout's site/ (service/api/manual.py -> the repository root); absent in an installed wheel.
SITE_DIR = Path(__file__).resolve().parents[2] / "site"
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.S)
_POLICY = (
    "default-src 'self'; script-src 'self'{hashes}; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
NOT_BUILT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>smoothcert: the manual is not built</title></head>
<body><h1>The manual is not built</h1>
<p>Run <code>make docs</code> in the smoothcert checkout (it builds <code>docs/</code> into
<code>site/</code>), then reload this page. <code>make docs-serve</code> serves it on its own.</p>
<p>Meanwhile: <a href="/">the web page</a>, <a href="/docs">the API reference</a>.</p>
</body></html>
"""


def policy(html: bytes) -> str:
    """The Content-Security-Policy for one page: this origin, and its inline scripts by hash."""
    hashes = "".join(
        f" 'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"
        for script in _INLINE_SCRIPT.findall(html)
    )
    return _POLICY.format(hashes=hashes)


def _file(site: Path, path: str) -> Path | None:
    """The file of the site that ``path`` names (a folder: its index.html); None outside it."""
    target = (site / path).resolve()
    if target != site and site not in target.parents:
        return None
    if target.is_dir():
        target = target / "index.html"
    return target if target.is_file() else None


def mount_manual(app: FastAPI, site: Path = SITE_DIR) -> None:
    """Serve ``site`` (``app.state.manual_dir``, which a test may point elsewhere) at /manual/."""
    app.state.manual_dir = site

    @app.api_route("/manual", methods=["GET", "HEAD"], include_in_schema=False)
    def manual_root() -> Response:
        return RedirectResponse("/manual/", status_code=308)

    @app.api_route("/manual/{path:path}", methods=["GET", "HEAD"], include_in_schema=False)
    def manual(request: Request, path: str) -> Response:
        root = Path(request.app.state.manual_dir).resolve()
        headers = {"Cache-Control": "no-cache"}
        if not (root / "index.html").is_file():
            return HTMLResponse(
                NOT_BUILT,
                status_code=404,
                headers={**headers, "Content-Security-Policy": policy(b"")},
            )
        found = _file(root, path)
        status = 200
        if found is None:
            found, status = root / "404.html", 404
        if found.suffix == ".html":
            html = found.read_bytes()
            headers["Content-Security-Policy"] = policy(html)
            return HTMLResponse(html, status_code=status, headers=headers)
        return FileResponse(found, headers=headers)
