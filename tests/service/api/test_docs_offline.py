"""``/docs`` and ``/redoc`` load nothing from the internet: every script and style comes from the API."""

from __future__ import annotations

import re

import pytest


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_name_no_cdn_and_every_asset_is_served_here(anonymous, page):
    resp = anonymous.get(page)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    assert not re.search(r"https?://", resp.text), "the page names a URL outside the API"
    assets = re.findall(r'<(?:script|link)[^>]*(?:src|href)="([^"]+)"', resp.text)
    assert any(a.endswith(".js") for a in assets)
    for asset in assets:
        got = anonymous.get(asset)
        assert got.status_code == 200 and len(got.content) > 1000, asset
    assert anonymous.get("/openapi.json").status_code == 200
