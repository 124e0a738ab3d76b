"""``POST /v1/certify``: validate a certify/predict request, save its inputs, queue the job.

The body is JSON (:class:`CertifyRequest`) or multipart: the same fields as form fields, each
number or list as the JSON text of its value (``n=1000``, ``labels=[3, 1]``) and checked as
strictly as in a JSON body, and the inputs as ``inputs`` files, either PNG/JPEG images (one
input each; :mod:`smoothcert.service.core.images` says which, and every header is checked
against the model's input shape before any pixel is decoded) or one ``.npy`` array.
Everything a worker would refuse is refused here first, with a 4xx that says why: parameters
(schemas), caps (settings), the model (404 unknown, shape and label range from its record). The
inputs go to ``DATA_DIR/jobs/<job id>/inputs.npy``, where the worker finds them by the job id (a
message names no path); the job record is written before the message is sent, and the seed is
drawn here so that it is recorded. A dataset job (``dataset_id``) is checked against the
dataset's record and sent as one message per chunk (:mod:`smoothcert.service.core.job_chunks`).
The rate limit, the queue bound, the key's active jobs and ``Idempotency-Key`` are checked before
the body is parsed into a job (:mod:`smoothcert.service.api.limits`); a multipart body's
fingerprint is its fields and the SHA-256 of each file, so it does not depend on the client's
boundary. Once parsed, a job must fit ``SMOOTHCERT_MAX_JOB_SAMPLES`` (422), and room for all of
its messages is held in the queue before its record is written (503 when they do not fit).
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from smoothcert.models.diffusion_schedule import timestep_for_sigma
from smoothcert.models.metadata import DENOISER, ModelError
from smoothcert.service.api.deps import (
    AdmissionDep,
    DatasetsDep,
    JobsDep,
    ModelsDep,
    QueueDep,
    SettingsDep,
    require_key,
)
from smoothcert.service.api.idempotency import json_content
from smoothcert.service.api.limits import IN_PROGRESS, JOBS_LIMITED, QUEUE_FULL, REUSED_KEY
from smoothcert.service.api.schemas import (
    CertifyRequest,
    JobAccepted,
    check_inputs,
    check_labels,
    decode_inputs,
    form_json,
    validate_body,
)
from smoothcert.service.core.images import IMAGE_SUFFIXES
from smoothcert.service.core.inputs import decode_images, load_npy
from smoothcert.service.core.job_chunks import chunk_seed, plan_chunks
from smoothcert.service.core.jobs import new_job_id
from smoothcert.service.core.params import DRAWN_SEED_BOUND, draw_seed
from smoothcert.service.core.queue import CERTIFY_CHUNK_TASK, CERTIFY_TASK, QUEUE

router = APIRouter(prefix="/v1", tags=["jobs"], dependencies=[Depends(require_key)])
_FORM_FIELDS = {
    k: v
    for k, v in CertifyRequest.model_json_schema()["properties"].items()
    if k not in ("inputs", "dataset_id", "skip", "limit")
}
_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": CertifyRequest.model_json_schema()},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["model_id", "sigma", "inputs"],
                "properties": {
                    **_FORM_FIELDS,
                    "inputs": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "PNG/JPEG images, or one .npy array",
                    },
                },
            }
        },
    },
}
# Form fields given as text (model_id, bound, mode); the others are read as JSON (_form_value).
_TEXT_FIELDS = frozenset(
    k
    for k, v in _FORM_FIELDS.items()
    if "string" in {s.get("type") for s in (v, *v.get("anyOf", []))}
)
Files = list[tuple[str, bytes]]
Form = tuple[
    list[tuple[str, str]], list[tuple[str, str, bytes]]
]  # fields; (field, filename, data) per file


def _unprocessable(message: str) -> HTTPException:
    return HTTPException(422, message)


@router.post(
    "/certify",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobAccepted,
    openapi_extra={"requestBody": _BODY},
    responses={
        404: {"description": "unknown model or dataset"},
        413: {"description": "body too large"},
        422: {
            "description": "invalid parameters or inputs, or a job over SMOOTHCERT_MAX_JOB_SAMPLES"
            + REUSED_KEY
        },
        **IN_PROGRESS,
        **JOBS_LIMITED,
        **QUEUE_FULL,
    },
)
async def submit(
    request: Request,
    settings: SettingsDep,
    jobs: JobsDep,
    models: ModelsDep,
    datasets: DatasetsDep,
    queue: QueueDep,
    admission: AdmissionDep,
) -> JSONResponse:
    """Queue a certify (or predict) job; poll ``Location`` for its status and result.

    With ``dataset_id`` instead of inputs (JSON only), the job covers that uploaded dataset in
    chunks of ``SMOOTHCERT_CHUNK_SIZE`` inputs, one task each, which any number of workers share;
    the labels come from the dataset. Chunk i draws its noise from a seed derived from the job's
    seed and i, so the same seed and chunk size give the same rows (service/job_chunks.py).
    """
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await _read_form(request, settings.max_inputs)
        content, parse = (lambda: _form_content(form)), (lambda: _form_request(form))
    else:
        body = await request.body()
        content, parse = (
            (lambda: json_content(body)),
            (lambda: (validate_body(CertifyRequest, body), None)),
        )

    def create() -> tuple[JobAccepted, str]:
        accepted = _enqueue(*parse(), settings, jobs, models, datasets, queue, admission)
        return accepted, accepted.location

    return await run_in_threadpool(
        admission.submit, content, create, status_code=status.HTTP_202_ACCEPTED, queue=QUEUE
    )


async def _read_form(request: Request, max_inputs: int) -> Form:
    """The multipart body's text fields and files, in order, read into memory; 422 when malformed."""
    fields: list[tuple[str, str]] = []
    uploads: list[tuple[str, str, bytes]] = []
    try:
        form = await request.form(max_files=max_inputs + 1)
    except (
        StarletteHTTPException
    ) as exc:  # starlette answers 400 to a multipart body it cannot parse
        raise _unprocessable(f"malformed multipart body: {exc.detail}") from None
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                uploads.append((key, value.filename or "input", await value.read()))
            else:
                fields.append((key, value))
    finally:
        await form.close()
    return fields, uploads


