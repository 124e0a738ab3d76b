"""``/v1/jobs``: the caller's jobs page by page; ``/v1/jobs/{id}``: status and result, the result as
Cohen-style TSV, cancellation, and two pictures for people (noisy copies of an input as PNG, the
certified-accuracy curve as SVG).

Every route here shows the caller's account's jobs only (a key with the admin scope sees every
job): another account's job id is an unknown job, 404 (:mod:`smoothcert.service.api.access`).
The list shows them newest first, from the indexes :mod:`smoothcert.service.core.jobs` keeps;
its cursor is an index entry in base64url, opaque to clients.

A job id is checked to be one (a UUID, :func:`~smoothcert.service.core.jobs.check_job_id`) before
it reaches Redis: anything else is an unknown job (404), so a path such as ``<id>:cancel`` or
``<id>:chunk_results`` never names one of the job's internal keys.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Path, Query, status
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from smoothcert.service.api.access import AccessDep
from smoothcert.service.api.deps import CallerDep, JobsDep, SettingsDep, require_jobs
from smoothcert.service.api.limits import Responses
from smoothcert.service.api.pictures import accuracy_curve_svg, sample_strip_png
from smoothcert.service.api.schemas import Job, JobKind, JobList, JobStatus
from smoothcert.service.core.jobs import (
    CANCELED,
    JOB_ID_FORM,
    QUEUED,
    SAMPLE_ROWS,
    SUCCEEDED,
    TERMINAL,
    JobRecord,
    is_index_entry,
)
from smoothcert.service.core.storage_quota import drop_job_inputs
from smoothcert.service.core.tsv import format_tsv

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_jobs)])
_NOT_FOUND: Responses = {
    404: {"description": "unknown job id (or its record expired, or another account's job)"}
}
JobId = Annotated[str, Path(description="the id that submitting the job returned: " + JOB_ID_FORM)]


def _cursor_entry(cursor: str) -> str:
    """The index entry a cursor stands for; 422 for anything a previous page did not return."""
    try:
        entry = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        entry = ""
    if not is_index_entry(entry):
        raise HTTPException(
            422, f"invalid cursor {cursor[:80]!r}: pass the next_cursor of a previous page as it is"
        )
    return entry


def _listed(record: JobRecord) -> Job:
    """The record as ``GET /v1/jobs/{id}`` shows it, without the result's rows."""
    job = record.to_dict()
    if isinstance(job["result"], dict) and "results" in job["result"]:
        job["result"] = {**job["result"], "results": None}
    return Job.model_validate(job)


@router.get(
    "", response_model=JobList, responses={422: {"description": "invalid filter, limit or cursor"}}
)
def list_jobs(
    jobs: JobsDep,
    caller: CallerDep,
    status_: Annotated[
        JobStatus | None, Query(alias="status", description="only jobs in this state")
    ] = None,
    kind: Annotated[
        JobKind | None,
        Query(
            description="only jobs of this kind (a dataset job is a certify or "
            "predict job whose params name a dataset_id)"
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="at most this many jobs")] = 20,
    cursor: Annotated[
        str | None, Query(max_length=200, description="the next_cursor of the previous page")
    ] = None,
) -> JobList:
    """The jobs of this key's account, newest first (an admin key sees every job, and model
    checks); ``result`` without its rows (``result.results`` is null: read them from ``GET
    /v1/jobs/{id}``). Follow ``next_cursor`` until it is null; with a filter, a page may hold
    fewer than ``limit`` jobs (even none) and still have a next one."""
    owner = None if caller.admin else caller.account
    after = None if cursor is None else _cursor_entry(cursor)
    records, last = jobs.recent(owner, status=status_, kind=kind, limit=limit, after=after)
    next_cursor = (
        None if last is None else base64.urlsafe_b64encode(last.encode()).decode().rstrip("=")
    )
    return JobList(jobs=[_listed(r) for r in records], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=Job, responses=_NOT_FOUND)
def get_job(job_id: JobId, jobs: JobsDep, access: AccessDep) -> Job:
    """Status, progress (in samples) and, once succeeded, the result."""
    return Job.model_validate(access.job(jobs, job_id).to_dict())


@router.get(
    "/{job_id}/results.tsv",
    response_class=PlainTextResponse,
    responses={**_NOT_FOUND, 409: {"description": "the job has not succeeded"}},
)
def get_results_tsv(job_id: JobId, jobs: JobsDep, access: AccessDep) -> PlainTextResponse:
    """The results in the CLI's TSV: Cohen's columns first, then ours."""

    record = access.job(jobs, job_id)
    if record.status != SUCCEEDED:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"job {job_id} is {record.status}, not succeeded"
        )
    if record.kind not in ("certify", "predict"):
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"job {job_id} is a {record.kind} job, without results"
        )
    rows = record.result["results"]
    # By row index, not position: a dataset job's rows are numbered from its skip.
    labels = (
        None if rows and rows[0].get("label") is None else {r["index"]: r["label"] for r in rows}
    )
    return PlainTextResponse(format_tsv(rows, labels), media_type="text/tab-separated-values")


