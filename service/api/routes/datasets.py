"""``/v1/datasets``: upload, list, show and delete datasets to certify as chunked jobs.

A key with the ``certify`` scope may use these routes; each shows the caller's account's
datasets only (an admin key: every dataset), another account's id being an unknown dataset (404,
:mod:`smoothcert.service.api.access`). A dataset is
data to certify, like the ``inputs`` of ``POST /v1/certify``, and nothing in it is ever run or
unpickled. The upload is an ``.npz`` with ``x`` (N, C, H, W; floats in [0, 1], or uint8 pixels,
scaled by 1/255) and ``y`` (N integer labels), checked as :mod:`smoothcert.service.core.dataset_files`
describes: 413 past the file or unzipped size caps, 422 with a message for anything else.
Deleting a dataset makes the queued chunks of jobs over it fail with a message, and frees the
storage it took. What a key's datasets take on disk (in whole blocks of the file system:
``disk_bytes``) counts against ``SMOOTHCERT_MAX_STORAGE_BYTES_PER_KEY`` (413 beyond;
:meth:`~smoothcert.service.api.limits.Limits.storage`), and a key keeps at most
``SMOOTHCERT_MAX_DATASETS_PER_KEY`` datasets (413 beyond); integer pixels are stored as uploaded,
so an upload never stores more than x and y unzipped. The list pages through the datasets newest
first, as ``GET /v1/jobs`` does (``limit``, and ``cursor``: the previous page's ``next_cursor``),
from the index :mod:`smoothcert.service.core.dataset_index` keeps, without reading every record.
A name (or the file name it defaults to) with a control or format character is refused (422).
An upload counts against the caller's rate limit and takes an ``Idempotency-Key`` (fingerprint:
the name, the file name and the file's SHA-256), so a retried upload does not store the dataset
twice.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated

from fastapi import (
    APIRouter,
    Depends,
    File,
    Form,
    HTTPException,
    Query,
    Response,
    UploadFile,
    status,
)
from fastapi.responses import JSONResponse

from smoothcert.service.api.access import AccessDep
from smoothcert.service.api.body_limit import UnparsableBodyRoute
from smoothcert.service.api.deps import (
    AdmissionDep,
    CallerDep,
    DatasetsDep,
    LimitsDep,
    SettingsDep,
    require_certify,
)
from smoothcert.service.api.idempotency import file_sha256
from smoothcert.service.api.limits import (
    IN_PROGRESS,
    RATE_LIMITED,
    REUSED_KEY,
    Responses,
)
from smoothcert.service.api.schemas import DatasetList, DatasetRecord, Name
from smoothcert.service.core.dataset_files import DatasetFileError, DatasetTooLarge
from smoothcert.service.core.dataset_index import is_listing_entry
from smoothcert.service.core.dataset_store import TooManyDatasets
from smoothcert.service.core.keys import account_of

router = APIRouter(
    prefix="/v1/datasets",
    tags=["datasets"],
    dependencies=[Depends(require_certify)],
    route_class=UnparsableBodyRoute,
)  # a body that cannot be parsed is 422, not 400
_NOT_FOUND: Responses = {404: {"description": "unknown dataset (or another account's)"}}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetRecord,
    responses={
        413: {
            "description": "file, or x and y unzipped, too large; or over the key's storage "
            "quota (SMOOTHCERT_MAX_STORAGE_BYTES_PER_KEY) or its most datasets "
            "(SMOOTHCERT_MAX_DATASETS_PER_KEY)"
        },
        422: {
            "description": "not a usable .npz dataset, or a name (or file name) with a control "
            "character" + REUSED_KEY
        },
        **IN_PROGRESS,
        **RATE_LIMITED,
    },
)
def upload_dataset(
    settings: SettingsDep,
    datasets: DatasetsDep,
    admission: AdmissionDep,
    file: Annotated[UploadFile, File(description=".npz (numpy.savez) with x and y")],
    name: Annotated[Name | None, Form()] = None,
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
            max_count=settings.max_datasets_per_key,
        )
    except (DatasetTooLarge, TooManyDatasets) as exc:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, str(exc)) from None
    except DatasetFileError as exc:
        raise HTTPException(422, str(exc)) from None
    return _shown(meta)


def _shown(meta: dict) -> DatasetRecord:
    """The record as the routes answer it, its owner named (``default`` for one from before)."""
    return DatasetRecord.model_validate({**meta, "owner": account_of(meta.get("owner"))})


@router.get(
    "", response_model=DatasetList, responses={422: {"description": "invalid limit or cursor"}}
)
def list_datasets(
    datasets: DatasetsDep,
    caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=100, description="at most this many datasets")] = 20,
    cursor: Annotated[
        str | None, Query(max_length=200, description="the next_cursor of the previous page")
    ] = None,
) -> DatasetList:
    """The account's datasets (an admin key: every dataset), newest first. Follow
    ``next_cursor`` until it is null."""
    after = None if cursor is None else _cursor_entry(cursor)
    account = None if caller.admin else caller.account
    records, last = datasets.page(after, limit, account)
    next_cursor = (
        None if last is None else base64.urlsafe_b64encode(last.encode()).decode().rstrip("=")
    )
    return DatasetList(datasets=[_shown(r) for r in records], next_cursor=next_cursor)


def _cursor_entry(cursor: str) -> str:
    """The index entry a cursor stands for; 422 for anything a previous page did not return."""
    try:
        entry = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        entry = ""
    if not is_listing_entry(entry):
        raise HTTPException(
            422, f"invalid cursor {cursor[:80]!r}: pass the next_cursor of a previous page as it is"
        )
    return entry


@router.get("/{dataset_id}", response_model=DatasetRecord, responses=_NOT_FOUND)
def get_dataset(dataset_id: str, datasets: DatasetsDep, access: AccessDep) -> DatasetRecord:
    return _shown(access.dataset(datasets, dataset_id))


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT, responses=_NOT_FOUND)
def delete_dataset(
    dataset_id: str, datasets: DatasetsDep, limits: LimitsDep, access: AccessDep
) -> Response:
    """Remove the dataset's files; what they took no longer counts against its account's storage
    quota."""
    meta = access.dataset(datasets, dataset_id)
    if not datasets.delete(dataset_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown dataset {dataset_id!r}")
    if meta.get("owner"):
        limits.forget_storage(meta["owner"], dataset_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
