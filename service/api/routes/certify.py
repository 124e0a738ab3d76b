"""``POST /v1/certify``: validate a certify/predict request, save its inputs, queue the job.

The body is JSON (:class:`CertifyRequest`) or multipart: the same fields as form fields, each
number or list as the JSON text of its value (``n=1000``, ``labels=[3, 1]``) and checked as
strictly as in a JSON body, and the inputs as ``inputs`` files, either PNG/JPEG images (one
input each; :mod:`smoothcert.service.core.images` says which, and every header is checked
against the model's input shape before any pixel is decoded) or one ``.npy`` array.
The route parses the body into the typed contract's
:class:`~smoothcert.service.core.contract.CertifyParams` and an input source, and hands them to
:meth:`smoothcert.service.api.submission.Submission.certify`, which holds every rule a job must
pass before it is queued (caps, the model, the inputs, a dataset's range, the sample budget) and
records and queues it. The rate limit, the queue bound, the key's active jobs and
``Idempotency-Key`` are checked before the body is parsed into a job
(:mod:`smoothcert.service.api.limits`); a multipart body's fingerprint is its fields and the
SHA-256 of each file, so it does not depend on the client's boundary.

``?wait=S`` (0 < S <= :data:`MAX_WAIT_S`) holds the answer until the job ends, for at most S
seconds: 200 with the job's record as ``GET /v1/jobs/{id}`` shows it, else the usual 202. The
submission and its wait run on a thread of a small pool of their own
(:data:`MAX_WAITS_PER_PROCESS` threads), never one of the pool that runs the API's other sync
routes, and the wait polls the job's record with backoff (20 ms growing to 250 ms).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, status
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from smoothcert.service.api.access import AccessDep
from smoothcert.service.api.deps import (
    AdmissionDep,
    DatasetsDep,
    JobsDep,
    ModelsDep,
    QueueDep,
    SettingsDep,
    require_certify,
)
from smoothcert.service.api.idempotency import json_content
from smoothcert.service.api.limits import IN_PROGRESS, JOBS_LIMITED, QUEUE_FULL, REUSED_KEY
from smoothcert.service.api.schemas import (
    CertifyRequest,
    Job,
    JobAccepted,
    form_json,
    validate_body,
)
from smoothcert.service.api.submission import (
    DatasetSlice,
    Files,
    InlineInputs,
    Submission,
    unprocessable,
)
from smoothcert.service.core.jobs import TERMINAL, JobRecord, JobStore
from smoothcert.service.core.queue import QUEUE

log = logging.getLogger("smoothcert.service")
# ?wait=S: the longest S, and how many submissions one API process holds waiting at once (each
# on a thread of _WAIT_THREADS; beyond them a submission is answered at once, as without wait).
MAX_WAIT_S = 30.0
MAX_WAITS_PER_PROCESS = 16
_WAITS = threading.BoundedSemaphore(MAX_WAITS_PER_PROCESS)
_WAIT_THREADS = ThreadPoolExecutor(MAX_WAITS_PER_PROCESS, thread_name_prefix="certify-wait")
_FIRST_POLL_S, _LAST_POLL_S = 0.02, 0.25

router = APIRouter(prefix="/v1", tags=["jobs"], dependencies=[Depends(require_certify)])
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
Form = tuple[
    list[tuple[str, str]], list[tuple[str, str, bytes]]
]  # fields; (field, filename, data) per file


@router.post(
    "/certify",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobAccepted,
    openapi_extra={"requestBody": _BODY},
    responses={
        404: {"description": "unknown model or dataset"},
        413: {
            "description": "body too large, inputs over SMOOTHCERT_MAX_DECODED_BYTES_PER_REQUEST "
            "once decoded (counted from their headers), or inputs that would take this API key "
            "past its storage quota (SMOOTHCERT_MAX_STORAGE_BYTES_PER_KEY: datasets, the "
            "inputs of queued and running jobs, and stored certificates)"
        },
        200: {
            "model": Job,
            "description": "with ?wait=S: the job ended within S seconds (succeeded, failed or "
            "canceled: read its status); its record as GET /v1/jobs/{id} shows it",
        },
        422: {
            "description": "invalid parameters or inputs, a job over SMOOTHCERT_MAX_JOB_SAMPLES, "
            f"or wait outside (0, {MAX_WAIT_S:g}]" + REUSED_KEY
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
    access: AccessDep,
    wait: Annotated[
        float | None,
        Query(
            gt=0,
            le=MAX_WAIT_S,
            allow_inf_nan=False,
            description=f"seconds, at most {MAX_WAIT_S:g}: answer 200 with the finished job when "
            "it ends within them, else the usual 202",
        ),
    ] = None,
) -> JSONResponse:
    """Queue a certify (or predict) job; poll ``Location`` for its status and result.

    With ``dataset_id`` instead of inputs (JSON only), the job covers that uploaded dataset in
    chunks of ``SMOOTHCERT_CHUNK_SIZE`` inputs, one task each, which any number of workers share;
    the labels come from the dataset. Chunk i draws its noise from a seed derived from the job's
    seed and i, so the same seed and chunk size give the same rows (service/job_chunks.py).

    With ``?wait=S`` the answer waits until the job ends, for at most S seconds once it is queued:
    200 with the job's record as ``GET /v1/jobs/{id}`` shows it (check its ``status``: succeeded,
    failed or canceled), or the usual 202 when it is still queued or running, so a small PREDICT
    can answer an application directly. One API process holds at most 16
    (``MAX_WAITS_PER_PROCESS``) such waits at once, each on a thread of its own (the pool of the
    other routes is not used), and at most ``SMOOTHCERT_HTTP_MAX_CONCURRENCY`` requests of any
    kind; a submission that finds the 16 taken is answered at once, as without ``wait``. With an
    ``Idempotency-Key``, a repeat answers what the first answered (200 with the record it held,
    or 202), whatever its own ``wait``; while the first still waits, a repeat is the usual 409.
    """
    parse: Callable[[], tuple[CertifyRequest, Files | None]]
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await _read_form(request, settings.max_inputs)
        content, parse = (lambda: _form_content(form)), (lambda: _form_request(form))
    else:
        body = await request.body()
        content, parse = (
            (lambda: json_content(body)),
            (lambda: (validate_body(CertifyRequest, body), None)),
        )

    submission = Submission(settings, jobs, models, datasets, queue, admission, access)
    waiting = wait is not None and _WAITS.acquire(blocking=False)
    ended: list[bool] = []

    def create() -> tuple[JobAccepted | Job, str]:
        req, files = parse()
        accepted = submission.certify(req.certify_params(), _source(req, files), req.radii)
        record = _waited(jobs, accepted.job_id, wait) if waiting and wait else None
        if record is None:
            return accepted, accepted.location
        ended.append(True)
        return Job.model_validate(record.to_dict()), accepted.location

    def answer() -> JSONResponse:
        try:
            return admission.submit(
                content, create, status_code=status.HTTP_202_ACCEPTED, queue=QUEUE
            )
        finally:
            if waiting:
                _WAITS.release()  # here, not in the coroutine: a client that left does not free it

    if waiting:
        call = contextvars.copy_context().run
        response = await asyncio.get_running_loop().run_in_executor(_WAIT_THREADS, call, answer)
    else:
        response = await run_in_threadpool(answer)
    # Admission.submit answers with the status it was given; the body tells a finished job (200)
    # from an accepted one, for the first answer and for its Idempotency-Key replays alike.
    if ended or (response.headers.get("Idempotent-Replayed") and _is_record(response.body)):
        response.status_code = status.HTTP_200_OK
    return response


def _waited(jobs: JobStore, job_id: str, wait_s: float) -> JobRecord | None:
    """The record of job ``job_id`` once it has ended within ``wait_s`` seconds, with its rows;
    None when it has not (or it could not be read: the job is queued all the same, so the answer
    is then the 202)."""
    deadline, delay = time.monotonic() + wait_s, _FIRST_POLL_S
    try:
        while True:
            record = jobs.get(job_id, rows=False)
            if record is None:
                return None
            if record.status in TERMINAL:
                return jobs.get(job_id)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(delay, left))
            delay = min(delay * 1.5, _LAST_POLL_S)
    except Exception as exc:  # Redis away, rows missing: the job exists, answer the 202
        log.warning("waiting for job %s failed, answering 202: %s", job_id, exc)
        return None


def _is_record(body: bytes | memoryview) -> bool:
    """Whether a remembered answer's body is a job's record (a finished wait), not an acceptance."""
    try:
        return "kind" in json.loads(bytes(body))
    except ValueError:
        return False


async def _read_form(request: Request, max_inputs: int) -> Form:
    """The multipart body's text fields and files, in order, read into memory; 422 when malformed."""
    fields: list[tuple[str, str]] = []
    uploads: list[tuple[str, str, bytes]] = []
    try:
        form = await request.form(max_files=max_inputs + 1)
    except (
        StarletteHTTPException
    ) as exc:  # starlette answers 400 to a multipart body it cannot parse
        raise unprocessable(f"malformed multipart body: {exc.detail}") from None
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
            raise unprocessable(f"unexpected file field {key!r}; send images or a .npy as 'inputs'")
        files.append((name, data))
    if not files:
        raise unprocessable("no 'inputs' files: attach PNG/JPEG images or one .npy array")
    return validate_body(CertifyRequest, {**values, "inputs": []}), files


def _form_value(key: str, text: str) -> Any:
    """A non-text form field read as JSON (schemas.form_json); labels and radii must be JSON."""
    value = form_json(text)
    if key in ("labels", "radii") and value is text:
        raise unprocessable(f"{key} must be a JSON list, e.g. [3, 1, 4]")
    return value


def _source(req: CertifyRequest, files: Files | None) -> InlineInputs | DatasetSlice:
    """Where the request's inputs come from: an uploaded dataset's range, or the request itself."""
    if req.dataset_id is not None:
        return DatasetSlice(req.dataset_id, req.skip, req.limit)
    return InlineInputs(req.inputs, files, req.labels, req.names)
