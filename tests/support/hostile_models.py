"""Models that misbehave: scores that are NaN (always, or only on some noisy copies) and a model
that never returns. For the tests that show they are refused at upload, or fail a certification,
never certified, and never wedge a worker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper

from smoothcert.models.architectures import build_network
from smoothcert.models.metadata import ModelInfo
from smoothcert.models.safetensors_io import save_safetensors_model

SHAPE, CLASSES = (1, 8, 8), 10


def _digits_onnx(path: Path, nodes: list, initializers: list) -> Path:
    """x (n, 1, 8, 8) -> flat (n, 64) -> linear (n, 10) -> ``nodes`` -> scores (n, 10)."""
    weight = np.random.default_rng(0).normal(size=(64, CLASSES)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["x"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["linear"]),
            *nodes,
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", *SHAPE])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", CLASSES])],
        [numpy_helper.from_array(weight, "w"), *initializers],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path.write_bytes(model.SerializeToString())
    return path


def linear_onnx(path: Path) -> Path:
    """A fine model, and a tiny one (a few KiB): scores = the linear map of the flat pixels."""
    return _digits_onnx(path, [helper.make_node("Identity", ["linear"], ["scores"])], [])


def always_nan_onnx(path: Path) -> Path:
    """Scores = linear + 0/0: NaN for every input."""
    zero = numpy_helper.from_array(np.zeros((1,), np.float32), "zero")
    return _digits_onnx(
        path,
        [
            helper.make_node("Div", ["zero", "zero"], ["nan"]),
            helper.make_node("Add", ["linear", "nan"], ["scores"]),
        ],
        [zero],
    )


def nan_above_onnx(path: Path, threshold: float = 2.5) -> Path:
    """Scores = linear + log(threshold − the largest pixel): finite on images in [0, 1] and on the
    upload check's mildly noisy ones, NaN on a noisy copy with a pixel above ``threshold``."""
    limit = numpy_helper.from_array(np.array([threshold], np.float32), "limit")
    return _digits_onnx(
        path,
        [
            helper.make_node("ReduceMax", ["flat"], ["top"], axes=[1], keepdims=1),
            helper.make_node("Sub", ["limit", "top"], ["room"]),
            helper.make_node("Log", ["room"], ["log"]),
            helper.make_node("Add", ["linear", "log"], ["scores"]),
        ],
        [limit],
    )


def endless_loop_onnx(path: Path) -> Path:
    """Scores = linear, then 2^62 times scores += 0: an ONNX Loop that spins inside onnxruntime."""
    return _digits_onnx(
        path,
        [_endless_body_loop("trips")],
        [
            numpy_helper.from_array(np.array(2**62, np.int64), "trips"),
            numpy_helper.from_array(np.array(True), "keep_going"),
        ],
    )


def _endless_body_loop(trips: str):
    """scores = linear, then ``trips`` times scores += 0 (a Loop node)."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["acc_in", "zero"], ["acc_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, ["n", CLASSES]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, ["n", CLASSES]),
        ],
        [numpy_helper.from_array(np.zeros((1,), np.float32), "zero")],
    )
    return helper.make_node("Loop", [trips, "keep_going", "linear"], ["scores"], body=body)


def loop_on_noise_onnx(path: Path, threshold: float = 2.5) -> Path:
    """Scores = linear, then a Loop of 0 iterations while every pixel of the batch is below
    ``threshold`` and of 2^62 once one is above: it passes the upload check (zeros, images in
    [0, 1], and those plus noise of σ = 0.25) and spins on a certification's noisier copies (σ = 1)."""
    top = helper.make_node("ReduceMax", ["flat"], ["top"], keepdims=0)
    return _digits_onnx(
        path,
        [
            top,
            helper.make_node("Greater", ["top", "limit"], ["over"]),
            helper.make_node("Cast", ["over"], ["over_int"], to=TensorProto.INT64),
            helper.make_node("Mul", ["over_int", "big"], ["trips"]),
            _endless_body_loop("trips"),
        ],
        [
            numpy_helper.from_array(np.array(threshold, np.float32), "limit"),
            numpy_helper.from_array(np.array(2**62, np.int64), "big"),
            numpy_helper.from_array(np.array(True), "keep_going"),
        ],
    )


def unused_initializer_onnx(path: Path) -> Path:
    """A fine model with a weight no node uses: onnxruntime warns about it (in C++, on fd 2) as it
    loads the model."""
    return _digits_onnx(
        path,
        [helper.make_node("Identity", ["linear"], ["scores"])],
        [numpy_helper.from_array(np.zeros((3,), np.float32), "unused")],
    )


def nan_weights_safetensors(path: Path) -> Path:
    """A self-describing digits_cnn whose last bias is NaN."""
    net = build_network("digits_cnn", CLASSES)
    with torch.no_grad():
        net.fc.bias.fill_(float("nan"))
    return save_safetensors_model(
        path,
        net,
        ModelInfo(format="safetensors", input_shape=SHAPE, num_classes=CLASSES, arch="digits_cnn"),
    )
