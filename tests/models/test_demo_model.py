"""The demo model: trained in seconds, accurate, deterministic, written in both formats."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smoothcert.models import demo
from smoothcert.models.loaders import load_model


def test_demo_paths_have_the_promised_shapes(demo_paths, digits_test_set):
    x, y = digits_test_set
    assert set(demo_paths) == {"safetensors", "onnx", "test_x", "test_y"}
    assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8) and 0 <= x.min() <= x.max() <= 1
    assert y.dtype == np.int64 and len(y) == len(x) == 359


@pytest.mark.parametrize("kind", ["safetensors", "onnx"])
def test_demo_model_is_accurate_and_self_describing(demo_paths, digits_test_set, kind):
    x, y = digits_test_set
    model = load_model(demo_paths[kind], device="cpu")
    accuracy = (model.classify(x).numpy() == y).mean()
    assert accuracy > 0.9
    info = model.info
    assert info.sigma == 0.25 and info.class_names == [str(d) for d in range(10)]
    assert info.input_shape == (1, 8, 8) and info.num_classes == 10
    assert 0.2 < info.normalization.mean[0] < 0.4 and 0.3 < info.normalization.std[0] < 0.5
    assert info.extra["clean_test_accuracy"] == pytest.approx(accuracy, abs=0.01)


def test_demo_build_is_deterministic_and_leaves_the_global_rng_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "EPOCHS", 1)
    before = torch.random.get_rng_state()
    first = demo.build_demo(tmp_path / "a", seed=7)
    second = demo.build_demo(tmp_path / "b", seed=7)
    assert torch.equal(before, torch.random.get_rng_state())
    for kind in first:
        assert first[kind].read_bytes() == second[kind].read_bytes(), kind
    other = demo.build_demo(tmp_path / "c", seed=8)
    assert other["safetensors"].read_bytes() != first["safetensors"].read_bytes()


def test_demo_weights_do_not_depend_on_the_thread_count(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "EPOCHS", 1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = demo.build_demo(tmp_path / "one")["safetensors"].read_bytes()
        torch.set_num_threads(4)
        four = demo.build_demo(tmp_path / "four")["safetensors"].read_bytes()
        assert torch.get_num_threads() == 4  # restored after training
    finally:
        torch.set_num_threads(threads)
    assert one == four


def test_demo_runs_as_a_module(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "EPOCHS", 1)
    demo.main([str(tmp_path / "cli")])
    printed = capsys.readouterr().out
    assert "digits_cnn.onnx" in printed and (tmp_path / "cli" / "digits_cnn.safetensors").exists()
