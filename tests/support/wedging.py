"""A model that never finishes: an ONNX Loop of 2^62 iterations around the digits scores. For
the test that shows the upload check's deadline refuses it and the worker goes on."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

SHAPE, CLASSES = (1, 8, 8), 10


def endless_loop_onnx(path: Path) -> Path:
    """x (n, 1, 8, 8) -> flat (n, 64) -> linear (n, 10), then 2^62 times scores += 0."""
    weight = np.random.default_rng(0).normal(size=(64, CLASSES)).astype(np.float32)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["acc_in", "zero"], ["acc_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, ["n", CLASSES])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, ["n", CLASSES])],
        [numpy_helper.from_array(np.zeros((1,), np.float32), "zero")])
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["linear"]),
         helper.make_node("Loop", ["trips", "keep_going", "linear"], ["scores"], body=body)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", *SHAPE])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", CLASSES])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.array(2**62, np.int64), "trips"),
         numpy_helper.from_array(np.array(True), "keep_going")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path.write_bytes(model.SerializeToString())
    return path
