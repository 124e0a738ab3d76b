"""Schemathesis fuzzes every operation of openapi/openapi.json against a real uvicorn API.

The fuzzed API is an extra instance of its own: Redis database 1 (where no worker listens, so a
job a fuzzed request manages to submit stays queued and runs nowhere) and an empty data dir (so
fuzzed uploads and deletes cannot touch the session's models). It is called with the admin key,
which reaches every route, admin-only ones included. Each response must be no server error
(a 503 only where the document declares one: /readyz without a worker, a model upload no worker
checks) and must conform to the document: a documented status code, content type, headers and
body, and every error must be JSON with a `detail`. Generation is derandomized and bounded (25
examples an operation), so a run is reproducible and takes about 20 s; a failure prints a curl line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.core.failures import ServerError
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.paths import ROOT
from tests.support.stack import ADMIN_KEY, other_db, scratch_db, stack_env, start_api, stop_process

DOCUMENT = ROOT / "openapi" / "openapi.json"
SCHEMA = schemathesis.openapi.from_path(DOCUMENT)
MAX_EXAMPLES = 25


@pytest.fixture(scope="module")
def fuzz_api(redis_url, tmp_path_factory) -> Iterator[str]:
    """A second API on Redis database 2 (no worker there) and a data dir of its own."""
    data = tmp_path_factory.mktemp("fuzz-data")
    with scratch_db(redis_url, 2):
        # A model upload waits for a worker's check; with none there, give up fast (a documented 503).
        env = stack_env(other_db(redis_url, 2), data, SMOOTHCERT_MODEL_CHECK_TIMEOUT_S="0.2")
        proc, url = start_api(env, tmp_path_factory.mktemp("fuzz-log") / "api.log")
        yield url
        stop_process(proc)


def no_undeclared_server_error(ctx, response, case) -> None:
    """Any 5xx fails, except a 503 that the operation declares (a missing worker, not a bug)."""
    declared = case.operation.definition.raw.get("responses", {})
    if response.status_code >= 500 and not (response.status_code == 503 and "503" in declared):
        raise ServerError(operation=case.operation.label, status_code=response.status_code)


def errors_say_why(ctx, response, case) -> None:
    """Every error is JSON ``{"detail": ...}`` (app.py), also where the document gives no body schema."""
    if response.status_code >= 400:
        try:
            detail = json.loads(response.content)["detail"]
        except (ValueError, KeyError, TypeError):
            raise AssertionError(
                f"{case.operation.label} answered {response.status_code} without a JSON "
                f"detail: {response.content[:200]!r}"
            ) from None
        assert detail, (
            f"{case.operation.label} answered {response.status_code} with an empty detail"
        )


CHECKS = [
    no_undeclared_server_error,
    errors_say_why,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@SCHEMA.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_document(case, fuzz_api):
    case.call_and_validate(
        base_url=fuzz_api,
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        checks=CHECKS,
        timeout=30,
    )
