"""``/v1/datasets``: upload, list, show and delete datasets to certify as chunked jobs.

Any valid key may use these routes (the user key suffices, unlike model upload): a dataset is
data to certify, like the ``inputs`` of ``POST /v1/certify``, and nothing in it is ever run or
unpickled. The upload is an ``.npz`` with ``x`` (N, C, H, W; floats in [0, 1], or uint8 pixels,
scaled by 1/255) and ``y`` (N integer labels), checked as :mod:`smoothcert.service.core.dataset_files`
describes: 413 past the file or unzipped size caps, 422 with a message for anything else.
Deleting a dataset makes the queued chunks of jobs over it fail with a message, and frees the
storage it took. What a key's datasets store counts against ``SMOOTHCERT_MAX_STORAGE_BYTES_PER_KEY``
(413 beyond; :meth:`~smoothcert.service.api.limits.Limits.storage`); integer pixels are stored as
uploaded, so an upload never stores more than x and y unzipped. An upload counts against the
caller's rate limit and takes an ``Idempotency-Key`` (fingerprint: the name, the
file name and the file's SHA-256), so a retried upload does not store the dataset twice.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, HTTPException, Response, UploadFile, status
from fastapi.responses import JSONResponse

from smoothcert.service.api.body_limit import UnparsableBodyRoute
from smoothcert.service.api.deps import (
    AdmissionDep,
    Credentials,
    DatasetsDep,
    LimitsDep,
    Role,
    SettingsDep,
    require_key,
)
from smoothcert.service.api.idempotency import file_sha256
from smoothcert.service.api.limits import (
    IN_PROGRESS,
    RATE_LIMITED,
    REUSED_KEY,
    Responses,
    caller_id,
)
from smoothcert.service.api.schemas import DatasetRecord
from smoothcert.service.core.dataset_files import DatasetFileError, DatasetTooLarge

router = APIRouter(
    prefix="/v1/datasets",
    tags=["datasets"],
    dependencies=[Depends(require_key)],
    route_class=UnparsableBodyRoute,
)  # a body that cannot be parsed is 422, not 400
_NOT_FOUND: Responses = {404: {"description": "unknown dataset"}}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetRecord,
    responses={
        413: {
            "description": "file, or x and y unzipped, too large; or over the key's storage "
            "quota (SMOOTHCERT_MAX_STORAGE_BYTES_PER_KEY)"
        },
        422: {"description": "not a usable .npz dataset" + REUSED_KEY},
        **IN_PROGRESS,
        **RATE_LIMITED,
    },
)
def upload_dataset(
    settings: SettingsDep,
    datasets: DatasetsDep,
    admission: AdmissionDep,
    file: Annotated[UploadFile, File(description=".npz (numpy.savez) with x and y")],
    name: Annotated[str | None, Form(max_length=200)] = None,
) -> JSONResponse:
    """Check and store an ``.npz`` dataset; answer its record (``id`` is the ``dataset_id`` to certify)."""

    def content() -> dict:
        return {"name": name, "filename": file.filename, "sha256": file_sha256(file.file)}

    def create() -> tuple[DatasetRecord, str]:
        record = _store(settings, datasets, file, name, admission)
        return record, f"/v1/datasets/{record.id}"

    return admission.submit(content, create, status_code=status.HTTP_201_CREATED, queue=None)


def _store(settings, datasets, file: UploadFile, name: str | None, admission) -> DatasetRecord:
    try:
        meta = datasets.add(
            file.file,
            file.filename or "dataset.npz",
            name,
            max_bytes=settings.max_dataset_bytes,
            max_unpacked_bytes=settings.max_dataset_unpacked_bytes,
            owner=admission.caller,
            admit=admission.storage(datasets),
        )
    except DatasetTooLarge as exc:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, str(exc)) from None
    except DatasetFileError as exc:
        raise HTTPException(422, str(exc)) from None
    return DatasetRecord.model_validate(meta)


@router.get("", response_model=list[DatasetRecord])
def list_datasets(datasets: DatasetsDep) -> list[DatasetRecord]:
    """Every dataset, oldest first."""
    return [DatasetRecord.model_validate(d) for d in datasets.list()]


@router.get("/{dataset_id}", response_model=DatasetRecord, responses=_NOT_FOUND)
def get_dataset(dataset_id: str, datasets: DatasetsDep) -> DatasetRecord:
    meta = datasets.get(dataset_id)
    if meta is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown dataset {dataset_id!r}")
    return DatasetRecord.model_validate(meta)


@router.delete(
    "/{dataset_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={**_NOT_FOUND, 403: {"description": "the dataset was uploaded with another key"}},
)
def delete_dataset(
    dataset_id: str, datasets: DatasetsDep, limits: LimitsDep, role: Role, creds: Credentials
) -> Response:
    """Remove the dataset's files; what they took no longer counts against its key's storage quota.
    Only the key that uploaded it, or the admin key, may (403 otherwise)."""
    meta = datasets.get(dataset_id)
    if (
        meta
        and meta.get("owner")
        and role != "admin"
        and creds is not None
        and caller_id(creds.credentials) != meta["owner"]
    ):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"dataset {dataset_id} was uploaded with another key; only "
            "that key or the admin key (SMOOTHCERT_ADMIN_KEY) may delete it",
        )
    if not datasets.delete(dataset_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown dataset {dataset_id!r}")
    if meta and meta.get("owner"):
        limits.forget_storage(meta["owner"], dataset_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
