"""`smoothcert certify` runs in-process: a local certification loads no queue, web or Redis code.

Import-linter (tests/test_layers.py) cannot state this one, because the CLI is the one place in
service/ that may reach the worker; so it is checked on a real run, in a fresh interpreter.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.process

SERVICE_SIDE = ("celery", "kombu", "fastapi", "starlette", "uvicorn", "redis")

RUN = """
import sys
from smoothcert.service.cli.main import main
code = main(sys.argv[1:])
assert code == 0, code
loaded = sorted({m.split('.')[0] for m in sys.modules} & set(%r))
print('loaded:', loaded)
assert 'torch' in sys.modules, 'the run did not reach the engine'
assert not loaded, loaded
""" % (SERVICE_SIDE,)


def test_a_local_certify_loads_neither_celery_nor_fastapi_nor_redis(demo_paths, tmp_path):
    out = tmp_path / "certify.tsv"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            RUN,
            "certify",
            str(demo_paths["onnx"]),
            "--inputs",
            str(demo_paths["test_x"]),
            "--sigma",
            "0.25",
            "--n0",
            "10",
            "--n",
            "50",
            "--seed",
            "0",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "loaded: []" in done.stdout
    assert len(out.read_text().splitlines()) > 1
