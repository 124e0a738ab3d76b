"""A real `smoothcert up`, as `make up` runs it (no SMOOTHCERT_* keys), keeps its keys across
restarts: the admin key, the user key and a key made with POST /v1/keys still work after a stop
and a start, the banner prints the same two keys (distinct), DATA_DIR/credentials.env is 0600,
and a key set in the environment wins over the file's."""

from __future__ import annotations

import re
import stat
import time

import httpx
import pytest

from smoothcert.service.devstack import credentials
from smoothcert.service.devstack.credentials import ADMIN_KEY, API_KEY, FILE_NAME, KEY_PEPPER
from smoothcert.service.devstack.redis_server import free_port
from tests.support.devstack import Up, seed_demo, up_env

pytestmark = pytest.mark.process


def printed_keys(up: Up) -> tuple[str, str]:
    """(user key, admin key) as the banner prints them."""
    out = up.output
    return (
        re.search(r"^API key: (\S+)", out, re.M).group(1),
        re.search(r"^admin key: (\S+)", out, re.M).group(1),
    )


def whoami(up: Up, key: str) -> httpx.Response:
    return httpx.get(f"{up.url}/v1/whoami", headers={"Authorization": f"Bearer {key}"}, timeout=10)


def started(env: dict[str, str]) -> Up:
    up = Up(env)
    try:
        up.wait_banner()
    except BaseException:
        up.close()
        raise
    return up


def test_up_keeps_its_keys_and_the_keys_made_with_them_across_restarts(tmp_path, demo_paths):
    data_dir = tmp_path / "data"
    seed_demo(data_dir, demo_paths)
    path = data_dir / FILE_NAME
    first = started(up_env(data_dir, free_port()))
    try:
        user_key, admin_key = printed_keys(first)
        assert user_key != admin_key
        assert f"both keys are kept in {path} (mode 0600) and survive restarts" in first.output
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        stored = credentials.read(path)
        assert (stored[API_KEY], stored[ADMIN_KEY]) == (user_key, admin_key)
        # Every child got the same three values.
        api_env = first.environ(first.child("smoothcert.service.api"))
        worker_env = first.environ(first.child("celery_app"))
        for env in (api_env, worker_env):
            assert {n: env[n] for n in stored} == stored
        admin = whoami(first, admin_key)
        assert admin.status_code == 200 and admin.json()["account"] == "admin", admin.text
        user = whoami(first, user_key)
        assert user.status_code == 200, user.text
        assert (user.json()["account"], user.json()["scopes"]) == ("default", ["certify"])
        made = httpx.post(
            f"{first.url}/v1/keys",
            headers={"Authorization": f"Bearer {admin_key}"},
            json={"account": "alice", "scopes": ["certify"], "name": "restart test"},
            timeout=10,
        )
        assert made.status_code == 201, made.text
        alices_key = made.json()["key"]
        assert whoami(first, alices_key).status_code == 200
        # The user key is no admin key: making keys is refused to it.
        refused = httpx.post(
            f"{first.url}/v1/keys",
            headers={"Authorization": f"Bearer {user_key}"},
            json={"account": "bob", "scopes": ["certify"]},
            timeout=10,
        )
        assert refused.status_code == 403, refused.text
    finally:
        first.close()

    second = started(up_env(data_dir, free_port()))
    try:
        assert printed_keys(second) == (user_key, admin_key)
        assert credentials.read(path) == stored
        for key, account in ((admin_key, "admin"), (user_key, "default"), (alices_key, "alice")):
            resp = whoami(second, key)
            assert resp.status_code == 200 and resp.json()["account"] == account, resp.text
    finally:
        second.close()


def test_a_key_set_in_the_environment_wins_over_the_file(tmp_path, demo_paths):
    data_dir = tmp_path / "data"
    seed_demo(data_dir, demo_paths)
    path = data_dir / FILE_NAME
    file_keys = {ADMIN_KEY: "file-admin-" + "a" * 32, API_KEY: "file-user-" + "u" * 32}
    assert credentials.write_new(path, {**file_keys, KEY_PEPPER: "file-pepper-" + "p" * 32})
    before = path.read_text()
    given = "env-user-" + "e" * 32
    up = started(up_env(data_dir, free_port(), SMOOTHCERT_API_KEY=given))
    try:
        assert printed_keys(up) == (given, file_keys[ADMIN_KEY])
        assert f"API key: {given}  (from {API_KEY} in the environment)" in up.output
        assert f"the admin key is kept in {path} (mode 0600) and survives restarts" in up.output
        resp = whoami(up, given)
        assert resp.status_code == 200 and resp.json()["account"] == "default", resp.text
        assert whoami(up, file_keys[API_KEY]).status_code == 401
        assert whoami(up, file_keys[ADMIN_KEY]).json()["account"] == "admin"
        assert up.environ(up.child("celery_app"))[KEY_PEPPER] == "file-pepper-" + "p" * 32
    finally:
        up.close()
    assert path.read_text() == before  # the environment's key was not written


def test_a_malformed_credentials_file_stops_up_with_a_message_naming_it(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = data_dir / FILE_NAME
    path.write_text("SMOOTHCERT_API_KEY\n")
    up = Up(up_env(data_dir, free_port()))
    try:
        assert up.proc.wait(60) == 1
        message = (
            f"smoothcert up: the credentials file {path} is malformed: line 1 is not NAME=VALUE"
        )
        deadline = time.monotonic() + 10  # the terminal's last bytes may still be on their way
        while message not in up.output and time.monotonic() < deadline:
            time.sleep(0.1)
        assert message in up.output
        assert path.read_text() == "SMOOTHCERT_API_KEY\n"
    finally:
        up.close()
