"""The API as its image installs it: a new virtual environment, `pip install '.[api]'`, its server.

No torch, no onnxruntime, nothing of the worker: the install must not bring them in, creating
the app must not import them, and the server must answer. A real install from the package
index (about a minute), not a simulation with blocked imports.
"""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import httpx
import pytest

from smoothcert.service.devstack.redis_server import free_port
from tests.support.paths import ROOT
from tests.support.stack import start_process, stop_process, wait_for

pytestmark = pytest.mark.process

ENGINE = ("torch", "onnxruntime", "onnx", "safetensors", "scipy", "matplotlib", "sklearn")


@pytest.fixture(scope="module")
def api_env(tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("api-venv")
    venv.create(where, with_pip=True)
    python = where / "bin" / "python"
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", f"{ROOT}[api]"],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return where


def served_by(api_env: Path, port: int) -> list[str]:
    """The API's server as the image runs it, from the api-only install."""
    python = str(api_env / "bin" / "python")
    return [
        python,
        "-m",
        "smoothcert.service.api.server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def test_the_api_extra_installs_no_engine(api_env):
    listed = subprocess.run(
        [str(api_env / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.lower()
    names = {line.split("==")[0] for line in listed.splitlines()}
    assert "fastapi" in names and "smoothcert" in names
    assert not names & {
        "torch",
        "onnxruntime",
        "onnxruntime-gpu",
        "onnx",
        "safetensors",
        "scipy",
    }, names


def test_creating_the_app_loads_no_worker_module(api_env, tmp_path):
    code = (
        "import sys; from smoothcert.service.app import create_app; create_app(); "
        "bad = [m for m in sys.modules if m.startswith('smoothcert.worker') or m.split('.')[0] in "
        f"{ENGINE!r}]; assert not bad, bad"
    )
    # cwd outside the checkout: the installed package is imported, not the source folders
    subprocess.run(
        [str(api_env / "bin" / "python"), "-c", code],
        cwd=tmp_path,
        check=True,
        env={"SMOOTHCERT_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )


def test_the_server_serves_healthz(api_env, tmp_path):
    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "SMOOTHCERT_DATA_DIR": str(tmp_path),
        "SMOOTHCERT_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    log = tmp_path / "api.log"
    proc = start_process(
        served_by(api_env, port),
        env,
        log,
    )
    try:
        wait_for(
            lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200,
            60,
            "the server of the api-only install",
            proc,
            log,
        )
    finally:
        stop_process(proc)


def test_the_web_page_ships_in_the_package(api_env):
    """Every file of the page in the checkout is in the installed package (pyproject's package-data)."""
    shown = subprocess.run(
        [str(api_env / "bin" / "python"), "-m", "pip", "show", "--files", "smoothcert"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    installed = {line.strip() for line in shown.split("Files:", 1)[1].splitlines() if line.strip()}
    page = ROOT / "service" / "api" / "static" / "ui"
    wanted = {
        "smoothcert/service/api/static/ui/" + p.relative_to(page).as_posix()
        for p in page.rglob("*")
        if p.is_file()
    }
    assert {"index.html", "app.js", "style.css", "digits/digits.json"} <= {
        w.split("/ui/", 1)[1] for w in wanted
    }
    assert wanted <= installed, sorted(wanted - installed)


def test_the_installed_package_serves_the_page(api_env, tmp_path):
    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "SMOOTHCERT_DATA_DIR": str(tmp_path),
        "SMOOTHCERT_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    log = tmp_path / "api.log"
    proc = start_process(
        served_by(api_env, port),
        env,
        log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: httpx.get(f"{url}/healthz", timeout=1).status_code == 200,
            60,
            "the server of the api-only install",
            proc,
            log,
        )
        page = httpx.get(url + "/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert (
            'data-testid="submit"' in page.text
            and "default-src 'self'" in page.headers["content-security-policy"]
        )
        assert httpx.get(url + "/ui/app.js").status_code == 200
        assert httpx.get(url + "/ui/digits/digit-0.png").content.startswith(b"\x89PNG")
    finally:
        stop_process(proc)
