"""The keys of a development `smoothcert up`, kept in DATA_DIR/credentials.env, without processes.

The first load writes three distinct secrets to a 0600 file and every later load reads the same
ones; a key set in the environment wins and is never written; a malformed file is an error that
names it, and is left as it was; both banners print the two keys with what each is for and where
it is kept. The real restarts are in test_up_credentials.py.
"""

from __future__ import annotations

import stat

import numpy as np
import pytest
from pydantic import ValidationError

from smoothcert.service.core.settings import derived_key_pepper
from smoothcert.service.devstack import credentials
from smoothcert.service.devstack.credentials import (
    ADMIN_KEY,
    ADMIN_KEY_USE,
    API_KEY,
    FILE_NAME,
    KEY_PEPPER,
    NAMES,
    USER_KEY_USE,
    CredentialsError,
)
from smoothcert.service.devstack.deploy import Deployment
from smoothcert.service.devstack.deploy import banner as deploy_banner
from smoothcert.service.devstack.stack import Stack, banner, up_settings


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_first_load_writes_three_distinct_secrets_and_later_loads_reuse_them(tmp_path):
    data_dir = tmp_path / "data"  # not there yet
    first = credentials.load(data_dir, {})
    path = data_dir / FILE_NAME
    assert first.created and first.path == path
    assert mode(path) == 0o600 and mode(data_dir) == 0o700
    values = (first.admin_key, first.api_key, first.key_pepper)
    assert len(set(values)) == 3 and all(len(v) >= 32 for v in values)
    assert first.from_env == frozenset()
    assert credentials.read(path) == dict(zip(NAMES, values, strict=True))
    assert [p.name for p in data_dir.iterdir()] == [FILE_NAME]  # no temporary file left
    again = credentials.load(data_dir, {})
    assert not again.created and (again.admin_key, again.api_key, again.key_pepper) == values


def test_the_environment_wins_over_the_file_and_is_not_written_to_it(tmp_path):
    given = "u" * 40
    keys = credentials.load(tmp_path, {API_KEY: given, ADMIN_KEY: ""})  # empty: not set
    text = (tmp_path / FILE_NAME).read_text()
    assert keys.api_key == given and given not in text
    assert keys.from_env == {API_KEY}
    stored = credentials.read(tmp_path / FILE_NAME)
    assert keys.admin_key == stored[ADMIN_KEY] and stored[API_KEY] != given
    # An existing file: the environment still wins, and the file stays as it was.
    other = credentials.load(tmp_path, {ADMIN_KEY: "a" * 40, KEY_PEPPER: "p" * 40})
    assert (other.admin_key, other.key_pepper, other.api_key) == (
        "a" * 40,
        "p" * 40,
        stored[API_KEY],
    )
    assert (tmp_path / FILE_NAME).read_text() == text


@pytest.mark.parametrize("name", [ADMIN_KEY, API_KEY])
def test_a_new_file_keeps_the_pepper_derived_from_a_key_the_environment_gives(tmp_path, name):
    """Before the file, a development pepper was a hash of the admin key (the API key when no
    admin key was set): keys made with POST /v1/keys under a fixed key keep working."""
    keys = credentials.load(tmp_path, {name: "k" * 40})
    assert keys.key_pepper == derived_key_pepper("k" * 40)
    assert credentials.read(tmp_path / FILE_NAME)[KEY_PEPPER] == keys.key_pepper


def test_a_new_file_does_not_replace_an_existing_one(tmp_path):
    path = tmp_path / FILE_NAME
    assert credentials.write_new(path, dict.fromkeys(NAMES, "first-value"))
    assert not credentials.write_new(path, dict.fromkeys(NAMES, "second-value"))
    assert set(credentials.read(path).values()) == {"first-value"}
    assert [p.name for p in tmp_path.iterdir()] == [FILE_NAME]


GOOD = {ADMIN_KEY: "admin-secret", API_KEY: "user-secret", KEY_PEPPER: "pepper-secret"}


def lines(**changes: str | None) -> str:
    values = {**GOOD, **changes}
    return "".join(f"{k}={v}\n" for k, v in values.items() if v is not None)


@pytest.mark.parametrize(
    "text,problem",
    [
        (lines() + "just some words\n", "line 4 is not NAME=VALUE"),
        (lines() + "SMOOTHCERT_API_KYE=x\n", "line 4 names 'SMOOTHCERT_API_KYE'"),
        (lines() + f"{API_KEY}=again\n", f"line 4 repeats {API_KEY}"),
        (lines(SMOOTHCERT_KEY_PEPPER=""), f"line 3 gives {KEY_PEPPER} no value"),
        (lines(SMOOTHCERT_API_KEY='"quoted"'), f"line 2 gives {API_KEY} a value with spaces"),
        (lines(SMOOTHCERT_ADMIN_KEY=None), f"it has no {ADMIN_KEY}"),
        ("", f"it has no {', '.join(NAMES)}"),
    ],
)
def test_a_malformed_file_is_an_error_that_names_it_and_is_left_alone(tmp_path, text, problem):
    path = tmp_path / FILE_NAME
    path.write_text(text)
    with pytest.raises(CredentialsError) as raised:
        credentials.load(tmp_path, {})
    message = str(raised.value)
    assert f"the credentials file {path} is malformed" in message and problem in message
    assert "delete it to get new keys" in message
    assert path.read_text() == text


