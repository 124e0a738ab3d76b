"""Request and response bodies of the HTTP API v1 (design §4), and input decoding.

Parameter checks that need no model live here (0 < σ ≤ MAX_SIGMA, n ≥ 1, α in [MIN_ALPHA,
MAX_ALPHA], CERTIFY's least n for α, ...; the bounds of service/core/params.py); checks against
the model (shape, label range) and the settings' caps live in the routes. numpy only, no torch.

Request bodies are typed strictly, as their JSON Schema says: a number is a JSON number, never
a string (``"n": "1000"`` is refused); an integer is a number without a fractional part (1000 or
1000.0), never a boolean (``"seed": true`` is refused); labels are integers and pixels numbers.
The 422 names the field.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from fastapi.exceptions import RequestValidationError
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    computed_field,
    field_validator,
    model_validator,
)

from smoothcert.models.metadata import MAX_NAME_CHARS, check_name
from smoothcert.models.pixels import as_pixel_batch
from smoothcert.service.core import params
from smoothcert.service.core.contract import CertifyParams
from smoothcert.service.core.inputs import STORED_FLOAT, check_decoded_size, read_npy
from smoothcert.service.core.jobs import rfc3339
from smoothcert.service.core.params import (
    DEFAULT_ALPHA,
    DEFAULT_N,
    DEFAULT_N0,
    MAX_SEED,
    Bound,
    Mode,
    Noise,
    Precision,
    Runtime,
)


def integral(value: Any) -> Any:
    """A float with no fractional part as the int it is, and a list's items so; anything else
    unchanged, for the strict check. JSON Schema counts 1000.0 as an integer, and a Python client
    sending ``n=1e4`` means 10000. The strict models run it before their integer fields."""
    if isinstance(value, list):
        return [integral(v) for v in value]
    return int(value) if isinstance(value, float) and value.is_integer() else value


def form_json(text: Any) -> Any:
    """A multipart form field's text read as the JSON value it spells (``1000``, ``0.25``,
    ``[3, 1]``), so that the strict types of a JSON body apply to it: ``seed=true`` is a boolean
    and ``n="1000"`` a string, both refused. Text that is not JSON (``abc``, ``NaN``, ``inf``)
    stays text, which a number field then refuses, naming the field."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except ValueError:
        return text


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")  # json.loads would take NaN and Infinity


# A name people give a model, a dataset, a training run or a pipeline: 1 to MAX_NAME_CHARS
# characters, none of them a control or format character (check_name: NUL, CR/LF, U+202E, ...).
Name = Annotated[
    str, Field(min_length=1, max_length=MAX_NAME_CHARS), AfterValidator(lambda v: check_name(v))
]

# Numeric multipart form fields (POST /v1/models): the form's text read as JSON, then strict.
FormInteger = Annotated[int, BeforeValidator(integral), BeforeValidator(form_json), Strict()]
FormNumber = Annotated[float, BeforeValidator(form_json), Strict()]


