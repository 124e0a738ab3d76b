"""ONNX models run by onnxruntime: shape and classes from the graph, the provider really in use."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from smoothcert.models.architectures import build_network
from smoothcert.models.base import BaseClassifier, Normalize
from smoothcert.models.loaders import load_model
from smoothcert.models.metadata import ModelError, Normalization
from smoothcert.models.onnx_runtime import OnnxClassifier


def export_plain_onnx(
    net: torch.nn.Module, path: Path, batch: int = 2, dynamic_batch: bool = True
) -> Path:
    """Export without any smoothcert metadata, as a user's own exporter would."""
    axes = {"x": {0: "n"}, "scores": {0: "n"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net.eval(),
            (torch.zeros((batch, 1, 8, 8)),),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=["scores"],
            dynamic_axes=axes,
        )
    return path


@pytest.fixture(scope="module")
def digits_net() -> torch.nn.Module:
    return build_network("digits_cnn", 6).eval()


def test_onnx_without_metadata_reads_shape_and_classes_from_the_graph(tmp_path, digits_net):
    path = export_plain_onnx(digits_net, tmp_path / "plain.onnx")
    model = load_model(path, device="cpu")
    assert isinstance(model, OnnxClassifier) and isinstance(model, BaseClassifier)
    assert model.info.input_shape == (1, 8, 8) and model.info.num_classes == 6
    assert model.info.format == "onnx" and model.info.arch is None and len(model.info.sha256) == 64
    assert model.fixed_batch is None


def test_the_provider_in_use_is_reported(tmp_path, digits_net):
    path = export_plain_onnx(digits_net, tmp_path / "plain.onnx")
    model = OnnxClassifier(path, device="auto")
    assert model.provider == model.session.get_providers()[0]
    assert model.runtime == "onnxruntime" and model.precision == "float32"
    if (
        "CUDAExecutionProvider" not in ort.get_available_providers()
        or not torch.cuda.is_available()
    ):
        assert model.provider == "CPUExecutionProvider"
        assert model.device == torch.device("cpu")
    assert OnnxClassifier(path, device="cpu").provider == "CPUExecutionProvider"


def test_labels_match_torch_and_run_on_cpu_tensors(tmp_path, digits_net):
    model = OnnxClassifier(export_plain_onnx(digits_net, tmp_path / "plain.onnx"), device="cpu")
    x = torch.rand((9, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = digits_net(x)
    torch.testing.assert_close(model.logits(x), expected, rtol=1e-4, atol=1e-5)
    labels = model.classify(x)
    assert labels.dtype == torch.int64 and labels.device == torch.device("cpu")
    assert torch.equal(labels, expected.argmax(dim=1))


def test_a_fixed_batch_graph_runs_in_chunks(tmp_path, digits_net):
    path = export_plain_onnx(digits_net, tmp_path / "fixed.onnx", batch=4, dynamic_batch=False)
    model = load_model(path, device="cpu")
    assert model.fixed_batch == 4
    x = torch.rand((7, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = digits_net(x)
    torch.testing.assert_close(model.logits(x), expected, rtol=1e-4, atol=1e-5)


def test_an_explicit_normalization_is_applied_in_front_of_the_graph(tmp_path, digits_net):
    norm = Normalization((0.3,), (0.4,))
    model = OnnxClassifier(
        export_plain_onnx(digits_net, tmp_path / "bare.onnx"),
        device="cpu",
        normalization={"mean": [0.3], "std": [0.4]},
    )
    x = torch.rand((5, 1, 8, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = torch.nn.Sequential(Normalize(norm, 1), digits_net)(x)
    torch.testing.assert_close(model.logits(x), expected, rtol=1e-4, atol=1e-5)
    assert model.info.normalization == norm


def test_metadata_is_read_and_explicit_arguments_win(demo_paths):
    described = OnnxClassifier(demo_paths["onnx"], device="cpu")
    assert described.info.sigma == 0.25 and described.info.class_names == [
        str(d) for d in range(10)
    ]
    assert described.info.normalization is not None  # describes the graph's own layer
    assert described._normalize is None  # ... which is not applied a second time
    overridden = OnnxClassifier(demo_paths["onnx"], device="cpu", sigma=0.5, name="other")
    assert (overridden.info.sigma, overridden.info.name) == (0.5, "other")


def test_thread_count_is_configurable(demo_paths):
    model = OnnxClassifier(demo_paths["onnx"], device="cpu", intra_op_num_threads=1)
    assert model.session.get_session_options().intra_op_num_threads == 1


def test_torch_and_onnx_demo_models_agree(demo_paths, digits_test_set):
    x, _ = digits_test_set
    noisy = x + 0.25 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    torch_model = load_model(demo_paths["safetensors"], device="cpu")
    onnx_model = load_model(demo_paths["onnx"], device="cpu")
    for batch in (x, noisy):
        agreement = (torch_model.classify(batch) == onnx_model.classify(batch)).float().mean()
        assert agreement >= 0.99


def test_a_wrong_class_count_is_refused(demo_paths):
    with pytest.raises(ModelError, match="num_classes is 5 but the model outputs scores of shape"):
        load_model(demo_paths["onnx"], device="cpu", num_classes=5)


def test_an_input_shape_against_the_graph_is_refused(demo_paths):
    with pytest.raises(ModelError, match=r"input_shape \[1, 9, 9\] disagrees"):
        load_model(demo_paths["onnx"], device="cpu", input_shape=(1, 9, 9))


def test_garbage_named_onnx_is_refused(tmp_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"\x08\x07 not a protobuf at all")
    with pytest.raises(ModelError, match="not a loadable ONNX model") as excinfo:
        load_model(path)
    assert "\n" not in str(excinfo.value)


cuda_onnx = pytest.mark.skipif(
    not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="needs CUDA and onnxruntime's CUDA provider",
)


@pytest.mark.gpu
@cuda_onnx
def test_cuda_provider_runs_on_gpu_tensors(demo_paths, digits_test_set):
    x, y = digits_test_set
    model = load_model(demo_paths["onnx"], device="cuda")
    assert model.provider == "CUDAExecutionProvider" and model.device.type == "cuda"
    labels = model.classify(x.to(model.device))
    assert labels.device.type == "cuda"
    cpu_labels = load_model(demo_paths["onnx"], device="cpu").classify(x)
    assert (labels.cpu() == cpu_labels).float().mean() >= 0.99
    assert (labels.cpu().numpy() == np.asarray(y)).mean() > 0.9


def test_external_data_files_are_refused(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    (tmp_path / "neighbour.bin").write_bytes(b"secret weights!!")  # 16 bytes beside the model
    weight = TensorProto(
        name="w", data_type=TensorProto.FLOAT, dims=[1, 1, 2, 2], data_location=TensorProto.EXTERNAL
    )
    for key, value in [("location", "neighbour.bin"), ("offset", "0"), ("length", "16")]:
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["sum"]), helper.make_node("Flatten", ["sum"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / "external.onnx"
    onnx.save(model, str(path), save_as_external_data=False)
    with pytest.raises(ModelError, match="external data files"):
        load_model(path, device="cpu")


def tiny_onnx(
    path: Path, nodes: list, opsets: dict[str, int], functions=(), initializers=()
) -> Path:
    """x (n, 1, 2, 2) -> ... -> y (n, 4), written as bytes (onnx.save would follow external data)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["flat"]), *nodes],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        list(initializers),
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
        ir_version=8,
        functions=list(functions),
    )
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize(
    "node,opsets,phrase",
    [
        # onnxruntime itself would run this one: its contrib ops are registered in every build.
        (("Gelu", "com.microsoft"), {"": 17, "com.microsoft": 1}, "operator 'com.microsoft:Gelu'"),
        (("Exfiltrate", "com.evil"), {"": 17, "com.evil": 1}, "operator 'com.evil:Exfiltrate'"),
        (("Identity", ""), {"": 17, "com.evil": 1}, "imports the operator set 'com.evil'"),
    ],
)
def test_non_standard_operators_are_refused_before_onnxruntime_opens_the_file(
    tmp_path, node, opsets, phrase
):
    from onnx import helper

    op_type, domain = node
    path = tiny_onnx(
        tmp_path / "m.onnx", [helper.make_node(op_type, ["flat"], ["y"], domain=domain)], opsets
    )
    with pytest.raises(ModelError, match="not standard ONNX") as excinfo:
        load_model(path, device="cpu", num_classes=4, input_shape=(1, 2, 2))
    assert phrase in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_functions_defined_in_the_model_may_use_their_own_domain(tmp_path):
    from onnx import helper

    double = helper.make_function(
        "my.funcs",
        "Double",
        ["a"],
        ["b"],
        [helper.make_node("Add", ["a", "a"], ["b"])],
        [helper.make_opsetid("", 17)],
    )
    path = tiny_onnx(
        tmp_path / "m.onnx",
        [helper.make_node("Double", ["flat"], ["y"], domain="my.funcs")],
        {"": 17, "my.funcs": 1},
        functions=[double],
    )
    model = load_model(path, device="cpu", input_shape=(1, 2, 2), num_classes=4)
    assert model.logits(torch.ones((1, 1, 2, 2))).tolist() == [[2.0] * 4]


@pytest.mark.parametrize("location", ["../../../etc/passwd", "/etc/passwd"])
def test_external_data_anywhere_is_refused_without_reading_it(tmp_path, location):
    from onnx import TensorProto, helper

    weight = TensorProto(
        name="w", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL
    )
    for key, value in [("location", location), ("offset", "0"), ("length", "16")]:
        weight.external_data.add(key=key, value=value)
    path = tiny_onnx(
        tmp_path / "m.onnx",
        [helper.make_node("Add", ["flat", "w"], ["y"])],
        {"": 17},
        initializers=[weight],
    )
    with pytest.raises(ModelError, match=f"external data files \\(tensor 'w' in '{location}'\\)"):
        load_model(path, device="cpu")


def test_external_data_in_a_subgraph_constant_is_refused(tmp_path):
    from onnx import TensorProto, helper

    hidden = TensorProto(
        name="c", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL
    )
    hidden.external_data.add(key="location", value="/etc/shadow")
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["c_out"], value=hidden)],
        "then",
        [],
        [helper.make_tensor_value_info("c_out", TensorProto.FLOAT, [4])],
    )
    nodes = [
        helper.make_node("ReduceSum", ["flat"], ["s"], keepdims=0),
        helper.make_node("Cast", ["s"], ["cond"], to=TensorProto.BOOL),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch),
    ]
    path = tiny_onnx(tmp_path / "m.onnx", nodes, {"": 17})
    with pytest.raises(ModelError, match="'/etc/shadow'"):
        load_model(path, device="cpu")
