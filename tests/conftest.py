"""Suite-wide fixtures and hooks.

The fixtures of the real stack live in :mod:`tests.support.stack`. GPU tests run where CUDA is
present and are reported as skipped elsewhere. The demo model (digits_cnn trained on
scikit-learn's digits) is built once per session for every test that asks.
"""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from smoothcert.models.demo import build_demo

# The real stack's fixtures (Redis, a worker, the API, clients), for every package's tests.
from tests.support.stack import (  # noqa: F401
    admin,
    anonymous,
    api_url,
    api_without_redis,
    client,
    data_dir,
    demo_model,
    redis_url,
    worker,
)


def pytest_configure(config):
    # The CLI keeps runtime choices and ONNX exports under $XDG_CACHE_HOME/smoothcert: a session's
    # own, empty at the start (the user's cache is left alone), for this process and its children.
    import os
    import tempfile

    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="smoothcert-test-cache-")


# The fixtures that start a process: Redis, the worker, the API under uvicorn, a browser. Every
# fixture built on them (api_url, client, admin, anonymous, demo_model, tab, ...) reaches one.
PROCESS_FIXTURES = frozenset({"redis_url", "worker", "api_url", "api_without_redis", "browser"})


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    # A test that uses a process fixture, directly or through another fixture, is a `process`
    # test (`make test-fast` leaves those out), and so is a `deploy` test; a module that starts
    # processes itself says so with `pytestmark = pytest.mark.process`.
    for item in items:
        if "deploy" in item.keywords or PROCESS_FIXTURES.intersection(
            getattr(item, "fixturenames", ())
        ):
            item.add_marker(pytest.mark.process)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; run on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# What a `process` test starts: Python (the CLI, a module, an import check), the virtual
# environment's tools, a shell, Redis, a container engine, a browser. What an installed library
# starts for itself (inductor's compile workers, a browser driver) is no test's own process.
_PROCESS_PROGRAMS = {"bash", "sh", "redis-server", "valkey-server", "podman", "docker", "chromium"}
_LIBRARIES = tuple({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
_STDLIB = sysconfig.get_path("stdlib")


def _a_test_process(args) -> bool:
    program = Path(str(args if isinstance(args, (str, bytes, os.PathLike)) else args[0]))
    if not (
        program.parent == Path(sys.executable).parent
        or program.name.startswith("python")
        or program.name in _PROCESS_PROGRAMS
    ):
        return False
    # Who asked: the first caller of Popen outside the standard library.
    frame = sys._getframe(2)
    while frame is not None:
        where = frame.f_code.co_filename
        if where.startswith(_LIBRARIES):
            return False
        if not where.startswith(_STDLIB):
            return True
        frame = frame.f_back
    return True


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    # A test that starts a process without the `process` mark would slip into `make test-fast`: it
    # fails instead, in every run (so `make test` finds it too), naming the mark it needs.
    if item.get_closest_marker("process"):
        return (yield)
    real = subprocess.Popen._execute_child

    def refuse(self, args, *rest, **kwargs):
        if _a_test_process(args):
            pytest.fail(
                f"{item.nodeid} starts a process ({args!r:.120}) but is not marked `process`: "
                "give it @pytest.mark.process (or its module pytestmark = pytest.mark.process)",
                pytrace=False,
            )
        return real(self, args, *rest, **kwargs)

    subprocess.Popen._execute_child = refuse  # type: ignore[attr-defined]
    try:
        return (yield)
    finally:
        subprocess.Popen._execute_child = real  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def demo_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo files (safetensors, onnx, test_x, test_y), trained once for the whole session."""
    return build_demo(tmp_path_factory.mktemp("demo"), seed=0)


@pytest.fixture(scope="session")
def digits_test_set(demo_paths: dict[str, Path]) -> tuple[torch.Tensor, np.ndarray]:
    """The demo's held-out digits: float32 (N, 1, 8, 8) tensor in [0, 1] and int64 labels."""
    return torch.from_numpy(np.load(demo_paths["test_x"])), np.load(demo_paths["test_y"])
