"""``POST /v1/train`` and ``POST /v1/train/denoiser`` (admin key): check a training request and
queue it on the ``train`` queue.

Everything a trainer would refuse for its parameters is refused here first, with a 4xx that says
why: the values (TrainConfig's own checks, 422), the dataset (404 when unknown) and whether its
images fit the architecture (422). The configuration, with its seed drawn here when absent, is
built once and travels in the message, so a redelivered task rebuilds the very same run and
resumes from its checkpoint. The job's ``progress`` counts finished epochs. The rate limit, the
``train`` queue's bound, the key's active jobs and ``Idempotency-Key`` apply (:mod:`smoothcert.service.api.limits`). The
route reads the JSON body itself, as ``POST /v1/certify`` does, so that those come before the
body is validated and an undecodable body is a 422 like any other invalid one.
"""

from __future__ import annotations

import contextlib

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from smoothcert.service.api.access import Access, AccessDep
from smoothcert.service.api.deps import (
    AdmissionDep,
    DatasetsDep,
    JobsDep,
    ModelsDep,
    QueueDep,
    require_key,
    require_train,
)
from smoothcert.service.api.idempotency import json_content
from smoothcert.service.api.limits import IN_PROGRESS, JOBS_LIMITED, QUEUE_FULL, REUSED_KEY
from smoothcert.service.api.schemas import JobAccepted, validate_body
from smoothcert.service.api.train_schemas import (
    DatasetUnknown,
    DenoiserTrainRequest,
    ModelUnknown,
    TrainRequest,
    check_denoiser_classifier,
    check_fits,
    check_init_denoiser,
    dataset_shape,
)
from smoothcert.service.core.contract import TrainTask
from smoothcert.service.core.jobs import new_job_id
from smoothcert.service.core.params import DRAWN_SEED_BOUND, draw_seed
from smoothcert.service.core.queue import TRAIN_DENOISER_TASK, TRAIN_QUEUE, TRAIN_TASK
from smoothcert.service.core.train_config import STABILITY_NEEDS_CLASSIFIER, TrainingError

router = APIRouter(prefix="/v1", tags=["training"], dependencies=[Depends(require_key)])
_BODY = {
    "required": True,
    "content": {"application/json": {"schema": TrainRequest.model_json_schema()}},
}


@router.post(
    "/train",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobAccepted,
    dependencies=[Depends(require_train)],
    openapi_extra={"requestBody": _BODY},
    responses={
        404: {"description": "unknown dataset"},
        413: {"description": "body too large"},
        422: {
            "description": "invalid parameters, or the dataset does not fit the architecture"
            + REUSED_KEY
        },
        **IN_PROGRESS,
        **JOBS_LIMITED,
        **QUEUE_FULL,
    },
)
async def submit_training(
    request: Request,
    jobs: JobsDep,
    datasets: DatasetsDep,
    queue: QueueDep,
    admission: AdmissionDep,
    access: AccessDep,
) -> JSONResponse:
    """Queue a training job; poll ``Location``: ``progress`` counts epochs, ``result.history`` grows
    by one entry per epoch, and the succeeded result names the registered ``model_id``."""
    body = await request.body()
    return await run_in_threadpool(
        admission.submit,
        lambda: json_content(body),
        lambda: _enqueue(
            validate_body(TrainRequest, body), jobs, datasets, queue, admission, access
        ),
        status_code=status.HTTP_202_ACCEPTED,
        queue=TRAIN_QUEUE,
    )


