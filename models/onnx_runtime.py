"""ONNX models as base classifiers, run by onnxruntime.

The CUDA execution provider is asked for when CUDA is present and the caller did not ask for the
CPU; onnxruntime falls back to the CPU *silently* when the CUDA provider cannot start, so the
provider actually in use is read back from the session and reported, and the inputs then stay
on the CPU. Models must be self-contained files of standard ONNX operators: before onnxruntime
opens a file, :func:`check_onnx_contents` refuses weights in external data files and operators of
any other domain (custom ops, onnxruntime's own extensions).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from smoothcert.models import process_tuning
from smoothcert.models.base import PEAK_MARGIN, Normalize
from smoothcert.models.metadata import (
    ModelError,
    ModelInfo,
    Normalization,
    check_input_shape,
    check_num_classes,
    described_kind,
    fields_from_metadata_map,
)

log = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
_OUTPUT_DTYPES = {
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(double)": torch.float64,
}
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}
# ONNX's own operator sets. Any other domain is either a custom-op library the process would have
# to load, or onnxruntime's extensions (com.microsoft contrib ops: a larger, less reviewed surface
# than the standard, and tied to one runtime); an image classifier needs neither. Functions the
# model defines itself may use other domains: their bodies are checked like the main graph.
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
_SHOWN_CHARS = 60


def _wants_cuda(device: str | torch.device) -> bool:
    if str(device) == "auto":
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


class OnnxClassifier:
    """An ``.onnx`` file as a :class:`~smoothcert.models.base.BaseClassifier`.

    The graph must take one float32 input (B, C, H, W) and give scores (B, K). Shape and class
    count come from the explicit arguments, else the file's ``smoothcert`` metadata, else the
    graph (and, for a symbolic class dimension, one forward pass of zeros). The file's metadata
    describes the graph, whose normalization is usually built in; only an explicit
    ``normalization`` argument is applied, in torch, in front of the graph. A fixed batch
    dimension is honoured by running in chunks of that size (the last one zero-padded).
    ``intra_op_num_threads=None`` takes this process's share of the cores when it was tuned
    (:func:`smoothcert.models.process_tuning.threads`), else onnxruntime's default.
    """

    runtime = "onnxruntime"
    graph_sha256: str | None = None  # the export's, when the runtime choice made the file

    def __init__(
        self,
        path: str | Path,
        *,
        device: str | torch.device = "auto",
        input_shape: tuple[int, int, int] | None = None,
        num_classes: int | None = None,
        normalization: Normalization | dict | str | None = None,
        class_names: list[str] | None = None,
        sigma: float | None = None,
        name: str | None = None,
        intra_op_num_threads: int | None = None,
    ):
        graph = check_onnx_contents(path)
        if described_kind({p.key: p.value for p in graph.metadata_props}) == "denoiser":
            raise ModelError(
                f"{Path(path).name} is a denoiser (an ONNX diffusion model), not a classifier: certify "
                "it in front of one (smoothcert certify CLASSIFIER --denoiser FILE, or a pipeline model)"
            )
        self.session = _open_session(Path(path), device, intra_op_num_threads)
        self.provider = self.session.get_providers()[0]
        on_cuda = self.provider == CUDA_PROVIDER
        if _wants_cuda(device) and not on_cuda:
            log.warning("%s: CUDA requested but onnxruntime runs it on %s", path, self.provider)
        self.device = torch.device("cuda", _cuda_index(device)) if on_cuda else torch.device("cpu")
        self.precision = "float32"

        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise ModelError(
                f"the ONNX graph takes {len(inputs)} inputs; smoothcert feeds exactly "
                "one image batch"
            )
        if not outputs:
            raise ModelError("the ONNX graph has no output")
        graph_in, graph_out = inputs[0], outputs[0]
        if graph_in.type != "tensor(float)" or len(graph_in.shape) != 4:
            raise ModelError(
                f"the ONNX input must be a 4-d float32 tensor (B, C, H, W), not "
                f"{graph_in.type} {graph_in.shape}"
            )
        if graph_out.type not in _OUTPUT_DTYPES:
            raise ModelError(f"the ONNX output must be floating point, not {graph_out.type}")
        self._input_name, self._output_name = graph_in.name, graph_out.name
        self._output_dtype = _OUTPUT_DTYPES[graph_out.type]
        batch_dim = graph_in.shape[0]
        self.fixed_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None

        described = fields_from_metadata_map(self.session.get_modelmeta().custom_metadata_map)
        shape = _resolve_input_shape(input_shape or described.get("input_shape"), graph_in.shape)
        norm = Normalization.parse(normalization)
        self._normalize = None if norm is None else _build_normalize(norm, shape[0], self.device)
        self._num_classes: int | None = None  # known once resolved: lets CUDA preallocate outputs
        self._num_classes = self._resolve_num_classes(
            num_classes or described.get("num_classes"), graph_out.shape, shape
        )
        self.info = ModelInfo(
            format="onnx",
            input_shape=shape,
            num_classes=self._num_classes,
            arch=None,
            class_names=class_names if class_names is not None else described.get("class_names"),
            normalization=norm if norm is not None else described.get("normalization"),
            sigma=sigma if sigma is not None else described.get("sigma"),
            name=name or described.get("name"),
            extra=described.get("extra", {}),
        )
        # Run in chunks of a fixed batch, the graph's memory does not grow with the batch.
        self._work_bytes = 2 * 4 * int(np.prod(shape))  # the float32 input and its normalized copy
        if self.fixed_batch is None:
            self._work_bytes += graph_bytes_per_sample(graph, self._input_name, shape)

    def _resolve_num_classes(
        self, wanted: int | None, out_shape: list, input_shape: tuple[int, int, int]
    ) -> int:
        if wanted is not None:
            return check_num_classes(wanted)
        if len(out_shape) == 2 and isinstance(out_shape[1], int) and out_shape[1] > 0:
            return out_shape[1]
        probe = self.logits(torch.zeros((1, *input_shape), device=self.device))
        if probe.dim() != 2:
            raise ModelError(
                f"the ONNX output must be scores (B, K), got shape {tuple(probe.shape)}"
            )
        return probe.shape[1]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Scores (B, K) for a float32 batch (B, C, H, W) on :attr:`device`."""
        x = x.to(dtype=torch.float32)
        if self._normalize is not None:
            x = self._normalize(x)
        if self.fixed_batch is None:
            return self._run(x.contiguous())
        chunks = []
        for start in range(0, x.shape[0], self.fixed_batch):
            chunk = x[start : start + self.fixed_batch]
            rows = chunk.shape[0]
            if rows < self.fixed_batch:
                pad = chunk.new_zeros((self.fixed_batch - rows, *chunk.shape[1:]))
                chunk = torch.cat([chunk, pad])
            chunks.append(self._run(chunk.contiguous())[:rows])
        return torch.cat(chunks)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Top-1 labels (B,) int64 on :attr:`device`."""
        return self.logits(x).argmax(dim=1)

    def work_bytes_per_sample(self) -> int:
        """From the graph's inferred shapes (:func:`graph_bytes_per_sample`), read at load time."""
        return self._work_bytes

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return self._run_cuda(x)
        # x.numpy() shares memory with the tensor: no copy on the way in or out.
        (out,) = self.session.run([self._output_name], {self._input_name: x.detach().cpu().numpy()})
        return torch.from_numpy(out)

    def _run_cuda(self, x: torch.Tensor) -> torch.Tensor:
        """Run on tensors already on the GPU through IO binding (no host round trip)."""
        x = x.to(self.device)
        index = self.device.index or 0
        binding = self.session.io_binding()
        binding.bind_input(
            self._input_name, "cuda", index, np.float32, tuple(x.shape), x.data_ptr()
        )
        out = None
        if self._num_classes is not None:
            out = torch.empty(
                (x.shape[0], self._num_classes), dtype=self._output_dtype, device=self.device
            )
            binding.bind_output(
                self._output_name,
                "cuda",
                index,
                _NUMPY_DTYPES[out.dtype],
                tuple(out.shape),
                out.data_ptr(),
            )
        else:  # probing for the class count: let onnxruntime allocate
            binding.bind_output(self._output_name, "cuda", index)
        # onnxruntime computes on its own CUDA stream: torch's writes to x must be finished.
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        if out is None:
            out = torch.from_numpy(binding.copy_outputs_to_cpu()[0]).to(self.device)
        return out


