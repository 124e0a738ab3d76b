"""The bearer-key checks of deps.py in process: a malformed key is refused before Redis is asked,
the bootstrap keys' accounts and scopes, and what each scope lets a key do."""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import pytest
from fastapi import HTTPException

from smoothcert.service.api import deps
from smoothcert.service.core import keys
from smoothcert.service.core.settings import Settings

USER, ADMIN = "user-key-for-unit-tests-0123", "admin-key-for-unit-tests-0123"


def request(redis_client) -> SimpleNamespace:
    settings = Settings(api_key=USER, admin_key=ADMIN)
    state = SimpleNamespace(settings=settings, redis=redis_client, keys=None)
    return SimpleNamespace(
        app=SimpleNamespace(state=state), method="GET", url=SimpleNamespace(path="/v1/models")
    )


def test_a_malformed_key_is_refused_without_a_redis_lookup():
    redis_client = mock.Mock()
    _, key = keys.new_key()
    for bad in (key[:-1], key[:-1] + ("a" if key[-1] != "a" else "b"), "sck_x"):
        with pytest.raises(deps.Refused, match="malformed"):
            deps.identify(request(redis_client), bad)
    assert redis_client.mock_calls == []


def test_bootstrap_keys_need_no_redis():
    redis_client = mock.Mock()
    admin = deps.identify(request(redis_client), ADMIN)
    assert admin.account == "admin" and admin.admin and admin.owner == "admin"
    user = deps.identify(request(redis_client), USER)
    assert (user.account, user.key_id, user.scopes) == (
        "default",
        "SMOOTHCERT_API_KEY",
        ("certify",),
    )
    assert user.owner == "default" and not user.admin
    with pytest.raises(deps.Refused, match="invalid API key"):
        deps.identify(request(redis_client), "wrong")
    assert redis_client.mock_calls == []


@pytest.mark.parametrize(
    "scopes,allowed",
    [
        (("certify",), {deps.require_certify, deps.require_jobs}),
        (("models",), {deps.require_models}),
        (("train",), {deps.require_train, deps.require_jobs}),
        (("admin",), set(deps.SCOPE_CHECKS)),
    ],
)
def test_scopes(scopes, allowed):
    caller = deps.Caller("alice", "k" * 12, scopes)
    for check in deps.SCOPE_CHECKS:
        if check in allowed:
            assert check(request(None), caller) is caller
        else:
            with pytest.raises(HTTPException) as refused:
                check(request(None), caller)
            assert refused.value.status_code == 403 and "scope" in refused.value.detail