class CertifyRequest(BaseModel):
    """``POST /v1/certify`` as JSON. ``inputs`` is a nested list (C,H,W) / (N,C,H,W) of floats in
    [0, 1], or the base64 text of a ``.npy`` file holding such an array. Instead of ``inputs``,
    ``dataset_id`` names an uploaded dataset (``POST /v1/datasets``): its inputs ``[skip,
    skip + limit)`` are certified in chunks, with the labels of its ``y``."""

    # strict: no strings for numbers, no booleans for integers (the module docstring)
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), strict=True)

    model_id: str = Field(min_length=1, max_length=64)
    inputs: str | list[Any] | None = None
    dataset_id: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="certify this uploaded dataset instead of inputs",
    )
    skip: int = Field(0, ge=0, description="dataset jobs: the first input to certify")
    limit: int | None = Field(
        None, ge=1, description="dataset jobs: certify at most this many inputs"
    )
    sigma: float = Field(
        gt=0,
        le=params.MAX_SIGMA,
        allow_inf_nan=False,
        description=f"noise level in [0,1] pixel units, at most {params.MAX_SIGMA:g}",
    )
    n0: int = Field(DEFAULT_N0, ge=1, description="samples that select the class (certify only)")
    n: int = Field(DEFAULT_N, ge=1, description="samples that bound its probability")
    # gt/lt keep their messages for 0 and 1; the tighter bounds are the validator's and the schema's.
    alpha: float = Field(
        DEFAULT_ALPHA,
        gt=0,
        lt=1,
        json_schema_extra={"minimum": params.MIN_ALPHA, "maximum": params.MAX_ALPHA},
        description="failure probability of each certificate, "
        f"in [{params.MIN_ALPHA:g}, {params.MAX_ALPHA:g}]",
    )
    batch_size: int | None = Field(None, ge=1, le=1_000_000)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="drawn and recorded when absent")
    bound: Bound = "cohen"
    labels: list[int] | None = Field(None, description="true classes, one per input")
    names: list[Name] | None = Field(
        None,
        max_length=100_000,
        description="a name for each input (a file name, say), one per input, carried into its "
        "row, the TSV and the certificate; a multipart body's image files are named by their "
        "file names",
    )
    mode: Mode = "certify"
    radii: list[float] | None = Field(
        None, max_length=1000, description="radii of the certified-accuracy curve (labels given)"
    )
    target_radius: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="only decide 'certified at this radius?' with an anytime-valid test that stops as soon "
        "as the answer is known; n is then the cap per input",
    )
    runtime: Runtime = Field(
        params.DEFAULT_RUNTIME,
        description=(
            "what evaluates the model: auto (the fastest on the worker's device, measured once per model), torch "
            "or onnxruntime (a safetensors model is then exported to ONNX); an ONNX model runs in onnxruntime only"
        ),
    )
    precision: Precision = Field(
        params.DEFAULT_PRECISION,
        description=(
            "the model's arithmetic: float32, or float16 (torch on a CUDA device) or bfloat16 (torch); the noise is "
            "drawn and added in float32, and the certificate holds for the classifier in this precision"
        ),
    )
    noise: Noise = Field(
        params.DEFAULT_NOISE,
        description=(
            "gaussian: N(0, sigma^2) in float32 (Cohen et al.); discrete: the discretised Gaussian on the 8-bit "
            "grid, drawn exactly with integer thresholds and added in integers, so that the certificate holds in "
            f"floating point (inputs on the grid; sigma at most {params.MAX_DISCRETE_SIGMA:g})"
        ),
    )
    quantize: bool = Field(
        False,
        description=(
            "noise discrete: round float inputs onto the 8-bit grid instead of refusing inputs off it (every value "
            "times 255 within 1e-4 of an integer); the certificate is then about the rounded image"
        ),
    )

    @field_validator("skip", "limit", "n0", "n", "batch_size", "seed", "labels", mode="before")
    @classmethod
    def _integral(cls, value: Any) -> Any:
        return integral(value)

    @field_validator("alpha")
    @classmethod
    def _alpha_bounds(cls, alpha: float) -> float:
        params.check_alpha_bound(alpha)
        return alpha

    @model_validator(mode="after")
    def _one_source(self) -> CertifyRequest:
        if (self.inputs is None) == (self.dataset_id is None):
            raise ValueError(
                "give either inputs or dataset_id (a dataset uploaded to /v1/datasets)"
            )
        if self.dataset_id is not None and self.labels is not None:
            raise ValueError(
                "a dataset job takes its labels from the dataset's y; do not send labels"
            )
        if self.dataset_id is None and (self.skip or self.limit is not None):
            raise ValueError("skip and limit apply to dataset jobs (dataset_id) only")
        if self.target_radius is not None and (self.mode != "certify" or self.bound != "cohen"):
            raise ValueError("target_radius goes with mode certify and the default bound")
        params.check_noise(self.noise, self.sigma, self.quantize)
        return self

    @model_validator(mode="after")
    def _certify_n(self) -> CertifyRequest:
        if self.certify_params().certifies:  # a target-radius run checks its own reach
            params.check_certify_n(self.n, self.alpha, self.bound)
        return self

    def certify_params(self) -> CertifyParams:
        """The request's parameters as the typed contract's (its source, labels and radii apart)."""
        return CertifyParams(
            model_id=self.model_id,
            sigma=self.sigma,
            n0=self.n0,
            n=self.n,
            alpha=self.alpha,
            bound=self.bound,
            mode=self.mode,
            batch_size=self.batch_size,
            seed=self.seed,
            target_radius=self.target_radius,
            runtime=self.runtime,
            precision=self.precision,
            noise=self.noise,
            quantize=self.quantize,
        )


class JobAccepted(BaseModel):
    job_id: str
    status: str
    location: str


