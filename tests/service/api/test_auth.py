"""Bearer keys: /v1 needs one (401), model upload and delete need the admin key (403)."""

from __future__ import annotations

import httpx
import pytest

from tests.support.stack import USER_KEY


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/v1/models"),
        ("GET", "/v1/jobs/x"),
        ("POST", "/v1/certify"),
        ("POST", "/v1/models"),
        ("DELETE", "/v1/jobs/x"),
    ],
)
def test_v1_without_key_is_401(anonymous, method, path):
    resp = anonymous.request(method, path)
    assert resp.status_code == 401 and "missing API key" in resp.json()["detail"]
    assert resp.headers["WWW-Authenticate"] == "Bearer"


def test_wrong_key_is_401(api_url):
    resp = httpx.get(f"{api_url}/v1/models", headers={"Authorization": "Bearer wrong"})
    assert resp.status_code == 401 and resp.json()["detail"] == "invalid API key"


def test_other_scheme_is_401(api_url):
    resp = httpx.get(f"{api_url}/v1/models", headers={"Authorization": f"Basic {USER_KEY}"})
    assert resp.status_code == 401


def test_user_key_cannot_upload_or_delete_models(client, demo_paths):
    with open(demo_paths["onnx"], "rb") as f:
        resp = client.post("/v1/models", files={"file": ("m.onnx", f)})
    assert resp.status_code == 403 and "admin key" in resp.json()["detail"]
    assert client.delete("/v1/models/anything").status_code == 403


def test_both_keys_read(client, admin):
    assert client.get("/v1/models").status_code == 200
    assert admin.get("/v1/models").status_code == 200


def test_health_routes_are_open(anonymous):
    assert anonymous.get("/healthz").json() == {"status": "ok"}
    assert anonymous.get("/readyz").status_code == 200