def _form_content(form: Form) -> dict[str, Any]:
    """The multipart request in normal form: sorted fields, each file's name and SHA-256 in order."""
    fields, uploads = form
    return {
        "fields": sorted(fields),
        "files": [[key, name, hashlib.sha256(data).hexdigest()] for key, name, data in uploads],
    }


def _form_request(form: Form) -> tuple[CertifyRequest, Files]:
    values: dict[str, Any] = {}
    for key, value in form[0]:
        values[key] = (
            value if key in _TEXT_FIELDS or key not in _FORM_FIELDS else _form_value(key, value)
        )
    files: Files = []
    for key, name, data in form[1]:
        if key != "inputs":
            raise _unprocessable(
                f"unexpected file field {key!r}; send images or a .npy as 'inputs'"
            )
        files.append((name, data))
    if not files:
        raise _unprocessable("no 'inputs' files: attach PNG/JPEG images or one .npy array")
    return validate_body(CertifyRequest, {**values, "inputs": []}), files


def _form_value(key: str, text: str) -> Any:
    """A non-text form field read as JSON (schemas.form_json); labels and radii must be JSON."""
    value = form_json(text)
    if key in ("labels", "radii") and value is text:
        raise _unprocessable(f"{key} must be a JSON list, e.g. [3, 1, 4]")
    return value


def _decode_files(files: Files, input_shape: list[int]) -> np.ndarray:
    """One .npy array, or PNG/JPEG images (N, C, H, W), each header checked against the model's
    input shape before any is decoded (inputs.decode_images); ValueError otherwise."""
    if len(files) == 1 and files[0][0].lower().endswith(".npy"):
        return load_npy(files[0][1]).astype(np.float64)
    if any(not name.lower().endswith(IMAGE_SUFFIXES) for name, _ in files):
        raise ValueError("inputs files must be PNG/JPEG images or a single .npy array")
    return decode_images(files, input_shape)


def _check_denoiser_sigma(denoiser: dict[str, Any] | None, req: CertifyRequest) -> None:
    """422 when the pipeline's denoiser is a diffusion model whose schedule does not reach ``req.sigma``
    (the worker would fail the job with the same words)."""
    schedule = ((denoiser or {}).get("extra") or {}).get("schedule")
    if isinstance(schedule, dict) and "alphas_cumprod" in schedule:
        try:
            timestep_for_sigma(schedule["alphas_cumprod"], req.sigma)
        except ModelError as exc:
            raise _unprocessable(f"model {req.model_id}: {exc}") from None