class Progress(BaseModel):
    """``done`` of ``total`` ``unit``s: epochs (training), inputs settled (a target-radius run,
    whose sample budget is a cap, not a count) or noisy samples (certify, predict)."""

    done: int
    total: int
    unit: Literal["samples", "inputs", "epochs"]


Visibility = Literal["private", "public"]
JobKind = Literal["certify", "predict", "check_model", "train", "train_denoiser"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
_TIME = "RFC 3339 UTC with milliseconds (2026-12-01T07:21:41.512Z), the same instant as "


class Job(BaseModel):
    """``GET /v1/jobs/{id}``; times are Unix seconds (``*_at``) and RFC 3339 UTC text (``*_time``),
    ``result`` is set once succeeded."""

    id: str
    kind: JobKind
    status: JobStatus
    progress: Progress
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    result: dict[str, Any] | None = Field(
        None,
        description="certify and predict jobs: 'results' holds one row per input; each row of a certify or "
        "predict run (not of a target_radius run) has 'votes', the estimation samples' counts "
        'per class as {"<class index>": count}, zero counts left out, summing to the row\'s n',
    )
    params: dict[str, Any] = {}
    cancel_requested: bool = False
    owner: str | None = Field(
        None, description="the account whose key submitted the job (null for a job from before)"
    )
    created_time: str | None = Field(None, description=_TIME + "created_at")
    started_time: str | None = Field(
        None, description=_TIME + "started_at; null until the job starts"
    )
    finished_time: str | None = Field(
        None, description=_TIME + "finished_at; null until the job ends"
    )


class JobList(BaseModel):
    """``GET /v1/jobs``: a page of jobs, newest first, each without its result rows."""

    jobs: list[Job]
    next_cursor: str | None = Field(
        description="pass as ?cursor= for the next page; null after the last page"
    )


class ModelRecord(BaseModel):
    """A stored, checked model (``models/store.py`` describes the fields)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    id: str
    name: str | None = None
    kind: Literal["classifier", "denoiser", "pipeline"] = Field(
        "classifier",
        description="a denoiser only runs as a pipeline's first part; a pipeline is certifiable",
    )
    format: Literal["onnx", "safetensors", "pipeline"]
    sha256: str = Field(
        description="of the file; a pipeline's is the sha256 of the ASCII text of its denoiser's "
        "and its classifier's hex digests, in that order"
    )
    size_bytes: int
    created_at: float
    input_shape: list[int]
    num_classes: int | None = Field(None, description="absent for a denoiser")

    arch: str | None = None
    class_names: list[str] | None = None
    normalization: dict[str, Any] | None = None
    sigma: float | None = None
    denoiser: str | None = Field(None, description="a pipeline's denoiser model id")
    classifier: str | None = Field(None, description="a pipeline's classifier model id")
    parts: dict[str, dict[str, Any]] | None = Field(
        None, description="a pipeline's parts: id, name, sha256, format and arch of each"
    )
    owner: str = Field(
        "default",
        description="the account that uploaded or registered it (a model from before accounts "
        "belongs to default)",
    )
    visibility: Visibility = Field(
        "private",
        description="private: its owner's account alone may use it; public: every account may "
        "certify with it (only its owner or the admin may change or delete it)",
    )

    @computed_field(description=_TIME + "created_at")  # type: ignore[prop-decorator]
    @property
    def created_time(self) -> str | None:
        return rfc3339(self.created_at)


class PipelineRequest(BaseModel):
    """``POST /v1/models/pipelines``: a denoiser followed by a classifier, both already uploaded."""

    model_config = ConfigDict(extra="forbid", strict=True)

    denoiser: str = Field(min_length=1, max_length=64, description="id of an uploaded denoiser")
    classifier: str = Field(min_length=1, max_length=64, description="id of an uploaded classifier")
    name: Name | None = Field(None, description='default "DENOISER + CLASSIFIER"')
    visibility: Visibility = Field("private", description="who may use the pipeline")


class ModelChange(BaseModel):
    """``PATCH /v1/models/{id}``: what its owner (or the admin) may change."""

    model_config = ConfigDict(extra="forbid", strict=True)

    visibility: Visibility = Field(
        description="private: the owner's account alone may use the model; public: every account"
    )


class DatasetRecord(BaseModel):
    """An uploaded dataset (``service/datasets.py`` describes the fields)."""

    id: str
    owner: str = Field(
        "default",
        description="the account that uploaded it (a dataset from before accounts: default)",
    )
    name: str
    filename: str
    num_inputs: int
    input_shape: list[int]
    label_range: list[int]
    source_dtype: str
    size_bytes: int
    sha256: str
    created_at: float

    stored_bytes: int | None = Field(None, description="the bytes of x and y as stored")
    arrays_sha256: str | None = Field(
        None,
        description="the SHA-256 of x and y as stored (docs/certificate.md), which certificates "
        "of jobs on this dataset name; null for a dataset uploaded before",
    )
    disk_bytes: int | None = Field(
        None,
        description="what the dataset takes on disk, counted against the uploading key's "
        "SMOOTHCERT_MAX_STORAGE_BYTES_PER_KEY: x, y, its record and its folder, each in whole "
        "blocks of the file system",
    )

    @computed_field(description=_TIME + "created_at")  # type: ignore[prop-decorator]
    @property
    def created_time(self) -> str | None:
        return rfc3339(self.created_at)


class DatasetList(BaseModel):
    """``GET /v1/datasets``: a page of datasets, newest first."""

    datasets: list[DatasetRecord]
    next_cursor: str | None = Field(
        description="pass as ?cursor= for the next page; null after the last page"
    )


class ModelSchedule(BaseModel):
    """``GET /v1/models/{id}/schedule``: a diffusion denoiser's noise schedule (a pipeline's: its
    denoiser's), which model records leave out of ``extra``."""

    model_config = ConfigDict(protected_namespaces=())

    model_id: str = Field(description="the model whose record holds the schedule")
    timesteps: int = Field(description="the schedule's steps (the length of alphas_cumprod)")
    largest_sigma: float = Field(
        description="the largest σ, in [0,1] pixel units, that the schedule reaches: a "
        "certification at a larger σ is refused"
    )
    schedule: dict[str, Any] = Field(
        description="extra.schedule as the model file gives it: alphas_cumprod (ᾱ_t per step) "
        "and how it was made"
    )


class LoadedModel(BaseModel):
    id: str
    name: str | None = None
    runtime: str | None = None
    provider: str | None = None


class WorkerProcess(BaseModel):
    """One pool process of a worker: the device it resolved and the models it keeps loaded."""

    pid: int
    device: str | None = None
    models: list[LoadedModel] = []
    updated_at: float | None = None


class WorkerStatus(BaseModel):
    """A live worker as its heartbeat describes it."""

    name: str
    pid: int | None = None
    host: str | None = None
    started_at: float | None = None
    queues: list[str] = []
    concurrency: int | None = None
    requested_device: str | None = None
    processes: list[WorkerProcess] = []


class RedisMemoryStatus(BaseModel):
    """Redis's memory against its budget (``INFO memory``)."""

    used_bytes: int = Field(description="used_memory: bytes Redis holds now")
    max_bytes: int = Field(
        description="maxmemory: its budget (0: none); at it Redis refuses writes and the API "
        "answers 503"
    )
    policy: str = Field(description="maxmemory-policy; noeviction: nothing is ever dropped")


class Health(BaseModel):
    status: str
    redis: str | None = None
    redis_memory: RedisMemoryStatus | None = None
    workers: list[str] | None = None
    worker_details: list[WorkerStatus] | None = None
    detail: str | None = None


def decode_inputs(value: str | list[Any], max_bytes: int | None = None) -> np.ndarray:
    """The inputs of a JSON body as an array of numbers: a base64 ``.npy`` as its own integer or
    float dtype (:func:`~smoothcert.service.core.inputs.read_npy`, the multipart path's reader:
    header, dtype and size judged before the data), a nested list as float64. ValueError with a
    one-line message when malformed; InputsTooLarge (a ValueError) when the values, stored as
    float32, would take more than ``max_bytes`` (None: no budget)."""
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("inputs is neither a nested list nor valid base64") from None
        return read_npy(raw, "inputs", max_bytes)
    _check_numbers(value)
    shape = _nested_shape(value)
    check_decoded_size(
        math.prod(shape), STORED_FLOAT, max_bytes, f"a nested list of shape {shape} as float32"
    )
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError):
        raise ValueError("inputs must be a rectangular nested list of numbers") from None
    return arr


