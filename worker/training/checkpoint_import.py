"""Importing a published PyTorch checkpoint (Cohen et al.'s or Salman et al.'s layout) as safetensors.

Those releases save ``{"epoch", "arch", "state_dict", "optimizer"}`` with ``torch.save``, where
``state_dict`` is that of ``Sequential(normalization layer, network)``: the network's keys start
with ``1.`` (``1.module.`` for the ImageNet ResNet-50, which sat in a DataParallel), and the
normalization layer keeps its constants outside the state dict, so the right first layer has to
be named on import:

================================================  ==========================================
family                                            ``--normalization``
================================================  ==========================================
Cohen et al. 2019 (locuslab/smoothing), CIFAR-10  ``cifar10`` (mean and std)
Cohen et al. 2019, ImageNet ResNet-50             ``imagenet`` (mean and std)
Salman et al. 2019 SmoothAdv release, CIFAR-10    ``cifar10-center`` (mean only, no std)
  (``PGD_*``, ``DDN_*``, ``*_multiNoiseSamples``)
Salman et al. 2019 SmoothAdv release, ImageNet    ``imagenet-center`` (mean only)
Salman et al., later CIFAR-10 models fine-tuned   ``cifar10`` (mean and std)
  from ImageNet32 (``finetune_cifar_from_*``)
================================================  ==========================================

(Salman's code at release wrapped its networks in ``InputCenterLayer``, which subtracts the mean
and does not divide; the repository later switched back to Cohen's ``NormalizeLayer`` for the
models it added. A wrong choice does not fail: it silently costs accuracy.)

The file is a pickle, so it is opened only with ``torch.load(weights_only=True)``, whose
restricted unpickler admits tensors and plain containers and refuses any other object without
building it. Local files only: the HTTP API takes safetensors and ONNX, never pickles.
"""

from __future__ import annotations

import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from smoothcert.models.architectures import (
    DEFAULT_INPUT_SHAPE,
    HEAD_WEIGHT_KEY,
    build_network,
    check_arch,
)
from smoothcert.models.loaders import check_state_dict, load_model
from smoothcert.models.metadata import ModelError, ModelInfo, Normalization, sha256_file
from smoothcert.models.safetensors_io import save_safetensors_model

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NORMALIZATIONS: dict[str, Normalization | None] = {
    "cifar10": Normalization(CIFAR10_MEAN, CIFAR10_STD),
    "cifar10-center": Normalization(CIFAR10_MEAN, None),
    "imagenet": Normalization(IMAGENET_MEAN, IMAGENET_STD),
    "imagenet-center": Normalization(IMAGENET_MEAN, None),
    "none": None,
}
# The ``arch`` strings of the published checkpoints, mapped to our allow-list.
PUBLISHED_ARCHS = {
    "resnet50": "imagenet_resnet50",
    "cifar_resnet20": "cifar_resnet20",
    "cifar_resnet110": "cifar_resnet110",
}
_NOISE_IN_PATH = re.compile(r"noise_(\d+(?:\.\d+)?)")


@dataclass
class ImportedModel:
    """What :func:`import_checkpoint` wrote and how it read the checkpoint."""

    path: Path
    info: ModelInfo
    checkpoint_arch: str | None
    epoch: int | None
    ignored_keys: list[str] = field(default_factory=list)


def parse_normalization(text: str) -> Normalization | None:
    """A preset name (``cifar10``, ``cifar10-center``, ``imagenet``, ``imagenet-center``, ``none``)
    or JSON ``{"mean": [...], "std": [...] or null}``; ModelError otherwise."""
    if text in NORMALIZATIONS:
        return NORMALIZATIONS[text]
    if not text.lstrip().startswith("{"):
        raise ModelError(
            f"unknown normalization {text!r}; use one of {', '.join(NORMALIZATIONS)} or JSON "
            '{"mean": [...], "std": [...]}'
        )
    return Normalization.parse(text)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The dict in a local ``torch.save`` file, unpickled with ``weights_only=True`` only.

    A dict holding ``state_dict`` is returned as is; a bare state dict (names to tensors) is
    returned as ``{"state_dict": it}``. ModelError for a file that is missing, not a PyTorch
    checkpoint, or holds anything the restricted unpickler refuses (the object is never built).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"no such file: {path}")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it may not parse
            warnings.simplefilter("ignore", UserWarning)
            doc = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"{path.name}: refused: it holds Python objects other than tensors and plain "
            f"containers, which torch.load(weights_only=True) does not build ({_culprit(exc)})"
        ) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, zipfile and pickle errors here
        raise ModelError(
            f"{path.name}: not a readable PyTorch checkpoint ({_first_line(exc)})"
        ) from None
    if isinstance(doc, dict) and isinstance(doc.get("state_dict"), dict):
        return doc
    if isinstance(doc, dict) and doc and all(isinstance(v, torch.Tensor) for v in doc.values()):
        return {"state_dict": doc}
    raise ModelError(
        f"{path.name}: expected a dict with 'arch' and 'state_dict' (Cohen et al.'s and Salman "
        f"et al.'s layout) or a state dict, found {type(doc).__name__}"
    )