def _enqueue(
    req: CertifyRequest, files: Files | None, settings, jobs, models, datasets, queue, admission
) -> JobAccepted:
    for name in ("n0", "n"):
        if getattr(req, name) > settings.max_n:
            raise _unprocessable(
                f"{name}={getattr(req, name)} exceeds this server's cap of {settings.max_n} "
                "samples (SMOOTHCERT_MAX_N)"
            )
    if req.radii is not None and any(not np.isfinite(r) or r < 0 for r in req.radii):
        raise _unprocessable("radii must be finite and non-negative")
    meta = models.get(req.model_id)
    if meta is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown model {req.model_id!r}")
    if meta.get("kind") == DENOISER:
        raise _unprocessable(
            f"model {req.model_id} is a denoiser, which outputs images, not classes; certify a "
            "pipeline of it and a classifier (POST /v1/models/pipelines)"
        )
    if meta.get("format") == "pipeline" and (req.runtime != "auto" or req.precision != "float32"):
        raise _unprocessable(
            f"model {req.model_id} is a pipeline, whose parts each run in their own loader: "
            "runtime auto and precision float32 only"
        )
    if meta.get("format") == "pipeline":
        _check_denoiser_sigma(models.get(meta["denoiser"]), req)
    if req.runtime == "torch" and meta.get("format") == "onnx":
        raise _unprocessable(
            f"runtime torch needs a safetensors model; model {req.model_id} is ONNX, which runs "
            "in onnxruntime only: use runtime auto or onnxruntime"
        )
    if req.precision != "float32" and (
        req.runtime == "onnxruntime" or meta.get("format") == "onnx"
    ):
        raise _unprocessable(
            f"precision {req.precision} runs in torch only (a safetensors model, runtime auto or "
            "torch); onnxruntime evaluates the float32 graph"
        )
    if req.precision == "float16" and settings.device == "cpu":
        raise _unprocessable(
            "precision float16 needs a CUDA device and this server's workers run on the CPU "
            "(SMOOTHCERT_DEVICE=cpu); use float32, or bfloat16"
        )
    if req.dataset_id is not None:
        return _enqueue_dataset(req, meta, settings, jobs, datasets, queue, admission)
    try:
        raw = (
            decode_inputs(req.inputs)
            if files is None
            else _decode_files(files, meta["input_shape"])
        )
        x = check_inputs(raw, meta["input_shape"])
        if req.labels is not None:
            check_labels(req.labels, len(x), meta["num_classes"])
    except ValueError as exc:
        raise _unprocessable(str(exc)) from None
    if len(x) > settings.max_inputs:
        raise _unprocessable(
            f"{len(x)} inputs exceed this server's cap of {settings.max_inputs} per job "
            "(SMOOTHCERT_MAX_INPUTS); upload them as a dataset (POST /v1/datasets)"
        )
    _check_budget(req, len(x), settings.max_job_samples)

    job_id = new_job_id()
    with admission.room(QUEUE, 1):
        folder = settings.jobs_dir / job_id
        folder.mkdir(parents=True)
        np.save(folder / "inputs.npy", x)
        params = _params(req, len(x))
        spec = {**params, "labels": req.labels, "radii": req.radii}
        try:
            jobs.create(
                job_id,
                req.mode,
                params,
                total=_samples_per_input(req) * len(x),
                owner=admission.caller,
                max_active=admission.max_active,
            )
            queue.send_task(CERTIFY_TASK, args=[job_id, spec], task_id=job_id)
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(Exception):
                jobs.fail(job_id, "the job could not be queued")
            raise  # Redis or broker errors become 503 (app.py); ActiveJobsExceeded 429 (limits.py)
    return JobAccepted(job_id=job_id, status="queued", location=f"/v1/jobs/{job_id}")