def _nested_shape(value: list[Any]) -> list[int]:
    """The shape a rectangular nested list has, from its first items (np.asarray refuses one that
    is not rectangular)."""
    shape, item = [], value
    while isinstance(item, list):
        shape.append(len(item))
        if not item:
            break
        item = item[0]
    return shape


_NUMBERS = frozenset(
    {int, float}
)  # what JSON numbers parse to; bool is a subclass of int, not one of these


def _check_numbers(value: list[Any]) -> None:
    """ValueError naming the first pixel of the nested list that is not a JSON number (a string,
    a boolean, null), since numpy would turn "0.5" and true into numbers without a word."""
    pending: list[tuple[list[Any], str]] = [(value, "inputs")]
    while pending:
        items, where = pending.pop()
        kinds = set(map(type, items))
        if kinds <= _NUMBERS:
            continue
        if kinds == {list}:
            pending.extend((item, f"{where}[{i}]") for i, item in enumerate(items))
            continue
        for i, item in enumerate(items):
            if type(item) not in _NUMBERS and type(item) is not list:
                raise ValueError(
                    f"inputs must be a rectangular nested list of numbers: {where}[{i}] is "
                    f"{_json_text(item)}, not a number"
                )
        raise ValueError(
            f"inputs must be a rectangular nested list of numbers: {where} mixes lists and numbers"
        )


