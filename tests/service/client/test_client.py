"""The remote CLI (`smoothcert submit|status|wait|cancel|models`) against the real test stack.

Commands run in-process through ``cli.main`` with ``SMOOTHCERT_URL`` and the keys in the
environment; one test runs the installed console script.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smoothcert.service.cli.main import main
from smoothcert.service.core.tsv import CERTIFY_COLUMNS, PREDICT_COLUMNS
from smoothcert.service.devstack.redis_server import free_port
from smoothcert.worker.evaluation.analyze import read_log
from tests.support.stack import ADMIN_KEY, USER_KEY

pytestmark = pytest.mark.process


@pytest.fixture
def service(api_url, monkeypatch):
    """The environment a user of the remote CLI sets: URL and keys."""
    for name in [k for k in os.environ if k.startswith("SMOOTHCERT_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SMOOTHCERT_URL", api_url)
    monkeypatch.setenv("SMOOTHCERT_API_KEY", USER_KEY)
    monkeypatch.setenv("SMOOTHCERT_ADMIN_KEY", ADMIN_KEY)
    return api_url


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def digits(demo_paths, tmp_path_factory) -> dict[str, Path]:
    """12 test digits as .npy with labels, and the first 3 as PNG files in a folder."""
    folder = tmp_path_factory.mktemp("client-digits")
    x, y = np.load(demo_paths["test_x"])[:12], np.load(demo_paths["test_y"])[:12]
    np.save(folder / "x.npy", x)
    np.save(folder / "y.npy", y)
    (folder / "png").mkdir()
    for i in range(3):
        Image.fromarray((x[i, 0] * 255).round().astype(np.uint8)).save(folder / "png" / f"{i}.png")
    return {"x": folder / "x.npy", "y": folder / "y.npy", "png": folder / "png"}


@pytest.fixture(scope="module")
def model_id(api_url, demo_paths) -> str:
    """The demo model, uploaded with `smoothcert models upload` (admin key from the environment)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMOOTHCERT_URL", api_url)
        mp.setenv("SMOOTHCERT_ADMIN_KEY", ADMIN_KEY)
        mp.delenv("SMOOTHCERT_API_KEY", raising=False)
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):  # capsys is function-scoped
            assert (
                main(
                    [
                        "models",
                        "upload",
                        str(demo_paths["safetensors"]),
                        "--name",
                        "digits-cli",
                        "--sigma",
                        "0.25",
                        "--visibility",
                        "public",  # the user key certifies with it
                    ]
                )
                == 0
            )
    return stdout.getvalue().strip()


def test_models_upload_list_and_delete(service, capsys, model_id, demo_paths):
    code, out, _ = run(capsys, "models", "list")
    assert code == 0
    header, *rows = [line.split("\t") for line in out.splitlines()]
    assert header[:5] == ["id", "name", "owner", "visibility", "format"]
    row = next(r for r in rows if r[0] == model_id)
    assert (
        row[1:8] == ["digits-cli", "admin", "public", "safetensors", "digits_cnn", "1,8,8", "10"]
        and float(row[8]) == 0.25
    )

    code, out, err = run(
        capsys,
        "models",
        "upload",
        str(demo_paths["onnx"]),
        "--json",
        "--normalization",
        '{"mean": [0.3], "std": [0.4]}',
        "--class-names",
        ",".join("0123456789"),
    )
    assert code == 0, err
    onnx = json.loads(out)
    assert onnx["format"] == "onnx" and onnx["class_names"] == list("0123456789")
    assert (onnx["owner"], onnx["visibility"]) == ("admin", "private")
    code, _, err = run(capsys, "models", "visibility", onnx["id"], "public")
    assert code == 0 and err.strip() == f"model {onnx['id']} is public"
    assert run(capsys, "models", "delete", onnx["id"])[0] == 0
    code, out, _ = run(capsys, "models", "list", "--json")
    assert onnx["id"] not in [m["id"] for m in json.loads(out)]


def test_submit_wait_writes_the_tsv(service, capsys, model_id, digits, tmp_path):
    out_tsv = tmp_path / "r.tsv"
    code, out, err = run(
        capsys,
        "submit",
        model_id,
        "--inputs",
        str(digits["x"]),
        "--labels",
        str(digits["y"]),
        "--sigma",
        "0.25",
        "--n0",
        "50",
        "--n",
        "2000",
        "--seed",
        "3",
        "--wait",
        "--out",
        str(out_tsv),
    )
    assert code == 0, err
    assert out == "" and "submitted job" in err and "certified" in err and "correct" in err
    assert tuple(out_tsv.read_text().splitlines()[0].split("\t")) == CERTIFY_COLUMNS
    log = read_log(out_tsv)
    assert (
        log.idx.tolist() == list(range(12)) and log.label.tolist() == np.load(digits["y"]).tolist()
    )
    # The demo model (~96% clean accuracy, trained at σ = 0.25) certifies most digits at σ = 0.25.
    assert log.correct.mean() >= 0.7 and (log.radius[log.correct] > 0).all()
    provenance = json.loads((tmp_path / "r.tsv.json").read_text())
    assert provenance["seed"] == 3 and provenance["n"] == 2000


