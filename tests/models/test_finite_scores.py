"""The load-time check refuses models whose scores are NaN or infinite, and metadata that would be
stored as something other than a finite number or a short name; the memory estimate of a batch."""

from __future__ import annotations

import math

import pytest
import torch

from smoothcert.models.base import TorchClassifier, _leaf_output_bytes
from smoothcert.models.loaders import CHECK_SIGMA, check_batches, check_forward, load_model
from smoothcert.models.metadata import (
    MAX_CLASS_NAME_CHARS,
    ModelError,
    check_fields,
    parse_info_json,
)
from smoothcert.models.onnx_runtime import graph_bytes_per_sample
from tests.models.test_onnx_runtime import tiny_onnx
from tests.support.classifiers import ConstantNet, wrap
from tests.support.hostile_models import always_nan_onnx, nan_above_onnx, nan_weights_safetensors


def test_an_onnx_model_returning_nan_is_refused(tmp_path):
    with pytest.raises(ModelError, match="NaN or infinite scores for 2 of 2 zeros") as excinfo:
        load_model(always_nan_onnx(tmp_path / "nan.onnx"), device="cpu")
    assert "\n" not in str(excinfo.value)


def test_a_digits_cnn_with_nan_weights_is_refused(tmp_path):
    with pytest.raises(ModelError, match="NaN or infinite scores"):
        load_model(nan_weights_safetensors(tmp_path / "nan.safetensors"), device="cpu")


class _NanBelowZero(ConstantNet):
    """Finite on images in [0, 1]; NaN once noise pushes a pixel below 0."""

    def forward(self, x):
        out = super().forward(x)
        return out + torch.where((x < 0).flatten(1).any(dim=1, keepdim=True), math.nan, 0.0)


def test_the_noisy_batch_catches_what_zeros_and_clean_images_do_not():
    model = wrap(_NanBelowZero(label=1, num_classes=4), num_classes=4)
    batches = check_batches(model.info.input_shape)
    assert [bool(torch.isfinite(model.logits(b)).all()) for b in batches.values()] == [
        True,
        True,
        False,
    ]
    with pytest.raises(ModelError, match=f"images with Gaussian noise of sigma {CHECK_SIGMA}"):
        check_forward(model)


def test_the_check_batches_are_fixed():
    first, second = check_batches((1, 8, 8)), check_batches((1, 8, 8))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_a_model_nan_only_under_strong_noise_passes_the_load_check(tmp_path):
    model = load_model(nan_above_onnx(tmp_path / "m.onnx"), device="cpu")
    x = torch.full((2, 1, 8, 8), 0.5)
    x[1, 0, 0, 0] = 3.0  # what σ = 1 noise gives a pixel now and then
    finite = torch.isfinite(model.logits(x)).all(dim=1)
    assert finite.tolist() == [True, False]


@pytest.mark.parametrize("sigma", [math.inf, -math.inf, math.nan, -0.1, "0.5", True])
def test_the_training_sigma_must_be_finite_and_non_negative(demo_paths, sigma):
    with pytest.raises(ModelError, match="sigma must be a non-negative number, and finite"):
        check_fields({"sigma": sigma})
    with pytest.raises(ModelError, match="sigma must be"):
        load_model(demo_paths["safetensors"], device="cpu", sigma=sigma)


def test_a_file_claiming_an_infinite_sigma_is_refused():
    with pytest.raises(ModelError, match="finite"):
        parse_info_json('{"sigma": Infinity, "num_classes": 10}')


@pytest.mark.parametrize(
    "names,phrase",
    [
        (["a"] * 9, "9 class_names given for 10 classes"),
        (["a"] * 11, "11 class_names given for 10 classes"),
        (["a"] * 9 + [""], r"class_names\[9\] has 0 characters"),
        (
            ["a"] * 9 + ["x" * (MAX_CLASS_NAME_CHARS + 1)],
            f"has {MAX_CLASS_NAME_CHARS + 1} characters",
        ),
        (["a"] * 9 + [7], "class_names must be a list of strings"),
    ],
)
def test_class_names_are_one_short_name_per_class(demo_paths, names, phrase):
    with pytest.raises(ModelError, match=phrase):
        check_fields({"num_classes": 10, "class_names": names})
    with pytest.raises(ModelError, match=phrase):
        load_model(demo_paths["onnx"], device="cpu", class_names=names)


def test_class_names_at_the_bound_are_kept(demo_paths):
    names = [f"{i}" * MAX_CLASS_NAME_CHARS for i in range(10)]
    assert load_model(demo_paths["onnx"], device="cpu", class_names=names).info.class_names == names


class _Recorder(ConstantNet):
    def __init__(self):
        super().__init__(label=0, num_classes=3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def test_the_memory_estimate_of_a_torch_model_runs_a_copy_on_the_meta_device():
    net = _Recorder()
    model = wrap(net, input_shape=(1, 4, 4), num_classes=3)
    estimate = model.work_bytes_per_sample()
    assert net.calls == 0 and estimate == model.work_bytes_per_sample()
    assert (
        estimate == _leaf_output_bytes(net, (1, 4, 4), torch.device("cpu")) == 3 * 4
    )  # the scores


def test_the_memory_estimate_counts_results_alive_at_once(demo_paths):
    model = load_model(demo_paths["safetensors"], device="cpu")
    # digits_cnn per input, float32: Normalize 64, conv1 and its ReLU 2048 each, conv2 and its
    # ReLU 4096 each, pool 1024, fc1 and its ReLU 128 each, fc 10: 13,642 floats (flatten is no
    # module); twice the peak alive is above that sum here.
    assert isinstance(model, TorchClassifier) and model.work_bytes_per_sample() == 4 * 13_642


def test_the_graph_estimate_follows_the_values_alive_at_once(tmp_path):
    from onnx import helper, load

    # flat (n, 4) then y = flat + flat (n, 4): 16 bytes each per input, both alive at the Add.
    path = tiny_onnx(
        tmp_path / "m.onnx", [helper.make_node("Add", ["flat", "flat"], ["y"])], {"": 17}
    )
    assert graph_bytes_per_sample(load(str(path)), "x", (1, 2, 2)) == 32
    model = load_model(path, device="cpu", num_classes=4)
    assert model.work_bytes_per_sample() == 32 + 2 * 16  # and the input with its normalized copy


def test_a_value_of_unknown_shape_counts_as_the_largest_known(tmp_path):
    from onnx import helper, load, shape_inference

    # Reshape to a shape computed at run time: inference knows y's rank, not its dimensions.
    nodes = [
        helper.make_node("Shape", ["flat"], ["dims"]),
        helper.make_node("Reshape", ["flat", "dims"], ["r"]),
        helper.make_node("Identity", ["r"], ["y"]),
    ]
    proto = load(str(tiny_onnx(tmp_path / "m.onnx", nodes, {"": 17})))
    inferred = {
        v.name: v.type.tensor_type.shape
        for v in shape_inference.infer_shapes(proto).graph.value_info
    }
    assert "r" not in inferred or not any(d.HasField("dim_value") for d in inferred["r"].dim)
    # flat 16 bytes, dims nothing per input (no batch dimension), r as large as flat, y 16: 48
    assert graph_bytes_per_sample(proto, "x", (1, 2, 2)) == 48
