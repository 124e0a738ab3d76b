"""Settings from SMOOTHCERT_* variables; production refuses weak keys and a Redis without a password."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from smoothcert.service.core.settings import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("SMOOTHCERT_"):
            monkeypatch.delenv(name)


def test_defaults():
    s = Settings()
    assert (s.env, s.host, s.port) == ("development", "127.0.0.1", 8000)
    assert s.broker_url == "redis://127.0.0.1:6379/0" and s.data_dir.is_absolute()


def test_development_generates_a_key_and_admin_defaults_to_it():
    s = Settings()
    assert s.generated_api_key and len(s.api_key) >= 16 and s.admin_key == s.api_key
    assert Settings().api_key != s.api_key


def test_environment_variables_are_read(monkeypatch, tmp_path):
    monkeypatch.setenv("SMOOTHCERT_PORT", "9123")
    monkeypatch.setenv("SMOOTHCERT_API_KEY", "k" * 20)
    monkeypatch.setenv("SMOOTHCERT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SMOOTHCERT_REDIS_URL", "redis://example:1/2")
    monkeypatch.setenv("SMOOTHCERT_MAX_N", "5000")
    s = Settings()
    assert (s.port, s.api_key, s.data_dir, s.broker_url, s.max_n) == (
        9123,
        "k" * 20,
        tmp_path,
        "redis://example:1/2",
        5000,
    )
    assert not s.generated_api_key and s.admin_key == "k" * 20


@pytest.mark.parametrize(
    "api_key,admin_key", [("", ""), ("changeme", "a" * 20), ("a" * 20, ""), ("short", "b" * 20)]
)
def test_production_refuses_empty_or_default_keys(monkeypatch, api_key, admin_key):
    monkeypatch.setenv("SMOOTHCERT_ENV", "production")
    monkeypatch.setenv("SMOOTHCERT_API_KEY", api_key)
    monkeypatch.setenv("SMOOTHCERT_ADMIN_KEY", admin_key)
    with pytest.raises(ValidationError, match="SMOOTHCERT_"):
        Settings()


def test_production_accepts_real_keys(monkeypatch):
    monkeypatch.setenv("SMOOTHCERT_ENV", "production")
    monkeypatch.setenv("SMOOTHCERT_API_KEY", "u" * 24)
    monkeypatch.setenv("SMOOTHCERT_ADMIN_KEY", "a" * 24)
    monkeypatch.setenv("SMOOTHCERT_REDIS_PASSWORD", "r" * 24)
    with pytest.raises(ValidationError, match="SMOOTHCERT_KEY_PEPPER"):
        Settings()
    monkeypatch.setenv("SMOOTHCERT_KEY_PEPPER", "p" * 24)
    assert Settings().admin_key == "a" * 24


def test_production_refuses_an_admin_key_equal_to_the_api_key(monkeypatch):
    monkeypatch.setenv("SMOOTHCERT_ENV", "production")
    monkeypatch.setenv("SMOOTHCERT_API_KEY", "same-secret-for-both-0123456789")
    monkeypatch.setenv("SMOOTHCERT_ADMIN_KEY", "same-secret-for-both-0123456789")
    monkeypatch.setenv("SMOOTHCERT_REDIS_PASSWORD", "r" * 24)
    with pytest.raises(ValidationError, match="SMOOTHCERT_ADMIN_KEY equals SMOOTHCERT_API_KEY"):
        Settings()
    monkeypatch.setenv("SMOOTHCERT_ENV", "development")  # development may share them
    assert Settings().admin_key == Settings().api_key


@pytest.mark.process
def test_the_api_does_not_start_in_production_with_equal_keys(monkeypatch, tmp_path):
    import os
    import subprocess

    from smoothcert.service.devstack.commands import api_command
    from smoothcert.service.devstack.redis_server import free_port

    env = {
        **os.environ,
        "SMOOTHCERT_ENV": "production",
        "SMOOTHCERT_API_KEY": "same-secret-for-both-0123456789",
        "SMOOTHCERT_ADMIN_KEY": "same-secret-for-both-0123456789",
        "SMOOTHCERT_REDIS_PASSWORD": "r" * 24,
        "SMOOTHCERT_DATA_DIR": str(tmp_path),
    }
    started = subprocess.run(
        api_command("127.0.0.1", free_port()), env=env, capture_output=True, text=True, timeout=60
    )
    assert started.returncode != 0
    assert "SMOOTHCERT_ADMIN_KEY equals SMOOTHCERT_API_KEY" in started.stderr


def test_the_redis_password_goes_into_the_broker_url(monkeypatch):
    monkeypatch.setenv("SMOOTHCERT_REDIS_URL", "redis://redis:6379/0")
    monkeypatch.setenv("SMOOTHCERT_REDIS_PASSWORD", "p@ss/word:1")
    assert Settings().broker_url == "redis://:p%40ss%2Fword%3A1@redis:6379/0"
    monkeypatch.setenv("SMOOTHCERT_REDIS_URL", "rediss://app@redis:6380/2")
    assert Settings().broker_url == "rediss://app:p%40ss%2Fword%3A1@redis:6380/2"
    monkeypatch.setenv(
        "SMOOTHCERT_REDIS_URL", "redis://:p%40ss%2Fword%3A1@redis:6379/0"
    )  # the same, twice
    assert Settings().broker_url == "redis://:p%40ss%2Fword%3A1@redis:6379/0"
    monkeypatch.setenv("SMOOTHCERT_REDIS_URL", "redis://:other@redis:6379/0")
    with pytest.raises(ValidationError, match="SMOOTHCERT_REDIS_URL holds a password other than"):
        Settings()


@pytest.mark.parametrize(
    "password,url",
    [
        ("", "redis://redis:6379/0"),
        ("change-me", "redis://redis:6379/0"),
        ("short", "redis://redis:6379/0"),
        ("", "redis://:changeme@redis:6379/0"),
    ],
)
def test_production_refuses_a_redis_without_a_real_password(monkeypatch, password, url):
    monkeypatch.setenv("SMOOTHCERT_ENV", "production")
    monkeypatch.setenv("SMOOTHCERT_API_KEY", "u" * 24)
    monkeypatch.setenv("SMOOTHCERT_ADMIN_KEY", "a" * 24)
    monkeypatch.setenv("SMOOTHCERT_REDIS_URL", url)
    monkeypatch.setenv("SMOOTHCERT_REDIS_PASSWORD", password)
    with pytest.raises(
        ValidationError, match="SMOOTHCERT_REDIS_PASSWORD .* at least 16 characters"
    ):
        Settings()
    monkeypatch.setenv("SMOOTHCERT_REDIS_URL", "redis://:" + "s" * 20 + "@redis:6379/0")
    monkeypatch.setenv("SMOOTHCERT_REDIS_PASSWORD", "")
    monkeypatch.setenv("SMOOTHCERT_KEY_PEPPER", "p" * 24)
    assert Settings().broker_url.startswith("redis://:" + "s" * 20)


def test_bad_port_is_refused(monkeypatch):
    monkeypatch.setenv("SMOOTHCERT_PORT", "70000")
    with pytest.raises(ValidationError):
        Settings()