def _json_text(item: Any) -> str:
    if isinstance(item, bool) or item is None:
        return {True: "true", False: "false", None: "null"}[item]
    if isinstance(item, str):
        return f"the string {item[:20]!r}"
    return f"a {type(item).__name__}"


def check_inputs(arr: np.ndarray, input_shape: list[int]) -> np.ndarray:
    """``arr`` (numbers: :func:`decode_inputs`) as float32 (N, C, H, W) in [0, 1] for a model
    taking ``input_shape``; ValueError otherwise. Integers are taken as floats (0 and 1 are the
    integers in [0, 1]); 8-bit pixels are sent as PNG images, or scaled by 1/255."""
    if arr.dtype.kind in "iu":
        arr = arr.astype(np.float32)
    elif arr.dtype.itemsize > 8:  # long double: rounded to float32 through float64, as ever
        arr = arr.astype(np.float64)
    return as_pixel_batch(arr, input_shape)


def check_labels(labels: list[int], num_inputs: int, num_classes: int) -> None:
    """ValueError unless there is one label in [0, num_classes) per input."""
    if len(labels) != num_inputs:
        raise ValueError(f"{len(labels)} labels for {num_inputs} inputs")
    bad = [y for y in labels if not 0 <= y < num_classes]
    if bad:
        raise ValueError(f"labels must lie in [0, {num_classes}), got {bad[0]}")


Body = TypeVar("Body", bound=BaseModel)


def validate_body(model: type[Body], data: bytes | str | dict[str, Any]) -> Body:
    """``data`` (raw JSON, or fields already parsed from a form) as ``model``; an invalid body is
    the 422 FastAPI gives its own body parameters (errors located under ``body``)."""
    try:
        return (
            model.model_validate(data)
            if isinstance(data, dict)
            else model.model_validate_json(data)
        )
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
        ) from None


# --- accounts and API keys (routes/keys.py) ------------------------------------------------------

Scope = Literal["certify", "models", "train", "admin"]


class KeyRequest(BaseModel):
    """``POST /v1/keys``: a new key of ``account`` (created with its first key)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    account: str = Field(
        pattern=r"^[a-z][a-z0-9_-]{0,62}$",
        description="the account: a lowercase letter, then up to 62 lowercase letters, digits, "
        "'_' or '-'; `default` is SMOOTHCERT_API_KEY's account, `admin` SMOOTHCERT_ADMIN_KEY's",
    )
    scopes: list[Scope] = Field(min_length=1, max_length=4, description="what the key may do")
    name: str | None = Field(
        None, min_length=1, max_length=100, description="a label for people (where it is used)"
    )
    expires_in_s: int | None = Field(
        None, ge=1, le=10 * 365 * 86400, description="seconds until the key expires; none: never"
    )


class KeyInfo(BaseModel):
    """A key as listed: never its secret."""

    id: str
    account: str
    scopes: list[Scope]
    name: str | None
    created_time: str
    expires_time: str | None


class NewKey(KeyInfo):
    """The answer to ``POST /v1/keys``: the key itself, shown here once and never again."""

    key: str = Field(description="the bearer key; shown only in this answer, keep it secret")


class KeyList(BaseModel):
    keys: list[KeyInfo]


class WhoAmI(BaseModel):
    """The caller's account, key and scopes."""

    account: str
    key_id: str = Field(
        description="the key's id, or SMOOTHCERT_API_KEY / SMOOTHCERT_ADMIN_KEY for those keys"
    )
    scopes: list[Scope]
    admin: bool
