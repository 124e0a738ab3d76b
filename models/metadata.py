"""What a model file says about itself: the metadata stored beside (or inside) every model.

Torch-free on purpose: the API process reads and validates metadata without a model runtime.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class ModelError(ValueError):
    """A model file or its metadata cannot be used; the message says why, in one line."""


@dataclass(frozen=True)
class Normalization:
    """Per-channel input normalization, applied inside the model after noise is added.

    ``std is None`` means mean-only centering (the layout some published checkpoints need).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...] | None = None

    @classmethod
    def parse(cls, value: Any) -> Normalization | None:
        """Build from ``{"mean": [...], "std": [...]}`` (a dict or its JSON text); None stays None."""
        if value is None or value == "" or value == "none":
            return None
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ModelError(f"normalization is not valid JSON: {exc.msg}") from None
        if not isinstance(value, dict) or "mean" not in value:
            raise ModelError('normalization must look like {"mean": [...], "std": [...]}')
        try:
            mean = tuple(float(v) for v in value["mean"])
            std = None if value.get("std") is None else tuple(float(v) for v in value["std"])
        except (TypeError, ValueError):
            raise ModelError("normalization mean and std must be lists of numbers") from None
        if std is not None and (len(std) != len(mean) or any(s <= 0 for s in std)):
            raise ModelError("normalization std must be positive and as long as mean")
        return cls(mean, std)


@dataclass
class ModelInfo:
    """Everything the engine, the store and the API need to know about one model."""

    format: str                                  # "onnx" | "safetensors"
    input_shape: tuple[int, int, int]            # (C, H, W)
    num_classes: int
    arch: str | None = None                      # allow-listed architecture (safetensors)
    class_names: list[str] | None = None
    normalization: Normalization | None = None
    sigma: float | None = None                   # training noise level, when known
    sha256: str = ""
    name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. training method and metrics

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
