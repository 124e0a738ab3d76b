"""A training run's state after a finished epoch, as one safetensors file, so a killed run resumes.

Tensors (model weights and buffers, optimizer moments, the random generator's state) are the
file's tensors; everything else (the epoch, the run's identity, the optimizer's hyper-parameters
and step counts that are not tensors, the metrics so far) is JSON in the header's
``__metadata__``. Never a pickle. The file is written beside its final name and renamed over it,
so a kill mid-write leaves the previous epoch's checkpoint intact.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from smoothcert.models.metadata import ModelError
from smoothcert.models.safetensors_header import read_safetensors_header
from smoothcert.service.core.train_config import TrainingError

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT = "smoothcert-training-checkpoint/1"
_META_KEY = "smoothcert_training"


class CheckpointError(ValueError):
    """A checkpoint cannot be read or belongs to another run; the message says why, in one line."""


@dataclass
class TrainingState:
    """Everything needed to continue after ``epoch`` finished epochs and end bit-identically."""

    epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # torch's Optimizer.state_dict() layout
    generator: torch.Tensor  # torch.Generator.get_state(), uint8
    identity: dict[str, Any]  # the run's configuration and data digest
    history: list[dict[str, Any]] = field(default_factory=list)


def checkpoint_path(directory: str | Path) -> Path:
    return Path(directory) / CHECKPOINT_FILE


def save_state(directory: str | Path, state: TrainingState) -> Path:
    """Write ``state`` to ``directory/checkpoint.safetensors`` atomically; return the path."""
    tensors = {f"model/{k}": v for k, v in state.model.items()}
    tensors["generator"] = state.generator
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state.optimizer["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    doc = {
        "format": FORMAT,
        "epoch": state.epoch,
        "identity": state.identity,
        "history": state.history,
        "optimizer": {"param_groups": state.optimizer["param_groups"], "scalars": scalars},
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory)
    partial = directory / f".{CHECKPOINT_FILE}.{os.getpid()}.part"
    save_file(tensors, str(partial), metadata={_META_KEY: json.dumps(doc)})
    os.replace(partial, final)
    return final


def load_state(directory: str | Path) -> TrainingState | None:
    """The state saved in ``directory``, or None when there is no checkpoint yet."""
    path = checkpoint_path(directory)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            doc = json.loads((f.metadata() or {})[_META_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # the library's errors carry no stable type
        raise CheckpointError(
            f"{path}: not a readable training checkpoint ({exc}); delete it to start over"
        ) from None
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {doc.get('format')!r}")
    optimizer_state: dict[int, dict[str, Any]] = {}
    for index, values in doc["optimizer"]["scalars"].items():
        optimizer_state.setdefault(int(index), {}).update(values)
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/", 2)
            optimizer_state.setdefault(int(index), {})[name] = value
    return TrainingState(
        epoch=int(doc["epoch"]),
        model={k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")},
        optimizer={"state": optimizer_state, "param_groups": doc["optimizer"]["param_groups"]},
        generator=tensors["generator"],
        identity=doc["identity"],
        history=doc["history"],
    )


def saved_identity(directory: str | Path) -> dict[str, Any] | None:
    """The identity recorded in ``directory``'s checkpoint (read from its header only), or None
    when there is none or it cannot be read."""
    path = checkpoint_path(directory)
    if not path.is_file():
        return None
    try:
        _, metadata = read_safetensors_header(path)
        return json.loads((metadata or {})[_META_KEY])["identity"]
    except (ModelError, KeyError, TypeError, ValueError):
        return None


def check_identity(state: TrainingState, identity: dict[str, Any], directory: str | Path) -> None:
    """Raise CheckpointError unless the checkpoint was written by a run with this identity."""
    wrong = [
        k
        for k in sorted(set(identity) | set(state.identity))
        if identity.get(k) != state.identity.get(k)
    ]
    if wrong:
        key = wrong[0]
        raise CheckpointError(
            f"the checkpoint in {directory} belongs to another run ({key}: {state.identity.get(key)!r} there, "
            f"{identity.get(key)!r} now); use another checkpoint folder or delete it to start over"
        )


def resume(
    directory: str | Path,
    identity: dict[str, Any],
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> list[dict[str, Any]]:
    """Restore a run's ``network``, ``optimizer`` and ``generator`` from the checkpoint in
    ``directory`` when there is one, after checking it is a checkpoint of the run ``identity``
    names; the finished epochs' history (empty for a fresh start). TrainingError, one line, for a
    checkpoint of another run or one that cannot be read."""
    try:
        state = load_state(directory)
        if state is None:
            return []
        check_identity(state, identity, directory)
    except CheckpointError as exc:
        raise TrainingError(str(exc)) from None
    network.load_state_dict(state.model)
    optimizer.load_state_dict(state.optimizer)
    generator.set_state(state.generator)
    return list(state.history)