def network_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The network's own keys: ``module.`` (DataParallel) and the ``1.`` of the Sequential
    wrapper stripped. Returns them and the keys left out (the wrapper's first layer, ``0.*``)."""

    def strip(key: str) -> str:
        return key[len("module.") :] if key.startswith("module.") else key

    state = {strip(k): v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if not any(k.startswith("1.") for k in state):
        return state, []
    ignored = sorted(k for k in state if not k.startswith("1."))
    return {strip(k[2:]): v for k, v in state.items() if k.startswith("1.")}, ignored


def import_checkpoint(
    path: str | Path,
    out: str | Path,
    *,
    normalization: Normalization | None,
    arch: str | None = None,
    sigma: float | None = None,
    name: str | None = None,
    input_shape: tuple[int, int, int] | None = None,
) -> ImportedModel:
    """Convert a local checkpoint to a self-describing safetensors file at ``out``.

    ``arch`` defaults to the checkpoint's own (``resnet50`` is ``imagenet_resnet50``); a
    mismatch is refused. ``sigma`` (the training noise) defaults to the ``noise_S`` part of the
    published paths when there is one. The class count comes from the ``fc`` weights. The file
    written is loaded back and run once before this returns. ModelError on any failure.
    """
    path, out = Path(path), Path(out)
    doc = read_checkpoint(path)
    source_arch = doc.get("arch") if isinstance(doc.get("arch"), str) else None
    arch = _choose_arch(arch, source_arch, path)
    state, ignored = network_state(doc["state_dict"])
    head = state.get(HEAD_WEIGHT_KEY)
    if head is None or head.ndim != 2:
        raise ModelError(
            f"{path.name}: no {HEAD_WEIGHT_KEY} weights after stripping the wrapper "
            f"(first keys: {', '.join(list(state)[:3])})"
        )
    with torch.device("meta"):
        net = build_network(arch, int(head.shape[0]))
    check_state_dict(net, state, arch)
    net.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in state.items()},
        strict=True,
        assign=True,
    )
    if sigma is None:
        found = _NOISE_IN_PATH.search(str(path))
        sigma = float(found.group(1)) if found else None
    epoch = doc.get("epoch") if isinstance(doc.get("epoch"), int) else None
    info = ModelInfo(
        format="safetensors",
        input_shape=input_shape or DEFAULT_INPUT_SHAPE[arch],
        num_classes=int(head.shape[0]),
        arch=arch,
        normalization=normalization,
        sigma=sigma,
        name=name or path.name,
        extra={
            "imported_from": path.name,
            "source_sha256": sha256_file(path),
            "checkpoint_arch": source_arch,
            "checkpoint_epoch": epoch,
        },
    )
    save_safetensors_model(out, net, info)
    loaded = load_model(out, device="cpu")
    return ImportedModel(out, loaded.info, source_arch, epoch, ignored)


def _choose_arch(arch: str | None, source_arch: str | None, path: Path) -> str:
    mapped = PUBLISHED_ARCHS.get(source_arch, source_arch) if source_arch else None
    if arch is None:
        if mapped is None:
            raise ModelError(f"{path.name} does not name its architecture; give --arch")
        arch = mapped
    check_arch(arch)
    if mapped is not None and mapped != arch:
        raise ModelError(f"{path.name} holds a {source_arch!r} network, not {arch!r}")
    return arch


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _culprit(exc: BaseException) -> str:
    """The line of torch's long refusal that names the forbidden global, else its first line."""
    for line in str(exc).splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            return line.strip().removeprefix("WeightsUnpickler error:").strip()
    return _first_line(exc)
