"""Suite-wide hooks: GPU tests run where CUDA is present and are reported as skipped elsewhere."""
import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; run on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