def test_a_good_file_with_comments_is_read_and_one_others_may_read_is_narrowed(tmp_path):
    path = tmp_path / FILE_NAME
    path.write_text("# my keys\n\n" + lines(SMOOTHCERT_API_KEY=" spaced-around  "))
    path.chmod(0o644)
    assert credentials.read(path) == {**GOOD, API_KEY: "spaced-around"}
    assert mode(path) == 0o600


def test_an_unreadable_file_is_an_error_that_names_it(tmp_path):
    path = tmp_path / FILE_NAME
    path.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(CredentialsError, match=f"cannot read the credentials file {path}"):
        credentials.read(path)


@pytest.fixture
def no_settings(monkeypatch, tmp_path):
    """No SMOOTHCERT_* variable of the caller's; the data dir under tmp_path."""
    import os

    for name in [n for n in os.environ if n.startswith("SMOOTHCERT_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SMOOTHCERT_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def test_up_settings_in_development_take_the_file_and_hand_it_to_every_child(no_settings):
    settings, keys = up_settings()
    assert keys is not None and keys.created
    stored = credentials.read(no_settings / FILE_NAME)
    assert (settings.admin_key, settings.api_key, settings.key_pepper) == tuple(
        stored[n] for n in NAMES
    )
    assert settings.admin_key != settings.api_key
    env = Stack(settings, keys).env()
    assert {n: env[n] for n in NAMES} == stored
    again, _ = up_settings()
    assert (again.admin_key, again.api_key, again.key_pepper) == tuple(stored[n] for n in NAMES)


def test_up_settings_in_production_still_need_the_keys_and_write_no_file(no_settings, monkeypatch):
    monkeypatch.setenv("SMOOTHCERT_ENV", "production")
    with pytest.raises(ValidationError, match="SMOOTHCERT_API_KEY must be set"):
        up_settings()
    assert not (no_settings / FILE_NAME).exists()
    monkeypatch.setenv("SMOOTHCERT_API_KEY", "u" * 24)
    monkeypatch.setenv("SMOOTHCERT_ADMIN_KEY", "a" * 24)
    monkeypatch.setenv("SMOOTHCERT_KEY_PEPPER", "p" * 24)
    monkeypatch.setenv("SMOOTHCERT_REDIS_PASSWORD", "r" * 24)
    settings, keys = up_settings()
    assert keys is None and (settings.api_key, settings.admin_key) == ("u" * 24, "a" * 24)
    assert not (no_settings / FILE_NAME).exists()


MODEL = {"id": "m" * 16, "name": "digits-demo", "input_shape": [1, 8, 8], "num_classes": 10}


def test_the_up_banner_prints_both_keys_what_they_are_for_and_where_they_are_kept(
    no_settings, tmp_path
):
    settings, keys = up_settings()
    assert keys is not None
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), dtype=np.float32))
    text = banner(Stack(settings, keys), MODEL, tmp_path / "x.npy")
    assert f"\nAPI key: {settings.api_key}\n  {USER_KEY_USE}\n" in text
    assert f"\nadmin key: {settings.admin_key}\n  {ADMIN_KEY_USE}\n" in text
    assert f"both keys are kept in {keys.path} (mode 0600) and survive restarts" in text
    curls = [line for line in text.splitlines() if line.lstrip().startswith("curl")]
    assert len(curls) == 2
    assert all(f"Bearer {settings.api_key}" in c and settings.admin_key not in c for c in curls)


def test_the_deploy_banner_labels_the_keys_the_same_way(tmp_path, monkeypatch):
    demo = tmp_path / "var" / "deploy" / "demo"
    demo.mkdir(parents=True)
    np.save(demo / "digits_test_x.npy", np.zeros((1, 1, 8, 8), dtype=np.float32))
    monkeypatch.setattr(Deployment, "containers", lambda self, *a, **k: ["smoothcert-api-1"])
    deployment = Deployment(tmp_path, environ={API_KEY: "e" * 32})
    settings = {API_KEY: "e" * 32, ADMIN_KEY: "a" * 32, "SMOOTHCERT_PORT": "8000"}
    text = deploy_banner(deployment, settings, MODEL)
    env_file = tmp_path / "docker" / ".env"
    assert f"\nAPI key: {'e' * 32}  (from {API_KEY} in the environment)\n  {USER_KEY_USE}\n" in text
    assert f"\nadmin key: {'a' * 32}\n  {ADMIN_KEY_USE}\n" in text
    assert f"the admin key is kept in {env_file} and survives restarts" in text
    curls = [line for line in text.splitlines() if line.lstrip().startswith("curl")]
    assert curls and all(f"Bearer {'e' * 32}" in c and "a" * 32 not in c for c in curls)
