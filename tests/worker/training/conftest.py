"""Fixtures the training tests share: one torch thread, and a tiny stroke dataset."""

from __future__ import annotations

import pytest
import torch

from smoothcert.worker.data.datasets import Dataset
from tests.worker.training.test_training import strokes


@pytest.fixture(scope="module")
def one_thread():
    """These networks are tiny: one thread is as fast, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny() -> Dataset:
    """96 training and 64 test images of the four stroke classes."""
    return Dataset("tiny-strokes", *strokes(96, 5), *strokes(64, 6))