def _enqueue_dataset(
    req: CertifyRequest, meta, settings, jobs, datasets, queue, admission
) -> JobAccepted:
    """Queue one task per chunk of the dataset's inputs ``[skip, skip + limit)`` (job_chunks.py),
    all or none: room for every chunk's message is held in the queue before the first is sent."""
    dataset = datasets.get(req.dataset_id)
    if dataset is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown dataset {req.dataset_id!r}")
    if dataset["input_shape"] != meta["input_shape"]:
        raise _unprocessable(
            f"dataset {req.dataset_id} holds inputs of shape {dataset['input_shape']}, "
            f"the model takes {meta['input_shape']}"
        )
    if dataset["label_range"][1] >= meta["num_classes"]:
        raise _unprocessable(
            f"dataset {req.dataset_id} has labels up to {dataset['label_range'][1]}, "
            f"the model's classes are [0, {meta['num_classes']})"
        )
    size = dataset["num_inputs"]
    if req.skip >= size:
        raise _unprocessable(
            f"skip={req.skip} leaves no inputs: dataset {req.dataset_id} holds {size}"
        )
    stop = size if req.limit is None else min(size, req.skip + req.limit)
    ranges = plan_chunks(req.skip, stop, settings.chunk_size)
    _check_budget(req, stop - req.skip, settings.max_job_samples)
    bound = settings.max_queued_messages
    if len(ranges) > bound:
        raise _unprocessable(
            f"this dataset job is {len(ranges)} chunks of up to {settings.chunk_size} inputs, one "
            f"queue message each, more than the queue's bound of {bound} messages "
            f"(SMOOTHCERT_MAX_QUEUED_MESSAGES), so it could never be queued; certify at most "
            f"{bound * settings.chunk_size} inputs per job (skip and limit)"
        )
    params = {
        **_params(req, stop - req.skip),
        "dataset_id": req.dataset_id,
        "skip": req.skip,
        "limit": req.limit,
        "chunk_size": settings.chunk_size,
        "chunks": len(ranges),
    }
    spec = {**params, "dataset_sha256": dataset["sha256"], "radii": req.radii}
    job_id = new_job_id()
    with admission.room(QUEUE, len(ranges)):
        try:
            jobs.create(
                job_id,
                req.mode,
                params,
                total=_samples_per_input(req) * (stop - req.skip),
                owner=admission.caller,
                max_active=admission.max_active,
            )
            for index, (first, end) in enumerate(ranges):
                chunk = {
                    **spec,
                    "chunk": index,
                    "start": first,
                    "stop": end,
                    "chunk_seed": chunk_seed(params["seed"], index),
                }
                queue.send_task(
                    CERTIFY_CHUNK_TASK, args=[job_id, chunk], task_id=f"{job_id}.{index}"
                )
        except Exception:
            with contextlib.suppress(Exception):
                jobs.fail(job_id, "the job could not be queued")
            raise
    return JobAccepted(job_id=job_id, status="queued", location=f"/v1/jobs/{job_id}")


def _params(req: CertifyRequest, num_inputs: int) -> dict[str, Any]:
    """The job record's parameters; the seed is drawn here when absent, so that it is recorded."""
    seed = req.seed if req.seed is not None else draw_seed(DRAWN_SEED_BOUND)
    params = {
        "model_id": req.model_id,
        "mode": req.mode,
        "sigma": req.sigma,
        "n0": req.n0,
        "n": req.n,
        "alpha": req.alpha,
        "bound": req.bound,
        "batch_size": req.batch_size,
        "seed": seed,
        "num_inputs": num_inputs,
        "runtime": req.runtime,
        "precision": req.precision,
    }
    if req.target_radius is not None:
        params["target_radius"] = req.target_radius
    return params


def _samples_per_input(req: CertifyRequest) -> int:
    return req.n if req.mode == "predict" else req.n0 + req.n


def _check_budget(req: CertifyRequest, num_inputs: int, budget: int) -> None:
    """422 when the job would draw more than ``budget`` samples (the most it may: a target-radius
    job's n is its cap per input)."""
    per_input = _samples_per_input(req)
    if num_inputs * per_input > budget:
        what = "n" if req.mode == "predict" else "n0 + n"
        raise _unprocessable(
            f"this job asks for {num_inputs} inputs x {per_input} samples ({what}) = "
            f"{num_inputs * per_input} samples, over this server's budget of {budget} samples "
            "per job (SMOOTHCERT_MAX_JOB_SAMPLES); lower n, or split the inputs into smaller jobs"
        )