class OnnxDenoiser:
    """A denoiser exported to ONNX (:func:`smoothcert.models.runtimes.select_denoiser_runtime`), run by
    onnxruntime on the CPU or through IO binding on CUDA, with the outputs clamped to [0, 1] as
    :class:`~smoothcert.models.denoisers.TorchDenoiser` clamps them. ``info`` is the torch
    denoiser's: the network is the same, only the runtime differs."""

    runtime = "onnxruntime"
    graph_sha256: str | None = None  # the export's sha256 (smoothcert.models.runtimes sets it)

    def __init__(
        self, path: str | Path, info, *, device: str | torch.device = "cpu", work_bytes: int = 0
    ):
        check_onnx_contents(path)
        self.session = _open_session(Path(path), device, None)
        self.provider = self.session.get_providers()[0]
        on_cuda = self.provider == CUDA_PROVIDER
        self.device = torch.device("cuda", _cuda_index(device)) if on_cuda else torch.device("cpu")
        self.precision = "float32"
        self.info = info
        self._input_name = self.session.get_inputs()[0].name
        self._output_name = self.session.get_outputs()[0].name
        self._work_bytes = work_bytes

    def denoise(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] for a float32 batch of the same shape."""
        x = x.to(dtype=torch.float32).contiguous()
        if self.device.type == "cuda":
            x = x.to(self.device)
            out = torch.empty_like(x)
            binding = self.session.io_binding()
            index = self.device.index or 0
            binding.bind_input(
                self._input_name, "cuda", index, np.float32, tuple(x.shape), x.data_ptr()
            )
            binding.bind_output(
                self._output_name, "cuda", index, np.float32, tuple(out.shape), out.data_ptr()
            )
            torch.cuda.current_stream(self.device).synchronize()
            self.session.run_with_iobinding(binding)
            binding.synchronize_outputs()
        else:
            (array,) = self.session.run(
                [self._output_name], {self._input_name: x.detach().cpu().numpy()}
            )
            out = torch.from_numpy(array)
        return out.clamp_(0.0, 1.0)

    def work_bytes_per_sample(self) -> int:
        """The torch denoiser's figure (the same layers' outputs)."""
        return self._work_bytes


def _cuda_index(device: str | torch.device) -> int:
    if str(device) == "auto":
        return 0
    return torch.device(device).index or 0


def _open_session(
    path: Path, device: str | torch.device, intra_op_num_threads: int | None
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # Idle onnxruntime threads spin for a while after each run; on a CPU they would then fight
    # torch's noise generation for the same cores between two forward passes.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if intra_op_num_threads is None:
        intra_op_num_threads = process_tuning.threads()
    if intra_op_num_threads is not None:
        options.intra_op_num_threads = intra_op_num_threads
    providers: list = [CPU_PROVIDER]
    if _wants_cuda(device) and CUDA_PROVIDER in ort.get_available_providers():
        providers.insert(0, (CUDA_PROVIDER, {"device_id": _cuda_index(device)}))
    # onnxruntime resolves external data files against the model's directory (or, for a model
    # given as bytes, the working directory). Loading through a link in an empty private
    # directory means a model cannot pull in any file stored beside it.
    with tempfile.TemporaryDirectory(prefix="smoothcert-onnx-") as private_dir:
        private = Path(private_dir) / "model.onnx"
        try:
            os.link(path, private)
        except OSError:  # another filesystem, or links not allowed
            shutil.copyfile(path, private)
        try:
            return ort.InferenceSession(str(private), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own unexported exception types
            text = str(exc).strip()
    if "External data" in text or "external data" in text:
        raise ModelError(
            f"{path.name} keeps weights in external data files; smoothcert accepts "
            "self-contained .onnx files only"
        )
    first_line = text.splitlines()[0] if text else "unknown onnxruntime error"
    raise ModelError(f"{path.name} is not a loadable ONNX model: {first_line}")


def parse_onnx(path: str | Path) -> onnx.ModelProto:
    """The ONNX file's protobuf, its external data not read; ModelError (one line) when it does not parse."""
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError, and onnx's own checks
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"{Path(path).name} is not a loadable ONNX model: {first_line}") from None


