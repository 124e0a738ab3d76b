"""openapi/openapi.json: it is the app's document (drift test), and it documents auth and errors."""

from __future__ import annotations

import json

import pytest

from smoothcert.service.devstack.openapi_doc import main, openapi_document, openapi_text, stale_diff
from tests.support.paths import ROOT

CHECKED_IN = ROOT / "openapi" / "openapi.json"
# Operations that need a scope (403 without it): certify, models, train or admin.
ADMIN_OPERATIONS = {
    ("post", "/v1/models"),
    ("delete", "/v1/models/{model_id}"),
    ("post", "/v1/train"),
    ("post", "/v1/certify"),
    ("get", "/v1/jobs/{job_id}"),
    ("delete", "/v1/jobs/{job_id}"),
    ("post", "/v1/keys"),
}


@pytest.fixture(scope="module")
def document() -> dict:
    return openapi_document()


# Open to anyone, on purpose: the public keys that verify certificates.
OPEN_V1 = {"/v1/signing-keys"}


def v1_operations(document: dict):
    for path, operations in document["paths"].items():
        if path.startswith("/v1/") and path not in OPEN_V1:
            for method, operation in operations.items():
                yield method, path, operation


def test_checked_in_document_matches_the_app():
    diff = stale_diff(CHECKED_IN)
    assert diff is None, (
        f"openapi/openapi.json is out of date with the app; run `make openapi`\n{diff}"
    )


def test_bearer_scheme_guards_every_v1_operation_and_no_health_route(document):
    schemes = document["components"]["securitySchemes"]
    bearer = [
        name for name, s in schemes.items() if s["type"] == "http" and s["scheme"] == "bearer"
    ]
    assert len(bearer) == 1
    for method, path, operation in v1_operations(document):
        assert {bearer[0]: []} in operation.get("security", []), (
            f"{method.upper()} {path} has no bearer security"
        )
    for path in ("/healthz", "/readyz", *OPEN_V1):
        assert "security" not in document["paths"][path]["get"]


def test_every_v1_operation_documents_its_client_errors(document):
    missing = []
    for method, path, operation in v1_operations(document):
        codes = set(operation["responses"])
        expected = {"401"}
        if "{" in path:
            expected |= {"404", "422"}  # unknown id; path parameters are validated
        if "requestBody" in operation:
            expected |= {"413", "422"}  # every body passes the size limit and validation
        if (method, path) in ADMIN_OPERATIONS:
            expected.add("403")
        missing += [f"{method.upper()} {path}: {code}" for code in sorted(expected - codes)]
        for code, response in operation["responses"].items():
            if code.startswith("4"):
                assert response.get("description"), (
                    f"{method.upper()} {path} {code} has no description"
                )
    assert not missing, "undocumented error responses: " + ", ".join(missing)
    assert ADMIN_OPERATIONS <= {(m, p) for m, p, _ in v1_operations(document)}


def test_403_is_documented_only_where_a_scope_is_needed(document):
    for method, path in [
        ("get", "/v1/models"),
        ("get", "/v1/models/{model_id}"),
        ("get", "/v1/keys"),
        ("delete", "/v1/keys/{key_id}"),
        ("get", "/v1/whoami"),
    ]:
        assert "403" not in document["paths"][path][method]["responses"], f"{method.upper()} {path}"


def test_check_mode_reports_a_stale_file_and_write_mode_fixes_it(tmp_path, capsys):
    path = tmp_path / "openapi.json"
    assert main(["--check", "--path", str(path)]) == 1
    path.write_text(json.dumps({"openapi": "3.1.0"}) + "\n")
    assert main(["--check", "--path", str(path)]) == 1
    assert "run `make openapi`" in capsys.readouterr().err
    assert main(["--path", str(path)]) == 0
    assert path.read_text() == openapi_text() and openapi_text().endswith("}\n")
    assert main(["--check", "--path", str(path)]) == 0
