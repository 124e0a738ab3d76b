"""``GET /v1/models/{id}/file`` on the real stack: the stored bytes and their SHA-256, who may
download what, a pipeline's 409, and the client's and CLI's download that checks the digest."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

from smoothcert.service.cli.main import main
from smoothcert.service.client.service_client import ClientError, ServiceClient
from tests.support.denoisers import random_denoiser
from tests.support.stack import ADMIN_KEY, USER_KEY, account_key, upload_model_file


@pytest.fixture(scope="module")
def onnx_model(admin, demo_paths) -> dict:
    """The demo's ONNX file, uploaded private by the admin's account."""
    resp = upload_model_file(admin, demo_paths["onnx"], visibility="private")
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_download_answers_the_uploaded_bytes_and_their_sha256(admin, demo_paths, onnx_model):
    resp = admin.get(f"/v1/models/{onnx_model['id']}/file")
    assert resp.status_code == 200, resp.text
    sent = Path(demo_paths["onnx"]).read_bytes()
    assert resp.content == sent
    digest = hashlib.sha256(sent).hexdigest()
    assert resp.headers["x-model-sha256"] == digest == onnx_model["sha256"]
    assert resp.headers["content-type"] == "application/octet-stream"
    disposition = resp.headers["content-disposition"]
    assert disposition.startswith("attachment") and Path(demo_paths["onnx"]).name in disposition


def test_a_public_model_downloads_for_every_account_that_may_use_it(client, demo_model, demo_paths):
    resp = client.get(f"/v1/models/{demo_model['id']}/file")  # the user key; the admin's model
    assert resp.status_code == 200, resp.text
    assert resp.content == Path(demo_paths["safetensors"]).read_bytes()
    assert resp.headers["x-model-sha256"] == demo_model["sha256"]


def test_another_accounts_private_model_is_an_unknown_model(api_url, client, onnx_model):
    resp = client.get(f"/v1/models/{onnx_model['id']}/file")  # account "default", not "admin"
    assert resp.status_code == 404
    assert resp.json()["detail"] == f"unknown model {onnx_model['id']!r}"
    assert "x-model-sha256" not in resp.headers
    other = account_key(api_url, ADMIN_KEY, "download-other", "certify", "models")
    resp = httpx.get(
        f"{api_url}/v1/models/{onnx_model['id']}/file",
        headers={"Authorization": f"Bearer {other}"},
        timeout=30,
    )
    assert resp.status_code == 404
    assert client.get("/v1/models/0123456789abcdef/file").status_code == 404


def test_a_pipeline_has_no_file_and_names_its_parts(admin, demo_model, tmp_path):
    path = random_denoiser(tmp_path / "dncnn.safetensors")
    denoiser = upload_model_file(admin, path)
    assert denoiser.status_code == 201, denoiser.text
    denoiser_id = denoiser.json()["id"]
    resp = admin.post(
        "/v1/models/pipelines", json={"denoiser": denoiser_id, "classifier": demo_model["id"]}
    )
    assert resp.status_code == 201, resp.text
    pipeline_id = resp.json()["id"]
    resp = admin.get(f"/v1/models/{pipeline_id}/file")
    assert resp.status_code == 409
    detail = resp.json()["detail"]
    assert "pipeline" in detail and denoiser_id in detail and demo_model["id"] in detail
    # each part is a file of its own
    part = admin.get(f"/v1/models/{denoiser_id}/file")
    assert part.status_code == 200 and part.content == path.read_bytes()
    assert admin.delete(f"/v1/models/{pipeline_id}").status_code == 204


def test_the_client_checks_the_digest_and_names_the_file(api_url, demo_model, demo_paths, tmp_path):
    with ServiceClient(api_url, USER_KEY) as service:
        got = service.download_model(demo_model["id"], tmp_path)  # a folder: the server's name
        assert Path(got["path"]) == tmp_path / "digits_cnn.safetensors"
        assert Path(got["path"]).read_bytes() == Path(demo_paths["safetensors"]).read_bytes()
        assert got["sha256"] == demo_model["sha256"]
        with pytest.raises(ClientError) as refused:
            service.download_model("0123456789abcdef", tmp_path / "none.onnx")
        assert refused.value.status_code == 404 and not (tmp_path / "none.onnx").exists()


def test_the_client_refuses_bytes_that_do_not_match_their_digest(tmp_path):
    def lying(request: httpx.Request) -> httpx.Response:
        headers = {
            "X-Model-SHA256": hashlib.sha256(b"other bytes").hexdigest(),
            "Content-Disposition": 'attachment; filename="../../evil.onnx"',
        }
        return httpx.Response(200, content=b"model bytes", headers=headers)

    with ServiceClient("http://service", "key", transport=httpx.MockTransport(lying)) as service:
        with pytest.raises(ClientError, match="sha256"):
            service.download_model("abc", tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its partial copy


def test_cli_models_download_writes_the_file(
    api_url, demo_model, demo_paths, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("SMOOTHCERT_API_KEY", USER_KEY)
    out = tmp_path / "copy.safetensors"
    code = main(["models", "download", demo_model["id"], "--url", api_url, "--out", str(out)])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert stdout.strip() == str(out)
    assert out.read_bytes() == Path(demo_paths["safetensors"]).read_bytes()
    assert demo_model["sha256"] in stderr and "checked" in stderr