def check_onnx_contents(path: str | Path) -> onnx.ModelProto:
    """Refuse a model that keeps tensors in external files or uses non-standard operators.

    Checked on the parsed protobuf (external data is never read), before onnxruntime sees the
    file: its own refusals depend on its version and build, and it would gladly run
    ``com.microsoft`` ops. Subgraphs (If, Loop, Scan) and the model's local functions count too.
    Raises ModelError with a one-line message; returns the parsed model.
    """
    path = Path(path)
    model = parse_onnx(path)
    local = {(f.domain, f.name) for f in model.functions}
    local_domains = {domain for domain, _ in local}
    graphs = [model.graph, *_subgraphs(model.graph.node)]
    for function in model.functions:
        graphs += _subgraphs(function.node)
    nodes = [node for graph in graphs for node in graph.node] + [
        n for f in model.functions for n in f.node
    ]
    for node in nodes:
        if node.domain not in STANDARD_DOMAINS and (node.domain, node.op_type) not in local:
            raise ModelError(
                f"{path.name} uses the operator {_short(node.domain + ':' + node.op_type)}, "
                f"which is not standard ONNX; {_STANDARD_ONLY}"
            )
    # An import no node uses is refused too: it asks onnxruntime for an operator set all the same.
    for opset in [*model.opset_import, *(o for f in model.functions for o in f.opset_import)]:
        if opset.domain not in STANDARD_DOMAINS and opset.domain not in local_domains:
            raise ModelError(
                f"{path.name} imports the operator set {_short(opset.domain)}, which is not "
                f"standard ONNX; {_STANDARD_ONLY}"
            )
    for tensor in _tensors(graphs, nodes):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            raise ModelError(
                f"{path.name} keeps weights in external data files (tensor {_short(tensor.name)} "
                f"in {_short(location)}); smoothcert accepts self-contained .onnx files only"
            )
    return model


