"""``/v1/models``: upload, register a pipeline, change visibility and delete (``models`` scope),
list and show.

A model belongs to the account whose key uploaded or registered it and is private unless made
public (``visibility``, at upload or with ``PATCH``): another account's private model is an
unknown model (404) on every route, its public one may be used but changed or deleted only by its
owner or the admin (403) (:mod:`smoothcert.service.api.access`).

An upload is stored as a pending model and answered 201 only after a worker loaded it and ran
it on one batch (a ``check_model`` job the request waits for); a refused model is removed and
answered 422 with the loader's message. Pickles and lying safetensors headers are refused before
anything is stored (:meth:`ModelStore.add`), and a multipart body that cannot be parsed is a 422
too (:class:`UnparsableBodyRoute`). Every 422 of an upload starts with "model refused", except
a form field of the wrong type (``num_classes=10.5``, ``sigma=inf``, ``sigma=true``): numeric
fields are read as the JSON their text spells and typed strictly, as in ``POST /v1/certify``.

A name (the form's, the file name it defaults to, or the one the file's metadata gives) is at most
``MAX_NAME_CHARS`` characters without control or format characters, and the file's ``extra`` at
most ``MAX_EXTRA_JSON_BYTES`` of JSON beside a diffusion schedule of at most
``MAX_SCHEDULE_JSON_BYTES`` (:func:`~smoothcert.models.metadata.check_upload_metadata`, which the
worker's check applies); 422 beyond. The records the routes answer leave ``extra.schedule`` out:
``GET /v1/models/{id}/schedule`` serves it (the stored record keeps it, for the σ check of
:meth:`~smoothcert.service.core.contract.ModelRecord.sigma_refusal`).

``GET /v1/models/{id}/file`` serves the stored bytes (as uploaded, or as a training job wrote
them) to every key that may use the model, with their SHA-256 in ``X-Model-SHA256``.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, HTTPException, Response, UploadFile, status
from fastapi.responses import FileResponse

from smoothcert.models.diffusion_schedule import largest_sigma
from smoothcert.models.metadata import (
    PIPELINE,
    ModelError,
    Normalization,
    check_class_names,
    check_input_shape,
    check_name,
    check_num_classes,
    check_sigma,
)
from smoothcert.service.api.access import AccessDep
from smoothcert.service.api.body_limit import UnparsableBodyRoute
from smoothcert.service.api.deps import (
    DatasetsDep,
    JobsDep,
    LimitsDep,
    ModelsDep,
    QueueDep,
    SettingsDep,
    require_key,
    require_models,
)
from smoothcert.service.api.schemas import (
    FormInteger,
    FormNumber,
    ModelChange,
    ModelRecord,
    ModelSchedule,
    PipelineRequest,
    Visibility,
)
from smoothcert.service.core.contract import CheckModelTask
from smoothcert.service.core.jobs import SUCCEEDED, TERMINAL, new_job_id
from smoothcert.service.core.keys import account_of
from smoothcert.service.core.model_store import READY, UploadTooLarge
from smoothcert.service.core.model_store import visibility as visibility_of
from smoothcert.service.core.queue import CHECK_MODEL_TASK

router = APIRouter(
    prefix="/v1/models",
    tags=["models"],
    dependencies=[Depends(require_key)],
    route_class=UnparsableBodyRoute,
)
OptionalForm = Annotated[str | None, Form()]
_UNKNOWN = "unknown model (or another account's private model)"


def _fields(
    name, input_shape, num_classes, class_names, arch, normalization, sigma
) -> dict[str, Any]:
    """The upload's metadata fields, parsed and type-checked (ModelError otherwise)."""

    def json_field(label: str, text: str) -> Any:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            example = "[1, 8, 8]" if label == "input_shape" else "[...]"
            raise ModelError(f"{label} must be JSON, e.g. {example}") from None

    fields: dict[str, Any] = {"name": check_name(name) if name else None, "arch": arch or None}
    if input_shape:
        fields["input_shape"] = list(check_input_shape(json_field("input_shape", input_shape)))
    if num_classes is not None:
        fields["num_classes"] = check_num_classes(num_classes)
    if class_names:
        names = json_field("class_names", class_names)
        if not isinstance(names, list):
            raise ModelError("class_names must be a JSON list of strings")
        fields["class_names"] = check_class_names(names, fields.get("num_classes"))
    if normalization:
        norm = Normalization.parse(normalization)
        fields["normalization"] = (
            None if norm is None else {"mean": list(norm.mean), "std": norm.std and list(norm.std)}
        )
    if sigma is not None:
        fields["sigma"] = check_sigma(sigma)
    return fields


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ModelRecord,
    dependencies=[Depends(require_models)],
    responses={
        413: {"description": "file too large, or over the account's storage quota"},
        422: {"description": "model refused"},
        503: {"description": "no worker checked the model in time"},
    },
)
def upload_model(
    response: Response,
    access: AccessDep,
    settings: SettingsDep,
    models: ModelsDep,
    jobs: JobsDep,
    queue: QueueDep,
    limits: LimitsDep,
    datasets: DatasetsDep,
    file: Annotated[UploadFile, File(description=".onnx, or .safetensors with arch")],
    name: OptionalForm = None,
    input_shape: OptionalForm = None,
    num_classes: Annotated[FormInteger | None, Form()] = None,
    class_names: OptionalForm = None,
    arch: OptionalForm = None,
    normalization: OptionalForm = None,
    sigma: Annotated[FormNumber | None, Form(allow_inf_nan=False)] = None,
    visibility: Annotated[
        Visibility,
        Form(
            description="private (the default): this account's keys alone may use it; public: every account's"
        ),
    ] = "private",
) -> ModelRecord:
    """Store a model, have a worker load it and run one batch, answer its record. It belongs to
    the key's account."""
    try:
        check_name(file.filename or "", "the file name")
        fields = _fields(name, input_shape, num_classes, class_names, arch, normalization, sigma)
        fields.update(owner=access.caller.account, visibility=visibility)
        meta = models.add(
            file.file, file.filename or "", fields, max_bytes=settings.max_upload_bytes
        )
    except UploadTooLarge as exc:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, str(exc)) from None
    except ModelError as exc:
        raise HTTPException(422, f"model refused: {exc}") from None
    _admitted(meta, access, limits, datasets, models)
    return _checked(meta, response, settings, models, jobs, queue, limits)


