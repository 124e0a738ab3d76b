"""One entry point from a model file to a base classifier: :func:`load_model`.

The format is told by the file's first bytes (pickles are refused whatever the name says), then
by its suffix. Every model is run on a zero batch and two fixed noisy ones before it is handed
out (:func:`check_forward`), so a wrong input shape or class count, or scores that are NaN or
infinite, are refused at load time with a message, not at certification time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from smoothcert.models.architectures import (
    DEFAULT_INPUT_SHAPE,
    DEFAULT_NUM_CLASSES,
    DENOISER_ARCHITECTURES,
    HEAD_WEIGHT_KEY,
    build_network,
    check_arch,
)
from smoothcert.models.base import BaseClassifier, Normalize, TorchClassifier
from smoothcert.models.metadata import (
    PIPELINE,
    ModelError,
    ModelInfo,
    Normalization,
    check_fields,
    fields_from_metadata_map,
    sha256_file,
)
from smoothcert.models.onnx_runtime import OnnxClassifier
from smoothcert.models.safetensors_header import read_safetensors_header, refuse_pickled_checkpoint
from smoothcert.models.safetensors_io import load_safetensors_state

ONNX_FIRST_BYTE = b"\x08"  # protobuf tag of ModelProto.ir_version, the field exporters write first
_SHOWN_KEYS = 3


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU; anything else must name a torch device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None


def detect_format(path: str | Path) -> str:
    """``"onnx"`` or ``"safetensors"`` for an existing file; pickles are refused first.

    The suffix decides for ``.onnx`` and ``.safetensors``; any other name is recognized by its
    contents (a valid safetensors header, else an ONNX protobuf's first byte).
    """
    path = Path(path)
    refuse_pickled_checkpoint(path)
    suffix = path.suffix.lower()
    if suffix in (".onnx", ".safetensors"):
        return suffix[1:]
    try:
        read_safetensors_header(path)
        return "safetensors"
    except ModelError:
        pass
    with open(path, "rb") as f:
        if f.read(1) == ONNX_FIRST_BYTE:
            return "onnx"
    raise ModelError(f"{path.name} is neither ONNX nor safetensors")


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "auto",
    arch: str | None = None,
    input_shape: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
    normalization: Normalization | dict | str | None = None,
    class_names: list[str] | None = None,
    sigma: float | None = None,
    name: str | None = None,
) -> BaseClassifier:
    """Load an ONNX or safetensors model as a validated base classifier on ``device``.

    Explicit arguments override what the file says about itself (``arch`` concerns safetensors
    only; an ONNX graph is its own architecture). A safetensors file is either
    self-describing (written by :func:`~smoothcert.models.safetensors_io.save_safetensors_model`)
    or bare weights of an allow-listed ``arch`` (input shape and class count then default to the
    architecture's, the class count read from the ``fc`` weight). The returned classifier's
    ``info`` has ``sha256`` and ``format`` filled. Raises ModelError, with a one-line message, for
    a missing file, a pickle, an unknown format or architecture, a safetensors header that lies,
    an ONNX model with external data or non-standard operators, weights that do not fit the
    architecture, or a model that fails :func:`check_forward`.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"no such file: {path}")
    fmt = detect_format(path)
    target = resolve_device(device)
    given = check_fields(
        {
            k: v
            for k, v in dict(
                input_shape=input_shape,
                num_classes=num_classes,
                normalization=normalization,
                class_names=class_names,
                sigma=sigma,
                name=name,
            ).items()
            if v is not None
        }
    )
    sha256 = sha256_file(path)
    if fmt == "onnx":
        model: BaseClassifier = OnnxClassifier(path, device=target, **given)
    else:
        model = _load_safetensors(path, target, {**given, "arch": arch} if arch else given)
    model.info.sha256 = sha256
    model.info.format = fmt
    check_forward(model)
    if model.info.class_names is not None and len(model.info.class_names) != model.info.num_classes:
        raise ModelError(
            f"{len(model.info.class_names)} class_names given for {model.info.num_classes} classes"
        )
    return model


def _load_safetensors(path: Path, device: torch.device, given: dict[str, Any]) -> TorchClassifier:
    tensors, metadata = read_safetensors_header(path)
    fields = {**fields_from_metadata_map(metadata), **given}
    arch = fields.get("arch")
    if arch is None:
        raise ModelError(
            f"{path.name} holds bare weights; name their architecture with arch "
            f"(one of {', '.join(sorted(DEFAULT_INPUT_SHAPE))})"
        )
    if arch in DENOISER_ARCHITECTURES:
        raise ModelError(
            f"{path.name} is a denoiser ({arch}), not a classifier: certify it in front of one "
            "(smoothcert certify CLASSIFIER --denoiser FILE, or a pipeline model in the API)"
        )
    check_arch(arch)
    shape = fields.get("input_shape", DEFAULT_INPUT_SHAPE[arch])
    num_classes = fields.get("num_classes", _head_classes(tensors, arch))
    norm = fields.get("normalization")

    state, _ = load_safetensors_state(path)
    # Built on the meta device: no random initialization, the file's tensors are assigned.
    with torch.device("meta"):
        net = build_network(arch, num_classes)
    check_state_dict(net, state, arch)
    floating = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    net.load_state_dict(floating, strict=True, assign=True)
    try:
        module = torch.nn.Sequential(Normalize(norm, shape[0]), net)
    except ValueError as exc:
        raise ModelError(str(exc)) from None
    info = ModelInfo(
        format="safetensors",
        input_shape=shape,
        num_classes=num_classes,
        arch=arch,
        class_names=fields.get("class_names"),
        normalization=norm,
        sigma=fields.get("sigma"),
        name=fields.get("name"),
        extra=fields.get("extra", {}),
    )
    return TorchClassifier(module, info, device)


def _head_classes(tensors: dict[str, dict], arch: str) -> int:
    """Class count of bare weights: rows of the ``fc`` weight, else the architecture default."""
    head = tensors.get(HEAD_WEIGHT_KEY)
    if head is not None and len(head["shape"]) == 2 and head["shape"][0] > 0:
        return head["shape"][0]
    return DEFAULT_NUM_CLASSES[arch]


def _first(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (f" and {len(keys) - _SHOWN_KEYS} more" if len(keys) > _SHOWN_KEYS else "")


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str:
    """Name a prefix such as ``module.`` (DataParallel) or ``1.`` (a Sequential wrapper) that,
    stripped from every unexpected key, would produce exactly the missing ones."""
    prefixes = {k.split(".", 1)[0] for k in unexpected if "." in k}
    if missing and len(prefixes) == 1:
        prefix = prefixes.pop() + "."
        if {k[len(prefix) :] for k in unexpected if k.startswith(prefix)} >= set(missing):
            return f" (the file's keys carry the prefix {prefix!r}: strip it)"
    return ""


def check_state_dict(net: torch.nn.Module, state: dict[str, torch.Tensor], arch: str) -> None:
    """Raise a one-line ModelError unless ``state`` has exactly ``net``'s keys and shapes."""
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys ({_first(missing)})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys ({_first(unexpected)})")
        hint = _prefix_hint(missing, unexpected)
        raise ModelError(f"weights do not fit {arch}: {'; '.join(parts)}{hint}")
    wrong = [
        f"{k} {tuple(state[k].shape)} != {shape}"
        for k, shape in expected.items()
        if tuple(state[k].shape) != shape
    ]
    if wrong:
        raise ModelError(
            f"weights do not fit {arch}: {len(wrong)} shape mismatches ({_first(wrong)})"
        )


CHECK_SEED = 0  # the noisy batches of check_forward: the same for every model and every load
CHECK_BATCH = 4
CHECK_SIGMA = 0.25  # a common smoothing noise level; larger noise is the certification's own check


def check_batches(input_shape: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """What :func:`check_forward` runs, on the CPU: zeros (2 inputs), uniform [0, 1] images, and
    the same images plus Gaussian noise of σ = CHECK_SIGMA (CHECK_BATCH each, seed CHECK_SEED)."""
    generator = torch.Generator().manual_seed(CHECK_SEED)
    uniform = torch.rand((CHECK_BATCH, *input_shape), generator=generator)
    noisy = uniform + CHECK_SIGMA * torch.randn(uniform.shape, generator=generator)
    return {
        "zeros": torch.zeros((2, *input_shape)),
        "uniform [0, 1] images": uniform,
        f"images with Gaussian noise of sigma {CHECK_SIGMA}": noisy,
    }


def check_forward(model: BaseClassifier) -> None:
    """Run :func:`check_batches`; raise ModelError unless each gives finite scores (B, num_classes).

    A model whose scores are NaN or infinite would have every noisy copy voted for class 0 (argmax
    of NaN), so its certificates would say nothing about it.
    """
    shape, classes = model.info.input_shape, model.info.num_classes
    for what, batch in check_batches(shape).items():
        try:
            scores = model.logits(batch.to(model.device))
        except Exception as exc:  # torch and onnxruntime both raise their own types
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelError(
                f"the model cannot run on input shape {list(shape)}: {first_line}"
            ) from None
        if tuple(scores.shape) != (len(batch), classes):
            raise ModelError(
                f"num_classes is {classes} but the model outputs scores of shape "
                f"{tuple(scores.shape[1:])} per input"
            )
        bad = int((~torch.isfinite(scores).all(dim=1)).sum())
        if bad:
            raise ModelError(
                f"the model returns NaN or infinite scores for {bad} of {len(batch)} {what}; "
                "a certificate needs finite scores"
            )


STORED_FIELDS = (
    "arch",
    "input_shape",
    "num_classes",
    "normalization",
    "class_names",
    "sigma",
    "name",
)


def load_stored_model(
    store, meta: dict[str, Any], device: str | torch.device = "auto"
) -> BaseClassifier:
    """Load a model of a :class:`~smoothcert.service.core.model_store.ModelStore` with the fields recorded at upload.

    A pipeline record loads both its parts (:mod:`smoothcert.models.pipeline`); a denoiser's
    weights load as a :class:`~smoothcert.models.denoisers.TorchDenoiser`, which only a pipeline runs.
    """
    from smoothcert.models import denoisers, pipeline  # they build on this module

    if meta.get("kind") == PIPELINE:
        return pipeline.load_stored_pipeline(store, meta, device)
    path = store.weights_path(meta["id"])
    if denoisers.is_denoiser_file(path, meta.get("arch")):
        fields = {k: meta.get(k) for k in STORED_FIELDS}
        return denoisers.load_denoiser(path, device=device, **fields)  # Any: not a classifier
    return load_model(path, device=device, **{k: meta.get(k) for k in STORED_FIELDS})