def _enqueue(
    req: TrainRequest, jobs, datasets, queue, admission, access: Access
) -> tuple[JobAccepted, str]:
    seed = req.seed if req.seed is not None else draw_seed(DRAWN_SEED_BOUND)
    try:
        config = req.config(seed)
    except TrainingError as exc:
        raise HTTPException(422, str(exc)) from None
    try:
        input_shape, num_classes = dataset_shape(
            req.dataset, access.visible_dataset(datasets, req.dataset)
        )
        check_fits(config.arch, input_shape, num_classes, req.dataset)
    except DatasetUnknown as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None

    job_id = new_job_id()
    task = TrainTask("train", config.to_dict(), req.dataset, req.name)
    with admission.room(TRAIN_QUEUE, 1):
        try:
            jobs.create(
                job_id,
                task.kind,
                task.record_params(),
                total=config.epochs,
                owner=admission.caller,
                max_active=admission.max_active,
            )
            queue.send_task(TRAIN_TASK, args=[job_id, task.to_message()], task_id=job_id)
        except Exception:
            with contextlib.suppress(Exception):
                jobs.fail(job_id, "the job could not be queued")
            raise  # Redis or broker errors become 503 (app.py); ActiveJobsExceeded 429 (limits.py)
    accepted = JobAccepted(job_id=job_id, status="queued", location=f"/v1/jobs/{job_id}")
    return accepted, accepted.location


_DENOISER_BODY = {
    "required": True,
    "content": {"application/json": {"schema": DenoiserTrainRequest.model_json_schema()}},
}


@router.post(
    "/train/denoiser",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobAccepted,
    dependencies=[Depends(require_train)],
    openapi_extra={"requestBody": _DENOISER_BODY},
    responses={
        404: {"description": "unknown dataset or classifier"},
        413: {"description": "body too large"},
        422: {
            "description": "invalid parameters, stability without a classifier, or a classifier "
            "that does not fit" + REUSED_KEY
        },
        **IN_PROGRESS,
        **JOBS_LIMITED,
        **QUEUE_FULL,
    },
)
async def submit_denoiser_training(
    request: Request,
    jobs: JobsDep,
    datasets: DatasetsDep,
    models: ModelsDep,
    queue: QueueDep,
    admission: AdmissionDep,
    access: AccessDep,
) -> JSONResponse:
    """Queue the training of a denoiser on the ``train`` queue; the succeeded result names the
    registered denoiser's ``model_id``, ready for ``POST /v1/models/pipelines``."""
    body = await request.body()
    return await run_in_threadpool(
        admission.submit,
        lambda: json_content(body),
        lambda: _enqueue_denoiser(
            validate_body(DenoiserTrainRequest, body),
            jobs,
            datasets,
            models,
            queue,
            admission,
            access,
        ),
        status_code=status.HTTP_202_ACCEPTED,
        queue=TRAIN_QUEUE,
    )


def _enqueue_denoiser(
    req: DenoiserTrainRequest, jobs, datasets, models, queue, admission, access: Access
) -> tuple[JobAccepted, str]:
    seed = req.seed if req.seed is not None else draw_seed(DRAWN_SEED_BOUND)
    try:
        config = req.config(seed)
    except TrainingError as exc:
        raise HTTPException(422, str(exc)) from None
    if config.needs_classifier and req.classifier is None:
        raise HTTPException(422, STABILITY_NEEDS_CLASSIFIER)
    try:
        input_shape, _ = dataset_shape(req.dataset, access.visible_dataset(datasets, req.dataset))
        if req.classifier is not None:
            check_denoiser_classifier(
                access.visible_model(models, req.classifier),
                req.classifier,
                input_shape,
                req.dataset,
            )
        if req.init is not None:
            check_init_denoiser(
                access.visible_model(models, req.init), req.init, input_shape, config
            )
    except (DatasetUnknown, ModelUnknown) as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None

    job_id = new_job_id()
    task = TrainTask(
        "train_denoiser", config.to_dict(), req.dataset, req.name, req.classifier, req.init
    )
    with admission.room(TRAIN_QUEUE, 1):
        try:
            jobs.create(
                job_id,
                task.kind,
                task.record_params(),
                total=config.total_epochs,  # the MSE stage's epochs too, when there is one
                owner=admission.caller,
                max_active=admission.max_active,
            )
            queue.send_task(TRAIN_DENOISER_TASK, args=[job_id, task.to_message()], task_id=job_id)
        except Exception:
            with contextlib.suppress(Exception):
                jobs.fail(job_id, "the job could not be queued")
            raise
    accepted = JobAccepted(job_id=job_id, status="queued", location=f"/v1/jobs/{job_id}")
    return accepted, accepted.location
