"""docker/gpu-claim.sh: each worker container takes a GPU no other container holds.

Run here with a stand-in nvidia-smi that lists two GPUs and a lock directory in tmp_path; the
"worker" is a shell that writes the CUDA_VISIBLE_DEVICES it got and then sleeps, holding the lock.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.paths import ROOT

pytestmark = pytest.mark.process

SCRIPT = ROOT / "docker" / "gpu-claim.sh"
GPUS = ["GPU-0b8f6c52-aaaa", "GPU-7d1e90f3-bbbb"]


@pytest.fixture
def claim(tmp_path):
    """Start gpu-claim.sh around a sleeper; return a function that starts one more."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\n" + "".join(f"echo '{g}'\n" for g in GPUS))
    fake.chmod(0o755)
    started: list[subprocess.Popen] = []

    def start(name: str, **env: str) -> tuple[subprocess.Popen, Path]:
        out = tmp_path / f"{name}.out"
        environ = {
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "GPU_CLAIM_DIR": str(tmp_path / "locks"),
            "GPU_CLAIM_WAIT_S": "0.1",
            **env,
        }
        proc = subprocess.Popen(
            [
                "bash",
                str(SCRIPT),
                "sh",
                "-c",
                'echo "${CUDA_VISIBLE_DEVICES:-none}" > "$0"; exec sleep 60',
                str(out),
            ],
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        started.append(proc)
        return proc, out

    yield start
    for proc in started:
        proc.kill()
        proc.wait(10)


def visible_devices(out: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.exists() and out.read_text().strip():
            return out.read_text().strip()
        time.sleep(0.05)
    raise TimeoutError(f"{out.name}: the command did not start within {timeout} s")


def test_replicas_take_different_gpus_and_a_spare_waits_for_one(claim):
    first, first_out = claim("first")
    assert visible_devices(first_out) == GPUS[0]
    second, second_out = claim("second")
    assert visible_devices(second_out) == GPUS[1]
    spare, spare_out = claim("spare")
    time.sleep(0.5)
    assert not spare_out.exists(), "a third replica must not share a GPU"
    first.kill()
    first.wait(10)
    assert visible_devices(spare_out) == GPUS[0], "the GPU of a dead container is free again"
    assert spare.poll() is None and second.poll() is None


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"CUDA_VISIBLE_DEVICES": "3"}, "3"),
        ({"SMOOTHCERT_DEVICE": "cpu"}, "none"),
    ],
)
def test_an_explicit_choice_is_left_alone(claim, env, expected):
    _, out = claim("pinned", **env)
    assert visible_devices(out) == expected


def test_without_a_gpu_the_command_runs_on_the_cpu(claim, tmp_path):
    (tmp_path / "bin" / "nvidia-smi").write_text(
        "#!/bin/sh\necho 'No devices were found' >&2\nexit 6\n"
    )
    proc, out = claim("cpu")
    assert visible_devices(out) == "none"
    assert not (tmp_path / "locks").exists() or not os.listdir(tmp_path / "locks")