def _admitted(meta: dict[str, Any], access, limits, datasets, models) -> None:
    """Count the model just stored against its account's storage quota; over it, the model is
    deleted again and the 413 says why."""
    try:
        limits.admit_model(access.caller.account, datasets, meta["id"])
    except BaseException:
        models.delete(meta["id"])
        raise


def _checked(
    meta: dict[str, Any], response: Response, settings, models, jobs, queue, limits
) -> ModelRecord:
    """Have a worker load the pending model ``meta`` and run it on its check batches; its ready
    record, or the 422 / 503 that says why not (the pending record is removed then, and no longer
    counts against its account's storage)."""
    model_id, job_id = meta["id"], new_job_id()

    def removed() -> None:
        models.delete(model_id)
        limits.forget_storage(meta["owner"], model_id)

    try:
        jobs.create(
            job_id, "check_model", CheckModelTask(model_id).record_params(), owner=meta["owner"]
        )
        queue.send_task(CHECK_MODEL_TASK, args=[job_id, model_id], task_id=job_id)
        record = _wait(jobs, job_id, settings.model_check_timeout_s)
    except BaseException:
        removed()
        raise
    if record is None or record.status != SUCCEEDED:
        removed()
        if record is None or record.status not in TERMINAL:
            jobs.request_cancel(job_id)
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                f"no worker loaded the model within {settings.model_check_timeout_s:g} s; "
                "is a worker running? (GET /readyz)",
            )
        raise HTTPException(422, f"model refused: {record.error or record.status}")
    found = {k: v for k, v in record.result.items() if v not in (None, {}) and k != "format"}
    meta = models.update(model_id, **found, status=READY, check_job=job_id)
    response.headers["Location"] = f"/v1/models/{model_id}"
    return _answer(meta)


