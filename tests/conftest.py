"""Suite-wide fixtures and hooks.

The fixtures of the real stack live in :mod:`tests.support.stack`. GPU tests run where CUDA is
present and are reported as skipped elsewhere. The demo model (digits_cnn trained on
scikit-learn's digits) is built once per session for every test that asks.
"""

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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; run on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo files (safetensors, onnx, test_x, test_y), trained once for the whole session."""
    return build_demo(tmp_path_factory.mktemp("demo"), seed=0)


@pytest.fixture(scope="session")
def digits_test_set(demo_paths: dict[str, Path]) -> tuple[torch.Tensor, np.ndarray]:
    """The demo's held-out digits: float32 (N, 1, 8, 8) tensor in [0, 1] and int64 labels."""
    return torch.from_numpy(np.load(demo_paths["test_x"])), np.load(demo_paths["test_y"])
