"""``/v1/jobs/{id}``: status and result, the result as Cohen-style TSV, and cancellation.

A job id is checked to be one (a UUID, :func:`~smoothcert.service.core.jobs.check_job_id`) before
it reaches Redis: anything else is an unknown job (404), so a path such as ``<id>:cancel`` or
``<id>:chunk_results`` never names one of the job's internal keys.
"""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, status
from fastapi.responses import JSONResponse, PlainTextResponse

from smoothcert.service.api.deps import JobsDep, require_key
from smoothcert.service.api.schemas import Job
from smoothcert.service.core.jobs import (
    CANCELED,
    JOB_ID_FORM,
    SUCCEEDED,
    TERMINAL,
    JobRecord,
    JobStore,
    is_job_id,
)
from smoothcert.service.core.tsv import format_tsv

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_key)])
_NOT_FOUND = {404: {"description": "unknown job id (or its record expired)"}}
JobId = Annotated[str, Path(description="the id that submitting the job returned: " + JOB_ID_FORM)]


def _record(jobs: JobStore, job_id: str) -> JobRecord:
    if not is_job_id(job_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            f"unknown job {job_id[:80]!r}: job ids are {JOB_ID_FORM}, as submitting a job returns")
    record = jobs.get(job_id)
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown job {job_id!r}")
    return record


@router.get("/{job_id}", response_model=Job, responses=_NOT_FOUND)
def get_job(job_id: JobId, jobs: JobsDep) -> Job:
    """Status, progress (in samples) and, once succeeded, the result."""
    return Job.model_validate(_record(jobs, job_id).to_dict())


@router.get("/{job_id}/results.tsv", response_class=PlainTextResponse,
            responses={**_NOT_FOUND, 409: {"description": "the job has not succeeded"}})
def get_results_tsv(job_id: JobId, jobs: JobsDep) -> PlainTextResponse:
    """The results in the CLI's TSV: Cohen's columns first, then ours."""

    record = _record(jobs, job_id)
    if record.status != SUCCEEDED:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} is {record.status}, not succeeded")
    if record.kind not in ("certify", "predict"):
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} is a {record.kind} job, without results")
    rows = record.result["results"]
    # By row index, not position: a dataset job's rows are numbered from its skip.
    labels = None if rows and rows[0].get("label") is None else {r["index"]: r["label"] for r in rows}
    return PlainTextResponse(format_tsv(rows, labels), media_type="text/tab-separated-values")


@router.delete("/{job_id}", response_model=Job,
               responses={**_NOT_FOUND, 202: {"description": "cancel requested; the job stops between batches"},
                          409: {"description": "the job already finished"}})
def cancel_job(job_id: JobId, jobs: JobsDep):
    """Cancel: a queued job at once (200), a running one between two batches (202)."""
    record = _record(jobs, job_id)
    if record.status in TERMINAL and record.status != CANCELED:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} already {record.status}")
    if record.status != CANCELED:
        jobs.request_cancel(job_id)
        record = _record(jobs, job_id)
    code = status.HTTP_202_ACCEPTED if record.status not in TERMINAL else status.HTTP_200_OK
    return JSONResponse(Job.model_validate(record.to_dict()).model_dump(), status_code=code)