def test_submit_then_status_then_wait(service, capsys, model_id, digits, tmp_path):
    code, out, _ = run(
        capsys,
        "submit",
        model_id,
        "--inputs",
        str(digits["png"]),
        "--sigma",
        "0.25",
        "--mode",
        "predict",
        "--n",
        "200",
        "--seed",
        "0",
    )
    job_id = out.strip()
    assert code == 0 and len(job_id) == 36
    code, out, _ = run(capsys, "status", job_id)
    assert code == 0 and out.startswith(f"{job_id}\tpredict\t")
    code, out, err = run(capsys, "wait", job_id)
    assert code == 0 and "predicted" in err
    lines = out.splitlines()
    # PNG inputs keep their file names: a last column after Cohen's and ours
    assert tuple(lines[0].split("\t")) == (*PREDICT_COLUMNS, "name") and len(lines) == 4
    assert all(line.split("\t")[-1].endswith(".png") for line in lines[1:])
    code, out, _ = run(capsys, "status", job_id, "--json")
    record = json.loads(out)
    assert record["status"] == "succeeded" and record["params"]["num_inputs"] == 3
    code, out, _ = run(capsys, "status", job_id)
    assert out.rstrip("\n").split("\t")[2:] == ["succeeded", "600/600 samples (100%)"]


def test_status_of_a_target_radius_job_counts_inputs_settled(service, capsys, model_id, digits):
    code, out, _ = run(
        capsys,
        "submit",
        model_id,
        "--inputs",
        str(digits["png"]),
        "--sigma",
        "0.25",
        "--target-radius",
        "0.25",
        "--n",
        "2000",
        "--seed",
        "0",
    )
    job_id = out.strip()
    assert code == 0 and run(capsys, "wait", job_id)[0] == 0
    code, out, _ = run(capsys, "status", job_id)
    assert out.rstrip("\n").split("\t")[2:] == ["succeeded", "3/3 inputs settled (100%)"]


def test_dataset_upload_and_job(service, capsys, model_id, digits, tmp_path):
    x, y = np.load(digits["x"]), np.load(digits["y"])
    np.savez(tmp_path / "digits.npz", x=x, y=y)
    code, out, err = run(
        capsys, "datasets", "upload", str(tmp_path / "digits.npz"), "--name", "digits-12"
    )
    dataset_id = out.strip()
    assert code == 0 and "12 inputs" in err, err
    out_tsv = tmp_path / "d.tsv"
    code, _, err = run(
        capsys,
        "submit",
        model_id,
        "--dataset",
        dataset_id,
        "--skip",
        "2",
        "--limit",
        "6",
        "--sigma",
        "0.25",
        "--n0",
        "20",
        "--n",
        "500",
        "--seed",
        "0",
        "--wait",
        "--out",
        str(out_tsv),
    )
    assert code == 0, err
    log = read_log(out_tsv)
    assert log.idx.tolist() == list(range(2, 8)) and log.label.tolist() == y[2:8].tolist()
    code, out, _ = run(capsys, "datasets", "list")
    assert any(line.startswith(f"{dataset_id}\tdigits-12\t12\t1,8,8") for line in out.splitlines())
    assert run(capsys, "datasets", "delete", dataset_id)[0] == 0


def test_wait_timeout_then_cancel(service, capsys, model_id, tmp_path):
    x = tmp_path / "x.npy"
    np.save(x, np.full((4, 1, 8, 8), 0.5, dtype=np.float32))
    code, out, _ = run(
        capsys,
        "submit",
        model_id,
        "--inputs",
        str(x),
        "--sigma",
        "0.5",
        "--n0",
        "10",
        "--n",
        "2000000",
        "--batch-size",
        "500",
        "--seed",
        "0",
    )
    job_id = out.strip()
    code, out, err = run(capsys, "wait", job_id, "--timeout", "0.5")
    assert code == 2 and "keeps running" in err and len(err.splitlines()) == 1
    code, _, err = run(capsys, "cancel", job_id)
    assert code == 0 and job_id in err
    code, out, err = run(capsys, "wait", job_id, "--timeout", "30")
    assert code == 2 and out == "" and err == f"smoothcert: error: job {job_id} canceled\n"


def test_api_errors_are_one_line_exit_2(service, capsys, model_id, digits, monkeypatch):
    code, _, err = run(capsys, "submit", model_id, "--inputs", str(digits["x"]), "--sigma", "-1")
    assert code == 2 and "422" in err and "sigma" in err and len(err.splitlines()) == 1
    code, _, err = run(capsys, "status", "no-such-job")
    assert code == 2 and "404" in err and "unknown job" in err
    code, _, err = run(capsys, "models", "delete", model_id, "--api-key", USER_KEY)
    assert code == 2 and "403" in err and "admin key" in err

    monkeypatch.setenv("SMOOTHCERT_API_KEY", "wrong-key")
    code, out, err = run(capsys, "models", "list")
    assert (
        code == 2
        and out == ""
        and err.startswith("smoothcert: error:")
        and len(err.splitlines()) == 1
    )
    assert "401" in err and "invalid API key" in err

    monkeypatch.delenv("SMOOTHCERT_API_KEY")
    code, _, err = run(capsys, "status", "anything")
    assert code == 2 and "no API key" in err and "SMOOTHCERT_API_KEY" in err


def test_unreachable_service_is_one_line_naming_the_url(service, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = run(capsys, "models", "list", "--url", url)
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith("smoothcert: error: cannot connect") and url in err


def test_console_script(service, model_id):
    script = Path(sys.executable).with_name("smoothcert")
    proc = subprocess.run(
        [str(script), "models", "list"],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert model_id in proc.stdout


def test_the_client_and_cli_import_without_torch():
    code = (
        "import sys, smoothcert.service.client.service_client, smoothcert.service.cli.main; "
        "bad = [k for k in ('torch', 'onnxruntime') if k in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