@router.delete(
    "/{job_id}",
    response_model=Job,
    responses={
        **_NOT_FOUND,
        202: {"description": "cancel requested; the job stops between batches"},
        409: {"description": "the job already finished"},
    },
)
def cancel_job(job_id: JobId, jobs: JobsDep, settings: SettingsDep, access: AccessDep):
    """Cancel: a queued job at once (200), a running one between two batches (202). A canceled
    job's saved inputs are deleted at once, and no longer count against the key's storage quota;
    a running job's worker deletes them when it stops."""
    record = access.job(jobs, job_id)
    if record.status in TERMINAL and record.status != CANCELED:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} already {record.status}")
    if record.status != CANCELED:
        jobs.request_cancel(job_id)
        record = access.job(jobs, job_id)
    if record.status == CANCELED:  # no worker runs it, nor will: its inputs can go
        drop_job_inputs(jobs.redis, settings.jobs_dir, job_id)
    code = status.HTTP_202_ACCEPTED if record.status not in TERMINAL else status.HTTP_200_OK
    return JSONResponse(Job.model_validate(record.to_dict()).model_dump(), status_code=code)


_PICTURE: Responses = {
    404: {"description": "unknown job, or nothing kept for that row"},
    409: {
        "description": "the job has not run yet (or, for the curve, has no labels or is not finished)"
    },
}


@router.get(
    "/{job_id}/samples.png",
    response_class=Response,
    responses={
        **_PICTURE,
        200: {"content": {"image/png": {}}, "description": "the noisy copies side by side"},
    },
)
def get_samples_png(
    job_id: JobId,
    jobs: JobsDep,
    access: AccessDep,
    row: Annotated[int, Query(ge=0, description="the row's index (as in the result's rows)")] = 0,
) -> Response:
    """Up to 8 noisy copies of input ``row`` as the classifier saw them (the job's σ, clipped to
    [0, 1] for display), side by side in one PNG, upscaled so that a small digit is visible. The
    worker keeps them when the job starts, for the job's first 16 rows (fewer for large inputs),
    with a seed of their own: they are not the copies that were counted, but drawn alike. They
    are kept for ``SMOOTHCERT_SAMPLES_TTL_S`` (a day unless configured), then deleted."""
    record = access.job(jobs, job_id)
    if record.kind not in ("certify", "predict"):
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"job {job_id} is a {record.kind} job: only certify and predict jobs keep noisy copies",
        )
    kept = jobs.samples(job_id, row)
    if kept is not None:
        copies = np.load(io.BytesIO(kept), allow_pickle=False)
        return Response(sample_strip_png(copies), media_type="image/png")
    if record.status == QUEUED:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"job {job_id} is queued: its noisy copies are kept when it starts",
        )
    job = record.certify_job()
    first = job.first_row
    last = first + min(SAMPLE_ROWS, job.num_inputs) - 1
    ttl = jobs.files.samples_ttl_s if jobs.files is not None else None
    started = record.started_at
    if ttl is not None and started is not None and first <= row <= last:
        if time.time() - started > ttl:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                f"the noisy copies of job {job_id} were deleted: they are kept for {ttl} s "
                "after the job starts (SMOOTHCERT_SAMPLES_TTL_S)",
            )
    raise HTTPException(
        status.HTTP_404_NOT_FOUND,
        f"no noisy copies kept for row {row} of job {job_id}: they are kept "
        f"for its first rows only (at most {first} to {last})",
    )


@router.get(
    "/{job_id}/curve.svg",
    response_class=Response,
    responses={
        **_PICTURE,
        200: {"content": {"image/svg+xml": {}}, "description": "certified accuracy against radius"},
    },
)
def get_curve_svg(job_id: JobId, jobs: JobsDep, access: AccessDep) -> Response:
    """The certified-accuracy curve of a succeeded certify job with labels (given with the inputs,
    or a dataset's): the share of inputs predicted right with a radius of at least r, against r,
    with the radius cap (the largest radius n and α allow) marked."""
    record = access.job(jobs, job_id)
    if record.status != SUCCEEDED:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"job {job_id} is {record.status}: the curve needs a succeeded certify job",
        )
    rows = (record.result or {}).get("results") or []
    if record.kind != "certify" or not rows or "radius" not in rows[0]:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"job {job_id} is a {record.kind} job: a curve needs certified radii (a certify job)",
        )
    if rows[0].get("label") is None:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"job {job_id} has no labels: submit labels (or certify a "
            "dataset) to get a certified-accuracy curve",
        )
    p = record.certify_job().params
    title = f"certified accuracy, {len(rows)} inputs, σ={p.sigma}, n={p.n}, α={p.alpha}"
    svg = accuracy_curve_svg(rows, rows[0].get("radius_cap"), title)
    return Response(svg, media_type="image/svg+xml")