_BATCH_DIM = "smoothcert_batch"
_DEFAULT_ELEMENT_BYTES = 8  # a value of a type not listed below is counted as 8 bytes an element
_ELEMENT_BYTES: dict[int, int] = {  # by TensorProto.DataType
    onnx.TensorProto.FLOAT: 4,
    onnx.TensorProto.FLOAT16: 2,
    onnx.TensorProto.BFLOAT16: 2,
    onnx.TensorProto.INT8: 1,
    onnx.TensorProto.UINT8: 1,
    onnx.TensorProto.BOOL: 1,
    onnx.TensorProto.INT16: 2,
    onnx.TensorProto.INT32: 4,
}


def graph_bytes_per_sample(
    model: onnx.ModelProto, input_name: str, input_shape: tuple[int, int, int]
) -> int:
    """Bytes per input of the values the main graph computes (node outputs), from ONNX shape
    inference with the batch dimension symbolic and (C, H, W) = ``input_shape``: the peak of those
    alive at once, running the nodes in the file's order (a value lives from the node that makes
    it to the last one that reads it), times :data:`~smoothcert.models.base.PEAK_MARGIN`, and at
    most the sum of all of them.

    A value whose shape holds the batch dimension counts the product of its other dimensions; one
    without it does not grow with the batch and counts nothing. A value whose shape inference
    cannot tell counts as much as the largest one it can (at least the input). ``model`` is changed
    in place.
    """
    for graph_input in model.graph.input:
        if graph_input.name == input_name:
            dims = graph_input.type.tensor_type.shape.dim
            dims[0].dim_param = _BATCH_DIM
            for dim, extent in zip(list(dims)[1:], input_shape):
                dim.dim_value = extent
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # onnx raises its own types; then nothing is known but the input
        inferred = model.graph
    inferred_bytes = (
        (info.name, _per_sample_bytes(info.type.tensor_type))
        for info in [*inferred.value_info, *inferred.output]
        if info.type.HasField("tensor_type")
    )
    known = {name: nbytes for name, nbytes in inferred_bytes if nbytes is not None}
    largest = max([4 * int(np.prod(input_shape)), *known.values()])
    nodes = list(model.graph.node)
    size = {name: known.get(name, largest) for node in nodes for name in node.output if name}
    last_use = {name: len(nodes) for name in (out.name for out in model.graph.output)}
    for i, node in enumerate(nodes):
        for name in node.input:
            if name in size:
                last_use[name] = max(last_use.get(name, i), i)
    live = peak = 0
    for i, node in enumerate(nodes):
        live += sum(size[name] for name in node.output if name)
        peak = max(peak, live)
        live -= sum(size[name] for name in node.output if name and last_use.get(name, i) <= i)
        live -= sum(
            size[name] for name in set(node.input) if name in size and last_use.get(name) == i
        )
    return min(sum(size.values()), PEAK_MARGIN * peak)