def _answer(meta: dict[str, Any]) -> ModelRecord:
    """The record as the routes answer it: without ``extra.schedule`` (its own route serves it),
    with its owner and visibility (a record from before: ``default``, public)."""
    meta = {**meta, "owner": account_of(meta.get("owner")), "visibility": visibility_of(meta)}
    extra = meta.get("extra")
    if isinstance(extra, dict) and "schedule" in extra:
        meta["extra"] = {k: v for k, v in extra.items() if k != "schedule"}
    return ModelRecord.model_validate(meta)


@router.post(
    "/pipelines",
    status_code=status.HTTP_201_CREATED,
    response_model=ModelRecord,
    dependencies=[Depends(require_models)],
    responses={
        404: {"description": "unknown denoiser or classifier (or another account's private one)"},
        413: {"description": "body too large, or over the account's storage quota"},
        422: {
            "description": "the parts cannot form a pipeline (not a denoiser, a pipeline as a "
            "part, input shapes that differ), or the worker refused it"
        },
        503: {"description": "no worker checked the pipeline in time"},
    },
)
def register_pipeline(
    body: PipelineRequest,
    response: Response,
    access: AccessDep,
    settings: SettingsDep,
    models: ModelsDep,
    jobs: JobsDep,
    queue: QueueDep,
    limits: LimitsDep,
    datasets: DatasetsDep,
) -> ModelRecord:
    """Register a denoiser followed by a classifier as one model (denoised smoothing): its id works
    wherever a model id does. The noise is added before the denoiser; the classifier keeps its own
    normalization. A worker loads both parts and runs the pipeline on one batch before the 201."""
    parts = {
        role: access.model(models, getattr(body, role), f"{role} model")
        for role in ("denoiser", "classifier")
    }
    owner = {"owner": access.caller.account, "visibility": body.visibility}
    try:
        meta = models.add_pipeline(parts["denoiser"], parts["classifier"], body.name, owner)
    except ModelError as exc:
        raise HTTPException(422, f"pipeline refused: {exc}") from None
    _admitted(meta, access, limits, datasets, models)
    return _checked(meta, response, settings, models, jobs, queue, limits)


def _wait(jobs, job_id: str, timeout_s: float):
    """Poll the job record until it is terminal or ``timeout_s`` passed; the last record seen."""
    deadline, delay = time.monotonic() + timeout_s, 0.02
    while True:
        record = jobs.get(job_id)
        if record is None or record.status in TERMINAL or time.monotonic() > deadline:
            return record
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


@router.get("", response_model=list[ModelRecord])
def list_models(models: ModelsDep, access: AccessDep) -> list[ModelRecord]:
    """The ready models this key may use (its account's and the public ones; an admin key: every
    model), oldest first; a diffusion denoiser's schedule is left out (``GET
    /v1/models/{id}/schedule``)."""
    return [_answer(m) for m in models.list() if access.may_use(m)]


@router.get("/{model_id}", response_model=ModelRecord, responses={404: {"description": _UNKNOWN}})
def get_model(model_id: str, models: ModelsDep, access: AccessDep) -> ModelRecord:
    """The model's record; a diffusion denoiser's schedule is left out (``GET
    /v1/models/{id}/schedule``)."""
    return _answer(access.model(models, model_id))


MODEL_SHA256_HEADER = "X-Model-SHA256"


@router.get(
    "/{model_id}/file",
    response_class=FileResponse,
    responses={
        200: {
            "description": "the model's stored bytes (.onnx or .safetensors)",
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
            "headers": {
                MODEL_SHA256_HEADER: {
                    "description": "SHA-256 of the bytes, as the model's record and certificates "
                    "name it",
                    "schema": {"type": "string"},
                },
                "Content-Disposition": {
                    "description": "attachment; the file name it was uploaded under (a trained "
                    "model's: <id>.safetensors)",
                    "schema": {"type": "string"},
                },
            },
        },
        404: {"description": _UNKNOWN},
        409: {"description": "a pipeline, which has no file of its own: download its parts"},
    },
)
def download_model(model_id: str, models: ModelsDep, access: AccessDep) -> FileResponse:
    """The model's file, exactly as stored: what was uploaded, or what a training job wrote.

    Whoever may use the model may download it: its own account's keys, every key for a public
    model, and the admin; another account's private model is an unknown model (404). A public
    model's weights are thus public too: a certificate names the model by its SHA-256, and
    checking it (``smoothcert verify --model FILE``) needs those bytes. Keep a model private to
    keep its weights to its account. A pipeline has no file of its own (409, naming its parts,
    each downloadable here)."""
    meta = access.model(models, model_id)
    if meta.get("kind") == PIPELINE:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"model {model_id} is a pipeline and has no file of its own: download its parts, "
            f"the denoiser {meta.get('denoiser')} and the classifier {meta.get('classifier')} "
            "(GET /v1/models/{id}/file of each)",
        )
    try:
        path = models.weights_path(model_id)
    except KeyError:
        path = None
    if path is None or not path.is_file():  # deleted since the record was read
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown model {model_id!r}")
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=_download_name(meta),
        headers={MODEL_SHA256_HEADER: str(meta["sha256"])},
    )


