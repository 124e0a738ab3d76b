"""load_model: one entry point, every file validated before it is handed out."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from smoothcert.models.architectures import build_network
from smoothcert.models.base import BaseClassifier, Normalize, TorchClassifier
from smoothcert.models.loaders import detect_format, load_model
from smoothcert.models.metadata import ModelError, ModelInfo, Normalization, sha256_file
from smoothcert.models.safetensors_io import save_safetensors_model

CIFAR_NORM = Normalization((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))


def _save_bare(path: Path, net: torch.nn.Module) -> Path:
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def _one_line_model_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_self_describing_safetensors_round_trip(tmp_path):
    net = build_network("cifar_resnet20", 10).eval()
    info = ModelInfo(
        format="safetensors",
        input_shape=(3, 32, 32),
        num_classes=10,
        arch="cifar_resnet20",
        class_names=[f"c{i}" for i in range(10)],
        normalization=CIFAR_NORM,
        sigma=0.5,
        name="r20",
        extra={"method": "test"},
    )
    path = save_safetensors_model(tmp_path / "r20.safetensors", net, info)
    model = load_model(path, device="cpu")
    assert isinstance(model, BaseClassifier) and isinstance(model, TorchClassifier)
    assert model.runtime == "torch" and model.device == torch.device("cpu")
    loaded = model.info
    assert (loaded.arch, loaded.input_shape, loaded.num_classes) == (
        "cifar_resnet20",
        (3, 32, 32),
        10,
    )
    assert loaded.class_names == info.class_names and loaded.normalization == CIFAR_NORM
    assert (loaded.sigma, loaded.name, loaded.extra) == (0.5, "r20", {"method": "test"})
    assert loaded.format == "safetensors" and loaded.sha256 == sha256_file(path)
    x = torch.rand((4, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch.nn.Sequential(Normalize(CIFAR_NORM, 3), net)(x)
    torch.testing.assert_close(model.logits(x), expected)
    assert torch.equal(model.classify(x), expected.argmax(dim=1))


def test_explicit_arguments_override_the_file(demo_paths):
    model = load_model(
        demo_paths["safetensors"],
        device="cpu",
        sigma=0.5,
        name="renamed",
        class_names=list("abcdefghij"),
    )
    assert (model.info.sigma, model.info.name) == (0.5, "renamed")
    assert model.info.class_names[0] == "a"


def test_bare_weights_need_an_architecture(tmp_path):
    path = _save_bare(tmp_path / "bare.safetensors", build_network("digits_cnn", 7))
    with pytest.raises(ModelError, match="bare weights.*arch") as excinfo:
        load_model(path, device="cpu")
    _one_line_model_error(excinfo)
    model = load_model(path, device="cpu", arch="digits_cnn")
    assert model.info.num_classes == 7  # read from fc.weight
    assert model.info.input_shape == (1, 8, 8)  # the architecture's default
    assert model.info.normalization is None and model.info.sigma is None


def test_half_precision_weights_run_in_float32(tmp_path):
    net = build_network("digits_cnn", 10)
    path = _save_bare(tmp_path / "half.safetensors", net.half())
    model = load_model(path, device="cpu", arch="digits_cnn")
    assert model.logits(torch.zeros((3, 1, 8, 8))).dtype == torch.float32


def test_unknown_architecture_is_refused(tmp_path):
    path = _save_bare(tmp_path / "bare.safetensors", build_network("digits_cnn", 10))
    with pytest.raises(ModelError, match="unknown architecture 'resnet9000'.*digits_cnn"):
        load_model(path, arch="resnet9000")


def test_weights_of_another_architecture_are_refused_in_one_line(tmp_path):
    path = _save_bare(tmp_path / "digits.safetensors", build_network("digits_cnn", 10))
    with pytest.raises(ModelError) as excinfo:
        load_model(path, device="cpu", arch="cifar_resnet20")
    message = _one_line_model_error(excinfo)
    assert "missing 125 keys (bn1.weight, bn1.bias, bn1.running_mean and 122 more)" in message
    assert "unexpected 5 keys (conv1.bias" in message


def test_a_wrapper_prefix_on_the_keys_is_pointed_out(tmp_path):
    state = {f"module.{k}": v for k, v in build_network("digits_cnn", 10).state_dict().items()}
    path = tmp_path / "parallel.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelError, match="carry the prefix 'module.'"):
        load_model(path, device="cpu", arch="digits_cnn")


def test_shape_mismatch_is_refused_in_one_line(tmp_path):
    state = dict(build_network("digits_cnn", 10).state_dict())
    state["fc1.weight"] = torch.zeros((128, 512))
    path = tmp_path / "wrong.safetensors"
    save_file(state, str(path))
    with pytest.raises(
        ModelError,
        match=r"1 shape mismatches \(fc1.weight \(128, 512\) != "
        r"\(128, 1024\)\)",
    ) as excinfo:
        load_model(path, device="cpu", arch="digits_cnn")
    _one_line_model_error(excinfo)


def test_a_class_count_the_weights_do_not_have_is_refused(demo_paths):
    with pytest.raises(ModelError, match="fc.weight"):
        load_model(demo_paths["safetensors"], device="cpu", num_classes=5)


def test_an_input_shape_the_network_cannot_take_is_refused(demo_paths):
    with pytest.raises(ModelError, match=r"cannot run on input shape \[1, 16, 16\]") as excinfo:
        load_model(demo_paths["safetensors"], device="cpu", input_shape=(1, 16, 16))
    _one_line_model_error(excinfo)


def test_normalization_must_match_the_channels(tmp_path):
    path = _save_bare(tmp_path / "r20.safetensors", build_network("cifar_resnet20", 10))
    with pytest.raises(ModelError, match="1 channels"):
        load_model(path, device="cpu", arch="cifar_resnet20", normalization={"mean": [0.5]})


def test_class_names_must_match_the_class_count(demo_paths):
    with pytest.raises(ModelError, match="3 class_names given for 10 classes"):
        load_model(demo_paths["safetensors"], device="cpu", class_names=["a", "b", "c"])


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="no such file: .*absent.onnx"):
        load_model(tmp_path / "absent.onnx")


@pytest.mark.parametrize("suffix", [".safetensors", ".onnx", ".pt", ".bin"])
def test_pickles_are_refused_whatever_the_suffix(tmp_path, suffix):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Marker(marker), protocol=2)
    path = tmp_path / f"evil{suffix}"
    path.write_bytes(payload)
    with pytest.raises(ModelError, match="pickled PyTorch checkpoint; smoothcert never unpickles"):
        load_model(path)
    assert not marker.exists()


@pytest.mark.parametrize("zipped", [True, False])
def test_torch_save_checkpoints_are_refused(tmp_path, zipped):
    path = tmp_path / "checkpoint.safetensors"
    torch.save(
        build_network("digits_cnn", 10).state_dict(), path, _use_new_zipfile_serialization=zipped
    )
    with pytest.raises(ModelError, match="convert it to safetensors"):
        load_model(path, arch="digits_cnn")


class _Marker:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_format_is_sniffed_when_the_suffix_says_nothing(tmp_path, demo_paths):
    st, ox = tmp_path / "model_a.bin", tmp_path / "model_b"
    shutil.copy(demo_paths["safetensors"], st)
    shutil.copy(demo_paths["onnx"], ox)
    assert (detect_format(st), detect_format(ox)) == ("safetensors", "onnx")
    assert load_model(ox, device="cpu").info.format == "onnx"
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="neither ONNX nor safetensors"):
        load_model(junk)


def test_device_auto_and_bad_devices(demo_paths):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert load_model(demo_paths["safetensors"]).device.type == expected
    with pytest.raises(ModelError, match="unknown device"):
        load_model(demo_paths["safetensors"], device="tpu:7")


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(sigma=-0.1), "sigma must be a non-negative number"),
        (dict(class_names=[0, 1]), "class_names must be a list of strings"),
        (dict(input_shape=(1, 8)), "input_shape must be three positive integers"),
        (dict(normalization={"mean": [0.5], "std": [0.0]}), "std must be positive"),
    ],
)
def test_explicit_arguments_are_validated(demo_paths, bad, message):
    for kind in ("safetensors", "onnx"):
        with pytest.raises(ModelError, match=message):
            load_model(demo_paths[kind], device="cpu", **bad)