def _per_sample_bytes(tensor_type: onnx.TypeProto.Tensor) -> int | None:
    """Bytes per input of a value of this type; 0 when it has no batch dimension, None when unknown."""
    if not tensor_type.HasField("shape"):
        return None
    elements, batched = 1, False
    for dim in tensor_type.shape.dim:
        if dim.dim_param == _BATCH_DIM:
            batched = True
        elif dim.HasField("dim_value") and dim.dim_value >= 0:
            elements *= dim.dim_value
        else:
            return None
    return (
        elements * _ELEMENT_BYTES.get(tensor_type.elem_type, _DEFAULT_ELEMENT_BYTES)
        if batched
        else 0
    )


_STANDARD_ONLY = (
    "smoothcert runs the standard operator sets only (domains '', ai.onnx, ai.onnx.ml), "
    "no custom or onnxruntime-specific ops"
)


def _short(text: str) -> str:
    """``repr`` of a name read from the file, cut so that a hostile one cannot flood the message."""
    return repr(text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "...")


def _subgraphs(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.GraphProto]:
    """Every graph held in the nodes' attributes (If, Loop, Scan bodies), at any depth."""
    for node in nodes:
        for attr in node.attribute:
            for graph in [*([attr.g] if attr.HasField("g") else []), *attr.graphs]:
                yield graph
                yield from _subgraphs(graph.node)


def _tensors(
    graphs: list[onnx.GraphProto], nodes: list[onnx.NodeProto]
) -> Iterator[onnx.TensorProto]:
    """Initializers (dense and sparse) of ``graphs`` and tensor-valued attributes of ``nodes``."""
    for graph in graphs:
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
    for node in nodes:
        for attr in node.attribute:
            yield from [*([attr.t] if attr.HasField("t") else []), *attr.tensors]
            for sparse in [
                *([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []),
                *attr.sparse_tensors,
            ]:
                yield from (sparse.values, sparse.indices)


def _resolve_input_shape(wanted, graph_shape: list) -> tuple[int, int, int]:
    """(C, H, W) from the caller or metadata, checked against the graph's fixed dimensions."""
    graph_chw = graph_shape[1:]
    if wanted is None:
        if not all(isinstance(d, int) and d > 0 for d in graph_chw):
            raise ModelError(
                f"the ONNX input shape {graph_shape} has symbolic image dimensions; "
                "pass input_shape [C, H, W]"
            )
        return check_input_shape(tuple(graph_chw))
    shape = check_input_shape(tuple(wanted))
    for given, fixed in zip(shape, graph_chw):
        if isinstance(fixed, int) and fixed > 0 and fixed != given:
            raise ModelError(
                f"input_shape {list(shape)} disagrees with the ONNX input {graph_shape}"
            )
    return shape


def _build_normalize(norm: Normalization, channels: int, device: torch.device) -> Normalize:
    try:
        return Normalize(norm, channels).to(device)
    except ValueError as exc:
        raise ModelError(str(exc)) from None