def _download_name(meta: dict[str, Any]) -> str:
    """The file name a download suggests: the uploaded one; a trained model's (whose stored name is
    the generic ``model.safetensors``) or a record without one: ``<id>.<format>``."""
    uploaded = meta.get("filename")
    if isinstance(uploaded, str) and uploaded and not meta.get("train_job"):
        return uploaded
    return f"{meta['id']}.{meta['format']}"


@router.patch(
    "/{model_id}",
    response_model=ModelRecord,
    dependencies=[Depends(require_models)],
    responses={
        403: {"description": "another account's public model"},
        404: {"description": _UNKNOWN},
        413: {"description": "body too large"},
        422: {"description": 'a body that is not {"visibility": "private" | "public"}'},
    },
)
def change_model(
    model_id: str, body: ModelChange, models: ModelsDep, access: AccessDep
) -> ModelRecord:
    """Make a model public or private (its owner's account or the admin). A model made private
    stays usable by the jobs already queued with it."""
    access.own_model(models, model_id)
    return _answer(models.update(model_id, visibility=body.visibility))


@router.get(
    "/{model_id}/schedule",
    response_model=ModelSchedule,
    responses={404: {"description": _UNKNOWN + ", or one without a diffusion schedule"}},
)
def get_schedule(model_id: str, models: ModelsDep, access: AccessDep) -> ModelSchedule:
    """A diffusion denoiser's noise schedule (for a pipeline: its denoiser's), and the largest σ it
    reaches; 404 for a model without one."""
    meta = access.model(models, model_id)
    owner = models.get(meta["denoiser"]) if meta.get("kind") == PIPELINE else meta
    extra = (owner or {}).get("extra")
    schedule = extra.get("schedule") if isinstance(extra, dict) else None
    try:
        alphas = schedule["alphas_cumprod"] if isinstance(schedule, dict) else None
        sigma = None if alphas is None else largest_sigma(alphas)
    except ModelError:
        sigma = None
    if owner is None or alphas is None or sigma is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"model {model_id} has no diffusion schedule"
        )
    return ModelSchedule(
        model_id=owner["id"], timesteps=len(alphas), largest_sigma=sigma, schedule=schedule
    )


@router.delete(
    "/{model_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[Depends(require_models)],
    responses={
        403: {"description": "another account's public model"},
        404: {"description": _UNKNOWN},
        409: {"description": "a pipeline uses the model"},
    },
)
def delete_model(
    model_id: str, models: ModelsDep, access: AccessDep, limits: LimitsDep
) -> Response:
    """Remove the model's files (its owner's account or the admin); jobs already queued for it
    fail with a message, and it no longer counts against its account's storage. A model that a
    pipeline uses is kept (409) until those pipelines are deleted."""
    meta = access.own_model(models, model_id)
    if users := models.pipelines_using(model_id):
        mine = [p for p in users if access.owns(models.get(p, include_pending=True) or {})]
        named = ", ".join(mine) + (
            f" and {len(users) - len(mine)} of other accounts" if len(mine) < len(users) else ""
        )
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"model {model_id} is a part of pipeline(s) {named}; delete those first",
        )
    if not models.delete(model_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown model {model_id!r}")
    limits.forget_storage(account_of(meta.get("owner")), model_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
