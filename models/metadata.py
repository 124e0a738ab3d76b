"""What a model file says about itself: the metadata stored beside (or inside) every model.

Torch-free on purpose: the API process reads and validates metadata without a model runtime.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import unicodedata
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
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ModelError(f"normalization is not valid JSON: {exc.msg}") from None
        if not isinstance(value, dict) or "mean" not in value:
            raise ModelError('normalization must look like {"mean": [...], "std": [...]}')
        # Numbers only: float() would also take "0.5" and true, and NaN would poison every input.
        lists = [value["mean"]] + ([] if value.get("std") is None else [value["std"]])
        if not all(
            isinstance(values, (list, tuple)) and all(_is_finite_number(v) for v in values)
            for values in lists
        ):
            raise ModelError("normalization mean and std must be lists of finite numbers")
        mean = tuple(float(v) for v in value["mean"])
        std = None if value.get("std") is None else tuple(float(v) for v in value["std"])
        if std is not None and (len(std) != len(mean) or any(s <= 0 for s in std)):
            raise ModelError("normalization std must be positive and as long as mean")
        return cls(mean, std)


@dataclass
class ModelInfo:
    """Everything the engine, the store and the API need to know about one model."""

    format: str  # "onnx" | "safetensors"
    input_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    arch: str | None = None  # allow-listed architecture (safetensors)
    class_names: list[str] | None = None
    normalization: Normalization | None = None
    sigma: float | None = None  # training noise level, when known
    sha256: str = ""
    name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. training method and metrics
    parts: dict[str, dict[str, Any]] | None = None  # a pipeline's denoiser and classifier

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d


DENOISER, PIPELINE = "denoiser", "pipeline"  # a stored record's "kind"; absent: a classifier


@dataclass
class DenoiserInfo:
    """What is known about a denoiser: it maps [0,1] images of ``input_shape`` to [0,1] images of
    the same shape. ``sigma`` is the noise level it was trained for, when known; ``extra`` holds
    its size parameters (``depth``, ``width``) and training record."""

    format: str
    input_shape: tuple[int, int, int]
    arch: str | None = None
    sigma: float | None = None
    sha256: str = ""
    name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    kind: str = DENOISER

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d


def denoiser_info_json(info: DenoiserInfo) -> str:
    """The JSON text a denoiser file carries about itself (format and sha256 are left out)."""
    return json.dumps(
        {
            "kind": DENOISER,
            "arch": info.arch,
            "input_shape": list(info.input_shape),
            "sigma": info.sigma,
            "name": info.name,
            "extra": info.extra,
        },
        sort_keys=True,
    )


def pipeline_sha256(denoiser_sha256: str, classifier_sha256: str) -> str:
    """The sha256 of a pipeline: the hex sha256 of the ASCII text of its parts' hex digests,
    denoiser first then classifier (128 characters, no separator). A change to either file
    changes it, and swapping the parts' roles does too."""
    return hashlib.sha256((denoiser_sha256 + classifier_sha256).encode("ascii")).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


METADATA_KEY = "smoothcert"  # key of our JSON inside a safetensors header or ONNX metadata_props
# A class name labels a row or a plot, not a document; ImageNet's longest is under 100 characters.
MAX_CLASS_NAME_CHARS = 100
_DESCRIBED_FIELDS = (
    "arch",
    "input_shape",
    "num_classes",
    "class_names",
    "normalization",
    "sigma",
    "name",
    "extra",
)


def info_to_json(info: ModelInfo) -> str:
    """The JSON text a model file carries about itself (format and sha256 are left out)."""
    norm = info.normalization
    doc = {
        "arch": info.arch,
        "input_shape": list(info.input_shape),
        "num_classes": info.num_classes,
        "class_names": info.class_names,
        "normalization": None
        if norm is None
        else {"mean": list(norm.mean), "std": None if norm.std is None else list(norm.std)},
        "sigma": info.sigma,
        "name": info.name,
        "extra": info.extra,
    }
    return json.dumps(doc, sort_keys=True)


