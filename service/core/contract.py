"""The typed contract of a certification job, from the request to the result rows.

One set of frozen types crosses every layer, so that a parameter is named once:

- :class:`CertifyParams`: what a caller chooses (the model, σ, n0, n, α, the bound, the mode, a
  target radius, runtime, precision, batch size, seed). The API's request body
  (``schemas.CertifyRequest``), the Python client and the CLI's options all build one.
- :class:`CertifyJob`: what the service runs and records: the parameters with the seed drawn,
  the number of inputs, and for a dataset job its :class:`DatasetRange`. The job record stores
  it (:meth:`CertifyJob.record_params`), the runner and the engine call take it.
- :class:`CertifyTask` and :class:`ChunkTask`: the queue messages of a job and of one chunk of a
  dataset job, with the few fields only a message carries (labels, radii, a chunk's range and
  seed). The worker parses a message into one and compares it with what the record gives.
  :class:`TrainTask` is a training job's message.
- :class:`ModelRecord` and :class:`DatasetRecord`: the stored records' fields that decide whether
  a job may run, with those rules as methods.

The wire formats do not change: a record's ``params`` and a message's arguments are the flat
JSON objects they always were (:meth:`CertifyJob.record_params`, :meth:`CertifyTask.to_message`,
:meth:`ChunkTask.to_message`); these types read and write them. Standard library only, besides
the torch-free rules of :mod:`smoothcert.models` (runtime_rules, diffusion_schedule, metadata): no
Redis, so the CLI's local commands import it too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from smoothcert.models.diffusion_schedule import timestep_for_sigma
from smoothcert.models.metadata import DENOISER, ModelError
from smoothcert.models.runtime_rules import runtime_refusal
from smoothcert.service.core.params import (
    DEFAULT_ALPHA,
    DEFAULT_BOUND,
    DEFAULT_MODE,
    DEFAULT_N,
    DEFAULT_N0,
    DEFAULT_NOISE,
    DEFAULT_PRECISION,
    DEFAULT_RUNTIME,
    Bound,
    Mode,
    Noise,
    Precision,
    Runtime,
)

CERTIFY_KINDS = ("certify", "predict")
"""The job kinds of a :class:`CertifyJob` (a job's kind is its mode)."""


def plan_chunks(start: int, stop: int, chunk_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` cut into consecutive ``(first, end)`` ranges of ``chunk_size`` inputs: a
    dataset job's chunks (:mod:`smoothcert.service.core.job_chunks`)."""
    return [(a, min(a + chunk_size, stop)) for a in range(start, stop, chunk_size)]


def chunk_seed(seed: int, index: int) -> int:
    """Chunk ``index``'s noise seed: the first 8 bytes of SHA-256(``"<seed>:<index>"``), big-endian,
    shifted right one bit (so it is below 2^63, as the engine requires)."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class ContractError(ValueError):
    """A dictionary that does not spell one of these types: ``fields`` names what is wrong."""

    def __init__(self, message: str, fields: Sequence[str] = ()):
        super().__init__(message)
        self.fields = list(fields)


@dataclass(frozen=True)
class CertifyParams:
    """The parameters a caller chooses for CERTIFY, PREDICT or the test at a target radius.

    ``seed`` None means "draw one" (the service draws and records it); ``batch_size`` None means
    the engine's choice for the device. ``n`` caps a target-radius run per input. ``noise``
    "discrete" draws the discretised Gaussian on the 8-bit grid; ``quantize`` rounds float inputs
    onto that grid instead of refusing those off it (discrete noise only).
    """

    model_id: str
    sigma: float
    n0: int = DEFAULT_N0
    n: int = DEFAULT_N
    alpha: float = DEFAULT_ALPHA
    bound: Bound = DEFAULT_BOUND
    mode: Mode = DEFAULT_MODE
    batch_size: int | None = None
    seed: int | None = None
    target_radius: float | None = None
    runtime: Runtime = DEFAULT_RUNTIME
    precision: Precision = DEFAULT_PRECISION
    noise: Noise = DEFAULT_NOISE
    quantize: bool = False

    @property
    def samples_per_input(self) -> int:
        """The most samples one input may draw: n for PREDICT, n0 + n otherwise."""
        return self.n if self.mode == "predict" else self.n0 + self.n

    @property
    def certifies(self) -> bool:
        """Whether this is CERTIFY with a fixed n (not PREDICT, not a target-radius test)."""
        return self.mode == "certify" and self.target_radius is None

    def request_fields(self) -> dict[str, Any]:
        """The fields of a request body that differ from the defaults (what a client sends: a
        parameter left at its default takes the server's, which is the same)."""
        fields = {"model_id": self.model_id, "sigma": self.sigma}  # required: always sent
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name not in fields and value != f.default:
                fields[f.name] = value
        return fields

    def with_seed(self, seed: int) -> CertifyParams:
        return dataclasses.replace(self, seed=seed)


@dataclass(frozen=True)
class DatasetRange:
    """A dataset job's inputs: ``[skip, skip + limit)`` of dataset ``dataset_id`` (to its end when
    ``limit`` is None), certified in ``chunks`` chunks of at most ``chunk_size`` inputs."""

    dataset_id: str
    skip: int
    limit: int | None
    chunk_size: int
    chunks: int


# The record's parameters, in the order the API has always written them.
_PARAM_KEYS = (
    "model_id",
    "mode",
    "sigma",
    "n0",
    "n",
    "alpha",
    "bound",
    "batch_size",
    "seed",
    "num_inputs",
    "runtime",
    "precision",
)
_DATASET_KEYS = tuple(f.name for f in dataclasses.fields(DatasetRange))
# Written only when they differ from the default (records from before they existed lack them).
_OPTIONAL_KEYS = ("target_radius", "noise", "quantize")
# Records written before runtimes and precisions were chosen ran in torch, in float32.
_LEGACY_DEFAULTS = {"runtime": "torch", "precision": "float32"}


@dataclass(frozen=True)
class CertifyJob:
    """A certify or predict job as the service records and runs it: its parameters (with the
    seed drawn), how many inputs it has and, for a dataset job, which of the dataset's."""

    params: CertifyParams
    num_inputs: int
    dataset: DatasetRange | None = None

    def __post_init__(self) -> None:
        if self.params.seed is None:
            raise ContractError("a job's seed is drawn before it is recorded", ["seed"])

    @property
    def seed(self) -> int:
        assert self.params.seed is not None  # __post_init__
        return self.params.seed

    @property
    def first_row(self) -> int:
        """The index of the job's first row: a dataset job's ``skip``, otherwise 0."""
        return self.dataset.skip if self.dataset is not None else 0

    @property
    def total_samples(self) -> int:
        """The most samples the whole job may draw (what its budget is checked against)."""
        return self.params.samples_per_input * self.num_inputs

    @property
    def progress_total(self) -> int:
        """The job's progress total: its inputs for a target-radius run, whose progress counts
        inputs settled (its sample budget is a cap, not a count), else :attr:`total_samples`."""
        return self.num_inputs if self.params.target_radius is not None else self.total_samples

    def chunk_ranges(self) -> list[tuple[int, int]]:
        """A dataset job's chunks as ``[start, stop)`` dataset indices; ``[]`` for other jobs."""
        if self.dataset is None:
            return []
        skip = self.dataset.skip
        return plan_chunks(skip, skip + self.num_inputs, self.dataset.chunk_size)

    def record_params(self) -> dict[str, Any]:
        """The job record's ``params``: a flat JSON object (the wire format of every record)."""
        p = self.params
        out: dict[str, Any] = {
            "model_id": p.model_id,
            "mode": p.mode,
            "sigma": p.sigma,
            "n0": p.n0,
            "n": p.n,
            "alpha": p.alpha,
            "bound": p.bound,
            "batch_size": p.batch_size,
            "seed": p.seed,
            "num_inputs": self.num_inputs,
            "runtime": p.runtime,
            "precision": p.precision,
        }
        if p.target_radius is not None:
            out["target_radius"] = p.target_radius
        if p.noise != DEFAULT_NOISE:
            out["noise"] = p.noise
        if p.quantize:
            out["quantize"] = True
        if self.dataset is not None:
            out.update(dataclasses.asdict(self.dataset))
        return out

    @classmethod
    def from_record_params(cls, params: Mapping[str, Any]) -> CertifyJob:
        """The job that :meth:`record_params` wrote. ContractError naming the fields when
        ``params`` has a key no job has, or lacks one every job has. A record from before
        runtimes were chosen reads as torch in float32 (what ran it then)."""
        if not isinstance(params, Mapping):
            raise ContractError("its parameters are not a JSON object")
        given = dict(params)
        for key, value in _LEGACY_DEFAULTS.items():
            given.setdefault(key, value)
        known = {*_PARAM_KEYS, *_OPTIONAL_KEYS, *_DATASET_KEYS}
        unknown = sorted(str(k) for k in given if k not in known)
        missing = [k for k in _PARAM_KEYS if k not in given]
        has_dataset = [k for k in _DATASET_KEYS if k in given]
        if has_dataset and len(has_dataset) != len(_DATASET_KEYS):
            missing += [k for k in _DATASET_KEYS if k not in given]
        if unknown or missing:
            raise ContractError(
                "unknown parameters: " + ", ".join(unknown) if unknown else "missing parameters",
                unknown + missing,
            )
        params_ = CertifyParams(
            **{k: given[k] for k in _PARAM_KEYS if k != "num_inputs"},
            target_radius=given.get("target_radius"),
            noise=given.get("noise", DEFAULT_NOISE),
            quantize=bool(given.get("quantize", False)),
        )
        dataset = DatasetRange(**{k: given[k] for k in _DATASET_KEYS}) if has_dataset else None
        return cls(params_, given["num_inputs"], dataset)

    def differences(self, other: CertifyJob) -> list[str]:
        """The record fields in which ``other`` differs from this job, sorted."""
        mine, theirs = self.record_params(), other.record_params()
        return sorted(
            k for k in set(mine) | set(theirs) if mine.get(k, _ABSENT) != theirs.get(k, _ABSENT)
        )


_ABSENT = object()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_labels(labels: Any, count: int) -> list[int] | None:
    """``labels`` when it is None or ``count`` integers; ContractError otherwise."""
    if labels is None:
        return None
    if not (isinstance(labels, list) and len(labels) == count and all(map(_is_int, labels))):
        raise ContractError(f"its labels are not {count} integers, one per input", ["labels"])
    return labels


def check_radii(radii: Any) -> list[float] | None:
    """``radii`` when it is None or a list of finite non-negative numbers; ContractError otherwise."""
    if radii is None:
        return None
    if not isinstance(radii, list) or not all(
        isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r >= 0
        for r in radii
    ):
        raise ContractError("its radii are not a list of finite non-negative numbers", ["radii"])
    return radii


@dataclass(frozen=True)
class CertifyTask:
    """The queue message of a job on inputs the API saved: the job, and its labels and radii
    (which only the message carries; the inputs wait in ``DATA_DIR/jobs/<id>/``)."""

    job: CertifyJob
    labels: list[int] | None = None
    radii: list[float] | None = None

    # Message fields that are not parameters of the record; "inputs_path" came from APIs
    # before paths were derived from the job id, and is ignored.
    MESSAGE_ONLY = ("labels", "radii", "inputs_path")

    def to_message(self) -> dict[str, Any]:
        return {**self.job.record_params(), "labels": self.labels, "radii": self.radii}


def message_job(message: Any, message_only: Sequence[str]) -> CertifyJob:
    """The job that a queue message's parameters (its fields less ``message_only``) spell, read as
    a record is (a message without a runtime is from an API that chose none: torch in float32);
    ContractError naming the fields otherwise."""
    if not isinstance(message, Mapping):
        raise ContractError("its parameters are not a JSON object")
    given = {k: v for k, v in message.items() if k not in message_only}
    return CertifyJob.from_record_params(given)


@dataclass(frozen=True)
class ChunkTask:
    """The queue message of chunk ``index`` of a dataset job: the job, the chunk's dataset range
    ``[start, stop)`` and noise seed (both follow from the job: :meth:`planned`), the dataset's
    digest when the job was queued, and the radii of its certified-accuracy curve."""

    job: CertifyJob
    index: int
    start: int
    stop: int
    chunk_seed: int
    dataset_sha256: str | None
    radii: list[float] | None = None

    # Message fields that are not parameters of the record.
    MESSAGE_ONLY = ("radii", "dataset_sha256", "chunk", "start", "stop", "chunk_seed")

    @classmethod
    def planned(
        cls, job: CertifyJob, index: int, dataset_sha256: str | None, radii: list[float] | None
    ) -> ChunkTask:
        """Chunk ``index`` of ``job`` as the record gives it (IndexError past the last chunk)."""
        if not 0 <= index < len(ranges := job.chunk_ranges()):
            raise IndexError(index)
        start, stop = ranges[index]
        return cls(job, index, start, stop, chunk_seed(job.seed, index), dataset_sha256, radii)

    @property
    def dataset(self) -> DatasetRange:
        assert self.job.dataset is not None  # a chunk is always of a dataset job
        return self.job.dataset

    def to_message(self) -> dict[str, Any]:
        return {
            **self.job.record_params(),
            "dataset_sha256": self.dataset_sha256,
            "radii": self.radii,
            "chunk": self.index,
            "start": self.start,
            "stop": self.stop,
            "chunk_seed": self.chunk_seed,
        }


@dataclass(frozen=True)
class CheckModelTask:
    """A ``check_model`` job: load an uploaded model and run it on its check batches. Its queue
    message is ``(job_id, model_id)``."""

    model_id: str

    def record_params(self) -> dict[str, Any]:
        return {"model_id": self.model_id}

    @classmethod
    def from_record_params(cls, params: Mapping[str, Any]) -> CheckModelTask:
        if set(params) != {"model_id"} or not isinstance(params["model_id"], str):
            raise ContractError("its parameters are not a check_model job's {model_id}")
        return cls(params["model_id"])


TRAIN_KINDS = ("train", "train_denoiser")


@dataclass(frozen=True)
class TrainTask:
    """The queue message of a training job (kind ``train``) or of a denoiser training job
    (``train_denoiser``, which adds the frozen ``classifier`` and the denoiser to start from,
    ``init``: stored model ids or None). ``config`` is ``TrainConfig.to_dict()`` or
    ``DenoiserConfig.to_dict()`` (:mod:`smoothcert.service.core.train_config`), with its seed."""

    kind: str
    config: Mapping[str, Any]
    dataset: str
    name: str | None
    classifier: str | None = None
    init: str | None = None

    def _named(self) -> dict[str, Any]:
        if self.kind == "train":
            return {"dataset": self.dataset, "name": self.name}
        return {
            "dataset": self.dataset,
            "classifier": self.classifier,
            "init": self.init,
            "name": self.name,
        }

    def record_params(self) -> dict[str, Any]:
        """The job record's ``params``: the named fields, then the config's, flat."""
        return {**self._named(), **self.config}

    def to_message(self) -> dict[str, Any]:
        return {"config": dict(self.config), **self._named()}

    @classmethod
    def from_message(cls, kind: str, message: Any) -> TrainTask:
        """The task a ``kind`` message spells; ContractError (saying which fields it must have)
        otherwise."""
        keys = {"config", "dataset", "name"} | (
            set() if kind == "train" else {"classifier", "init"}
        )
        if (
            not isinstance(message, Mapping)
            or not isinstance(message.get("config"), Mapping)
            or set(message) != keys
        ):
            what = "a training job's" if kind == "train" else "a denoiser training job's"
            order = [
                "config",
                "dataset",
                *(["classifier", "init"] if kind != "train" else []),
                "name",
            ]
            raise ContractError(f"its parameters are not {what} {{{', '.join(order)}}}")
        return cls(kind, **message)


@dataclass(frozen=True)
class ModelRecord:
    """What a job needs of a stored model's record (``ModelStore.get``): kind, format, input
    shape and classes, a pipeline's denoiser, a diffusion denoiser's schedule."""

    id: str
    kind: str | None
    format: str | None
    input_shape: list[int]
    num_classes: int | None
    denoiser_id: str | None = None
    schedule: Mapping[str, Any] | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> ModelRecord:
        extra = meta.get("extra") or {}
        schedule = extra.get("schedule") if isinstance(extra, Mapping) else None
        return cls(
            id=meta["id"],
            kind=meta.get("kind"),
            format=meta.get("format"),
            input_shape=list(meta.get("input_shape") or []),
            num_classes=meta.get("num_classes"),
            denoiser_id=meta.get("denoiser"),
            schedule=schedule if isinstance(schedule, Mapping) else None,
            meta=meta,
        )

    def refusal(self, runtime: str, precision: str, device: str) -> str | None:
        """Why a job cannot run this model in ``runtime`` and ``precision`` on a worker whose
        device is ``device`` (SMOOTHCERT_DEVICE), or None when it can."""
        if self.kind == DENOISER:
            return (
                f"model {self.id} is a denoiser, which outputs images, not classes; certify a "
                "pipeline of it and a classifier (POST /v1/models/pipelines)"
            )
        if self.num_classes is None:
            return f"model {self.id} records no class count, so no class can be certified"
        return runtime_refusal(self.format or "", runtime, precision, device, self.id)

    @property
    def classes(self) -> int:
        """The class count of a classifier (:meth:`refusal` refuses a model without one)."""
        assert self.num_classes is not None
        return self.num_classes

    def sigma_refusal(self, sigma: float, pipeline_id: str) -> str | None:
        """Why pipeline ``pipeline_id``, whose denoiser this is, cannot certify at ``sigma``: a
        diffusion denoiser whose schedule does not reach it (the worker would fail the job with
        the same words). None when it can."""
        if self.schedule is None or "alphas_cumprod" not in self.schedule:
            return None
        try:
            timestep_for_sigma(self.schedule["alphas_cumprod"], sigma)
        except ModelError as exc:
            return f"model {pipeline_id}: {exc}"
        return None


@dataclass(frozen=True)
class DatasetRecord:
    """What a job needs of an uploaded dataset's record (``DatasetStore.get``)."""

    id: str
    num_inputs: int
    input_shape: list[int]
    label_range: tuple[int, int]
    sha256: str

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> DatasetRecord:
        low, high = meta["label_range"]
        return cls(
            meta["id"], meta["num_inputs"], list(meta["input_shape"]), (low, high), meta["sha256"]
        )

    def refusal_for(self, model: ModelRecord) -> str | None:
        """Why ``model`` cannot certify this dataset's inputs, or None when it can."""
        if self.input_shape != model.input_shape:
            return (
                f"dataset {self.id} holds inputs of shape {self.input_shape}, "
                f"the model takes {model.input_shape}"
            )
        if model.num_classes is not None and self.label_range[1] >= model.num_classes:
            return (
                f"dataset {self.id} has labels up to {self.label_range[1]}, "
                f"the model's classes are [0, {model.num_classes})"
            )
        return None
