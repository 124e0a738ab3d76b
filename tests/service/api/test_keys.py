"""Accounts and API keys against the real stack: create, list, revoke, whoami; scopes; the secret
kept nowhere; revocation seen by a second API at once; expiry; quotas per account; the audit log;
the client and the CLI."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from smoothcert.service.cli.main import main
from smoothcert.service.client.service_client import ClientError, ServiceClient
from smoothcert.service.core import keys as key_format
from tests.support.stack import (
    ADMIN_KEY,
    USER_KEY,
    scratch_db,
    stack_env,
    start_api,
    stop_process,
)

pytestmark = pytest.mark.process

QUOTA_DB = 12  # a scratch database of the session's Redis where no worker listens


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def create(admin: httpx.Client, account: str, *scopes: str, **extra) -> dict:
    resp = admin.post("/v1/keys", json={"account": account, "scopes": list(scopes), **extra})
    assert resp.status_code == 201, resp.text
    return resp.json()


def npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def test_create_list_whoami_revoke(api_url, admin):
    made = create(admin, "alice", "certify", "train", name="ci", expires_in_s=86400)
    assert set(made) == {"id", "key", "account", "scopes", "name", "created_time", "expires_time"}
    assert made["key"].startswith("sck_") and key_format.parse(made["key"]) == made["id"]
    assert made["account"] == "alice" and made["scopes"] == ["certify", "train"]
    assert made["name"] == "ci" and made["created_time"].endswith("Z")
    assert made["expires_time"].endswith("Z")
    with httpx.Client(base_url=api_url, headers=bearer(made["key"]), timeout=30) as alice:
        assert alice.get("/v1/whoami").json() == {
            "account": "alice",
            "key_id": made["id"],
            "scopes": ["certify", "train"],
            "admin": False,
        }
        other = create(admin, "bob", "certify")
        mine = alice.get("/v1/keys").json()["keys"]
        assert made["id"] in {k["id"] for k in mine} and {k["account"] for k in mine} == {"alice"}
        assert all("key" not in k for k in mine)
        every = {k["id"] for k in admin.get("/v1/keys").json()["keys"]}
        assert {made["id"], other["id"]} <= every
        assert alice.delete(f"/v1/keys/{other['id']}").status_code == 404  # another account's
        assert alice.get("/v1/models").status_code == 200
        assert alice.delete(f"/v1/keys/{made['id']}").status_code == 204  # its own account's
        refused = alice.get("/v1/models")
        assert refused.status_code == 401 and refused.json()["detail"] == "invalid API key"
    assert admin.delete(f"/v1/keys/{other['id']}").status_code == 204
    assert admin.delete(f"/v1/keys/{other['id']}").status_code == 404


def test_bootstrap_keys(client, admin):
    assert client.get("/v1/whoami").json() == {
        "account": "default",
        "key_id": "SMOOTHCERT_API_KEY",
        "scopes": ["certify"],
        "admin": False,
    }
    me = admin.get("/v1/whoami").json()
    assert me["account"] == "admin" and me["admin"] and "admin" in me["scopes"]
    refused = client.post("/v1/keys", json={"account": "x", "scopes": ["admin"]})
    assert refused.status_code == 403 and "'admin' scope" in refused.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        {"account": "Alice", "scopes": ["certify"]},
        {"account": "abcdef0123456789abcdef0123456789", "scopes": ["certify"]},
        {"account": "alice", "scopes": []},
        {"account": "alice", "scopes": ["root"]},
        {"account": "alice", "scopes": ["certify"], "expires_in_s": 0},
        {"account": "alice", "scopes": ["certify"], "other": 1},
    ],
)
def test_bad_key_requests_are_422(admin, body):
    assert admin.post("/v1/keys", json=body).status_code == 422


def test_scopes_are_enforced(api_url, admin, demo_model):
    certify = create(admin, "scoped", "certify")["key"]
    models = create(admin, "scoped", "models")["key"]
    junk = {"file": ("m.onnx", io.BytesIO(b"not a model"))}
    with (
        httpx.Client(base_url=api_url, headers=bearer(certify), timeout=60) as c,
        httpx.Client(base_url=api_url, headers=bearer(models), timeout=60) as m,
    ):
        refused = c.post("/v1/models", files=junk)
        assert refused.status_code == 403 and "'models' scope" in refused.json()["detail"]
        assert c.delete("/v1/models/anything").status_code == 403
        assert c.post("/v1/train", json={}).status_code == 403
        assert c.get("/v1/models").status_code == 200
        accepted = m.post("/v1/models", files={"file": ("m.onnx", io.BytesIO(b"not a model"))})
        assert accepted.status_code not in (401, 403) and accepted.status_code < 500
        job = {"model_id": demo_model["id"], "inputs": [[[[0.0] * 8] * 8]], "sigma": 0.25, "n": 20}
        refused = m.post("/v1/certify", json=job)
        assert refused.status_code == 403 and "'certify' scope" in refused.json()["detail"]
        assert m.get("/v1/jobs").status_code == 403
        assert m.get("/v1/datasets").status_code == 403


def test_malformed_expired_and_unknown_keys_are_401(api_url, admin):
    made = create(admin, "shortlived", "certify", expires_in_s=1)
    key = made["key"]
    i = len("sck_") + 20
    typo = key[:i] + ("A" if key[i] != "A" else "B") + key[i + 1 :]
    for bad in (typo, key[:-1], "sck_nothing"):
        resp = httpx.get(f"{api_url}/v1/models", headers=bearer(bad))
        assert resp.status_code == 401 and "malformed" in resp.json()["detail"], bad
    _, unknown = key_format.new_key()
    resp = httpx.get(f"{api_url}/v1/models", headers=bearer(unknown))
    assert resp.status_code == 401 and resp.json()["detail"] == "invalid API key"
    time.sleep(1.2)
    resp = httpx.get(f"{api_url}/v1/models", headers=bearer(key))
    assert resp.status_code == 401 and "expired" in resp.json()["detail"]


def test_a_revoked_key_is_refused_by_another_api_at_once(api_url, admin, redis_url, data_dir):
    proc, second = start_api(stack_env(redis_url, data_dir), data_dir / "api-keys-second.log")
    try:
        made = create(admin, "carol", "certify")
        headers = bearer(made["key"])
        assert httpx.get(f"{second}/v1/models", headers=headers).status_code == 200
        assert admin.delete(f"/v1/keys/{made['id']}").status_code == 204
        revoked = time.monotonic()
        while httpx.get(f"{second}/v1/models", headers=headers).status_code != 401:
            assert time.monotonic() - revoked < 1.0, "the second API still lets the key in"
            time.sleep(0.02)
    finally:
        stop_process(proc)


def test_the_secret_is_kept_nowhere(admin, redis_url, data_dir):
    made = create(admin, "dave", "certify", name="scan")
    key = made["key"]
    secret = key[len("sck_") + key_format.ID_LEN + 1 : -key_format.CHECK_LEN]
    assert len(secret) == key_format.SECRET_LEN
    httpx.get(f"{admin.base_url}/v1/whoami", headers=bearer(key))  # used once, logged
    httpx.get(f"{admin.base_url}/v1/whoami", headers=bearer(key + "x"))  # refused, logged
    r = redis.Redis.from_url(redis_url)
    for db in range(16):
        client = r if db == 0 else redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + f"/{db}")
        for name in client.scan_iter(count=1000):
            assert secret.encode() not in name
            kind = client.type(name)
            if kind == b"string":
                values = [client.get(name) or b""]
            elif kind == b"hash":
                values = [k + b"=" + v for k, v in client.hgetall(name).items()]
            elif kind == b"list":
                values = client.lrange(name, 0, -1)
            elif kind == b"set":
                values = list(client.smembers(name))
            elif kind == b"zset":
                values = client.zrange(name, 0, -1)
            else:
                values = []
            assert not any(secret.encode() in v for v in values), name
    for root, _, files in os.walk(data_dir):
        for file in files:
            path = Path(root) / file
            if path.is_file() and path.stat().st_size < 64 << 20:
                assert secret.encode() not in path.read_bytes(), path
    assert made["id"].encode() in (data_dir / "api.log").read_bytes()  # the audit line has its id


def audit_lines(log: Path) -> list[dict]:
    lines = []
    for line in log.read_text(errors="replace").splitlines():
        if '"smoothcert.audit"' in line:
            lines.append(json.loads(line))
    return lines


def test_audit_lines(api_url, admin, client, data_dir):
    made = create(admin, "erin", "certify")
    junk = {"file": ("m.onnx", io.BytesIO(b"not a model"))}
    refused = httpx.post(f"{api_url}/v1/models", headers=bearer(made["key"]), files=junk)
    assert refused.status_code == 403
    httpx.get(f"{api_url}/v1/models", headers=bearer(made["key"][:-1] + "!"))  # 401
    assert admin.delete(f"/v1/keys/{made['id']}").status_code == 204
    httpx.get(f"{api_url}/v1/models", headers=bearer(made["key"]))  # 401, revoked
    deadline = time.monotonic() + 5
    while True:
        lines = [a["audit"] for a in audit_lines(data_dir / "api.log")]
        mine = [a for a in lines if a.get("key_id") == made["id"]]
        events = [(a["event"], a.get("status")) for a in mine]
        if len(events) >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert ("key_created", None) in events and ("key_revoked", None) in events
    assert ("refused", 403) in events and ("refused", 401) in events
    assert all(
        a["account"] == "erin" for a in mine if a["event"] != "refused" or a["status"] == 403
    )
    assert any(a["event"] == "refused" and "malformed" in a["reason"] for a in lines)
    secret = made["key"][len("sck_") + key_format.ID_LEN + 1 : -key_format.CHECK_LEN]
    assert secret not in (data_dir / "api.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def quota_api(redis_url, data_dir, worker):
    """An API on QUOTA_DB (no worker: jobs stay queued) with one active job per account."""
    with scratch_db(redis_url, QUOTA_DB):
        db_url = redis_url.rsplit("/", 1)[0] + f"/{QUOTA_DB}"
        env = stack_env(db_url, data_dir, SMOOTHCERT_MAX_ACTIVE_JOBS_PER_KEY="1")
        proc, url = start_api(env, data_dir / "api-keys-quota.log")
        try:
            yield url
        finally:
            stop_process(proc)


def test_two_keys_of_one_account_share_its_active_job_quota(quota_api, demo_model, demo_paths):
    with httpx.Client(base_url=quota_api, headers=bearer(ADMIN_KEY), timeout=60) as admin:
        first = create(admin, "frank", "certify")["key"]
        second = create(admin, "frank", "certify")["key"]
        other = create(admin, "grace", "certify")["key"]
    x = np.load(demo_paths["test_x"])[:1]
    form = {"model_id": demo_model["id"], "sigma": "0.25", "n0": "10", "n": "50"}

    def submit(key: str) -> httpx.Response:
        return httpx.post(
            f"{quota_api}/v1/certify",
            headers=bearer(key),
            data=form,
            files=[("inputs", ("x.npy", npy(x)))],
            timeout=60,
        )

    assert submit(first).status_code == 202
    refused = submit(second)
    assert refused.status_code == 429 and "Retry-After" in refused.headers
    assert submit(other).status_code == 202  # another account has its own quota
    listed = httpx.get(f"{quota_api}/v1/jobs", headers=bearer(second)).json()["jobs"]
    assert len(listed) == 1  # the account's job, seen with its other key


def test_client_calls(api_url):
    with ServiceClient(api_url, ADMIN_KEY) as admin:
        made = admin.create_key("heidi", ["certify", "models"], name="laptop", expires_in_s=3600)
        assert made["scopes"] == ["certify", "models"] and made["name"] == "laptop"
        assert made["id"] in {k["id"] for k in admin.list_keys()}
        assert admin.whoami()["admin"] is True
    with ServiceClient(api_url, made["key"]) as heidi:
        assert heidi.whoami() == {
            "account": "heidi",
            "key_id": made["id"],
            "scopes": ["certify", "models"],
            "admin": False,
        }
        assert [k["id"] for k in heidi.list_keys()] == [made["id"]]
        heidi.revoke_key(made["id"])
        with pytest.raises(ClientError, match="401"):
            heidi.whoami()
    with ServiceClient(api_url, USER_KEY) as user, pytest.raises(ClientError, match="403"):
        user.create_key("ivan", ["certify"])


def test_cli_commands(api_url, monkeypatch, capsys):
    for name in [k for k in os.environ if k.startswith("SMOOTHCERT_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SMOOTHCERT_URL", api_url)
    monkeypatch.setenv("SMOOTHCERT_API_KEY", USER_KEY)
    monkeypatch.setenv("SMOOTHCERT_ADMIN_KEY", ADMIN_KEY)
    assert main(["keys", "create", "judy", "--scopes", "certify,train", "--name", "cli"]) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    key_id = key_format.parse(key)
    assert key_id and "judy" in err and key not in err
    assert main(["keys", "list"]) == 0
    out, _ = capsys.readouterr()
    assert key_id in out and key not in out
    assert main(["whoami", "--api-key", key]) == 0
    out, _ = capsys.readouterr()
    assert json.loads(out) == {
        "account": "judy",
        "key_id": key_id,
        "scopes": ["certify", "train"],
        "admin": False,
    }
    assert main(["whoami"]) == 0
    assert json.loads(capsys.readouterr().out)["account"] == "default"
    assert main(["keys", "revoke", key_id]) == 0
    capsys.readouterr()
    assert main(["whoami", "--api-key", key]) == 2
    assert "401" in capsys.readouterr().err