def parse_info_json(text: str) -> dict[str, Any]:
    """Validated fields from :func:`info_to_json` text, typed as ModelInfo wants them.

    Only the fields present (and not null) are returned; unknown keys are ignored. Raises
    ModelError, in one line, when the text is not JSON or a field has the wrong type.
    """
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, TypeError) as exc:
        raise ModelError(f"model metadata is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ModelError("model metadata must be a JSON object")
    return check_fields({k: doc[k] for k in _DESCRIBED_FIELDS if doc.get(k) is not None})


def check_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``fields`` (a subset of ModelInfo's described fields) validated and typed:
    input_shape a (C, H, W) tuple, normalization a :class:`Normalization`, sigma a float, and so
    on. Raises ModelError naming the first field that is wrong."""
    fields = dict(fields)
    if "input_shape" in fields:
        fields["input_shape"] = check_input_shape(fields["input_shape"])
    if "num_classes" in fields:
        fields["num_classes"] = check_num_classes(fields["num_classes"])
    if "normalization" in fields:
        fields["normalization"] = Normalization.parse(fields["normalization"])
    if "sigma" in fields:
        fields["sigma"] = check_sigma(fields["sigma"])
    if "class_names" in fields:
        fields["class_names"] = check_class_names(fields["class_names"], fields.get("num_classes"))
    for key in ("arch", "name"):
        if key in fields and not isinstance(fields[key], str):
            raise ModelError(f"{key} must be a string")
    if "extra" in fields and not isinstance(fields["extra"], dict):
        raise ModelError("extra must be a JSON object")
    return fields


def _is_finite_number(value: Any) -> bool:
    """A real number (numpy's too), not a bool or a string, neither NaN nor infinite."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: Any) -> bool:
    """A positive integer (numpy integers too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) > 0


def check_input_shape(value: Any) -> tuple[int, int, int]:
    """``value`` as a (C, H, W) tuple of positive ints, or ModelError."""
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_count(v) for v in value):
        return (int(value[0]), int(value[1]), int(value[2]))
    raise ModelError(f"input_shape must be three positive integers [C, H, W], not {value!r}")


def check_num_classes(value: Any) -> int:
    """``value`` as a positive int, or ModelError."""
    if _is_count(value):
        return int(value)
    raise ModelError(f"num_classes must be a positive integer, not {value!r}")


def check_sigma(value: Any) -> float:
    """The training noise level ``value`` as a float: a finite number ≥ 0, or ModelError."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not (math.isfinite(value) and float(value) >= 0)
    ):
        raise ModelError(
            f"sigma must be a non-negative number, and finite (the training noise level), "
            f"not {value!r}"
        )
    return float(value)


def check_class_names(value: Any, num_classes: int | None = None) -> list[str]:
    """``value`` as a list of class names, or ModelError: non-empty strings of at most
    :data:`MAX_CLASS_NAME_CHARS` characters, as many as ``num_classes`` when that is known (the
    loader compares them with the model's class count otherwise)."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(n, str) for n in value):
        raise ModelError("class_names must be a list of strings")
    if num_classes is not None and len(value) != num_classes:
        raise ModelError(
            f"{len(value)} class_names given for {num_classes} classes; give one name per class"
        )
    for i, name in enumerate(value):
        if not 0 < len(name) <= MAX_CLASS_NAME_CHARS:
            raise ModelError(
                f"class_names[{i}] has {len(name)} characters; each name must have 1 to "
                f"{MAX_CLASS_NAME_CHARS}"
            )
    return list(value)


# Names (of models, datasets, training jobs, pipelines) label a row, a file or a log line.
MAX_NAME_CHARS = 200
# What an uploaded model's metadata may carry: ``extra`` without its diffusion schedule is copied
# into every model listing; the schedule (served on its own route) reaches about 50,000 steps.
MAX_EXTRA_JSON_BYTES, MAX_SCHEDULE_JSON_BYTES = 64 << 10, 1 << 20
# Characters that are not text but change how the text around them reads (NUL, CR/LF, tab,
# escapes, U+202E RIGHT-TO-LEFT OVERRIDE, zero-width ones, the line and paragraph separators).
_CONTROL_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def check_name(value: Any, what: str = "name") -> str:
    """``value`` as a name: a string of at most :data:`MAX_NAME_CHARS` characters without control
    or format characters (Unicode categories Cc, Cf, Zl, Zp); ModelError (a ValueError) naming
    ``what`` and the first such character otherwise. Every name the service stores passes here."""
    if not isinstance(value, str):
        raise ModelError(f"{what} must be a string")
    if len(value) > MAX_NAME_CHARS:
        raise ModelError(f"{what} has {len(value)} characters; at most {MAX_NAME_CHARS}")
    for i, char in enumerate(value):
        if unicodedata.category(char) in _CONTROL_CATEGORIES:
            label = unicodedata.name(char, "a control character")
            raise ModelError(
                f"{what} holds U+{ord(char):04X} ({label}) at position {i}; names may not hold "
                "control or formatting characters (Unicode categories Cc, Cf, Zl, Zp)"
            )
    return value


def check_upload_metadata(fields: dict[str, Any]) -> None:
    """ModelError unless an uploaded model's ``name`` passes :func:`check_name` and its ``extra``
    is at most :data:`MAX_EXTRA_JSON_BYTES` of JSON without ``extra.schedule`` and the schedule at
    most :data:`MAX_SCHEDULE_JSON_BYTES`: a record's metadata is read on every listing."""
    if fields.get("name") is not None:
        check_name(fields["name"])
    extra = dict(fields.get("extra") or {})
    schedule = extra.pop("schedule", None)
    for label, value, cap in (
        ("extra (without its schedule)", extra, MAX_EXTRA_JSON_BYTES),
        ("extra.schedule", schedule, MAX_SCHEDULE_JSON_BYTES),
    ):
        size = len(json.dumps(value, separators=(",", ":")).encode())
        if size > cap:
            raise ModelError(
                f"the model's metadata {label} is {size} bytes of JSON; at most {cap} bytes"
            )


def fields_from_metadata_map(metadata: dict[str, str] | None) -> dict[str, Any]:
    """Validated ModelInfo fields from a file's string map (safetensors ``__metadata__`` or ONNX
    ``metadata_props``); empty when the map has no :data:`METADATA_KEY` entry."""
    if not metadata or METADATA_KEY not in metadata:
        return {}
    return parse_info_json(metadata[METADATA_KEY])


def described_kind(metadata: dict[str, str] | None) -> str | None:
    """The ``kind`` a file's string map says (``"denoiser"`` for a denoiser, written by
    :func:`denoiser_info_json`), or None: a classifier's metadata has none, and unreadable JSON
    is left to the loader to refuse."""
    if not metadata or METADATA_KEY not in metadata:
        return None
    try:
        doc = json.loads(metadata[METADATA_KEY])
    except (json.JSONDecodeError, TypeError):
        return None
    kind = doc.get("kind") if isinstance(doc, dict) else None
    return kind if isinstance(kind, str) else None
