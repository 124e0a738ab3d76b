"""Certificates: a succeeded certify or predict job's signed certificate, the same by its own
digest after the job's record is gone, the report page, and the public keys that verify them.

``GET /v1/jobs/{id}/certificate`` answers the DSSE envelope (the bytes stored, named by their
SHA-256, which the ``X-Certificate-SHA256`` header and ``Location`` give), issuing it on the spot
when the API's background issuer (:mod:`smoothcert.service.core.issuer`) has not yet.
``GET /v1/certificates/{sha256}`` serves it for as long as the data volume keeps it, to the
account that asked for the job or an admin (404 to anyone else, as for an unknown digest).
``DELETE /v1/certificates/{sha256}`` removes one sooner (it counts against the account's storage
quota until then). ``GET /v1/signing-keys`` needs no key: anyone may check a certificate.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, status
from fastapi.responses import HTMLResponse, Response

from smoothcert.service.api.access import AccessDep
from smoothcert.service.api.deps import (
    CertificatesDep,
    IssuerDep,
    JobsDep,
    SigningKeysDep,
    require_jobs,
)
from smoothcert.service.api.limits import Responses
from smoothcert.service.core.certificates import (
    CertificateStore,
    EnvelopeError,
    is_sha256,
    open_envelope,
)
from smoothcert.service.core.issuer import Issuer, NotCertifiable
from smoothcert.service.core.jobs import JOB_ID_FORM
from smoothcert.service.core.signing import SigningKeys, load_public_pem

router = APIRouter(tags=["certificates"])
# The report needs its stylesheet and nothing else: no script, no frame, no form, no other origin.
REPORT_CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
JobId = Annotated[str, Path(description="the id that submitting the job returned: " + JOB_ID_FORM)]
_ENVELOPE: Responses = {
    200: {
        "content": {"application/json": {}},
        "description": "the DSSE envelope of an in-toto statement (docs/certificate.md)",
    }
}
_JOB_404: Responses = {404: {"description": "unknown job (or another account's)"}}
_NOT_YET: Responses = {409: {"description": "the job has not succeeded, or is not certify/predict"}}


def _envelope_response(data: bytes, sha: str) -> Response:
    return Response(
        data,
        media_type="application/json",
        headers={"X-Certificate-SHA256": sha, "Location": f"/v1/certificates/{sha}"},
    )


def _issued(
    issuer: Issuer, store: CertificateStore, jobs, access, job_id: str
) -> tuple[str, bytes]:
    """The job's certificate (its SHA-256 and bytes), issued now if need be; 404/409 otherwise."""
    record = access.job(jobs, job_id)  # 404 unless the caller's (or an admin's)
    try:
        sha = issuer.issue(job_id, record)
    except NotCertifiable as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    data = store.read(sha)
    if data is None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"the certificate of job {job_id} is gone")
    return sha, data


@router.get(
    "/v1/jobs/{job_id}/certificate",
    response_class=Response,
    dependencies=[Depends(require_jobs)],
    responses={**_ENVELOPE, **_JOB_404, **_NOT_YET},
)
def get_job_certificate(
    job_id: JobId,
    jobs: JobsDep,
    access: AccessDep,
    issuer: IssuerDep,
    store: CertificatesDep,
) -> Response:
    """The job's signed certificate (issued when the job succeeded; kept after its record)."""
    sha, data = _issued(issuer, store, jobs, access, job_id)
    return _envelope_response(data, sha)


@router.get(
    "/v1/jobs/{job_id}/report.html",
    response_class=HTMLResponse,
    dependencies=[Depends(require_jobs)],
    responses={**_JOB_404, **_NOT_YET},
)
def get_job_report(
    job_id: JobId,
    jobs: JobsDep,
    access: AccessDep,
    issuer: IssuerDep,
    store: CertificatesDep,
    keys: SigningKeysDep,
):
    """The certificate as a page a person can read and print, with the commands that verify it."""
    from smoothcert.service.api.report import render_report

    sha, data = _issued(issuer, store, jobs, access, job_id)
    statement, keyid = _opened(keys, data)
    return HTMLResponse(
        render_report(statement, sha, keyid), headers={"Content-Security-Policy": REPORT_CSP}
    )


def _opened(keys: SigningKeys, data: bytes) -> tuple[dict[str, Any], str]:
    public = {k.keyid: load_public_pem(k.pem) for k in keys.public_keys()}
    try:
        return open_envelope(json.loads(data), public)
    except (EnvelopeError, ValueError) as exc:
        raise HTTPException(
            status.HTTP_500_INTERNAL_SERVER_ERROR, f"a stored certificate does not verify: {exc}"
        ) from None


@router.get(
    "/v1/certificates/{sha256}",
    response_class=Response,
    dependencies=[Depends(require_jobs)],
    responses={
        **_ENVELOPE,
        404: {"description": "no such certificate (or another account's)"},
    },
)
def get_certificate(
    sha256: Annotated[str, Path(description="the certificate's SHA-256, 64 hex digits")],
    access: AccessDep,
    store: CertificatesDep,
    keys: SigningKeysDep,
) -> Response:
    """A certificate by its digest, for as long as the data volume keeps it (after the job's
    record has expired too, up to SMOOTHCERT_CERTIFICATE_RETENTION_DAYS from when it was issued):
    to the account that asked for the job, or an admin."""
    data, _ = _owned(sha256, access, store, keys)
    return _envelope_response(data, sha256)


@router.delete(
    "/v1/certificates/{sha256}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    dependencies=[Depends(require_jobs)],
    responses={404: {"description": "no such certificate (or another account's)"}},
)
def delete_certificate(
    sha256: Annotated[str, Path(description="the certificate's SHA-256, 64 hex digits")],
    access: AccessDep,
    store: CertificatesDep,
    keys: SigningKeysDep,
    issuer: IssuerDep,
) -> Response:
    """Delete a stored certificate before its retention ends (the account that asked for the job,
    or an admin): it no longer counts against the account's storage quota. While the job's record
    lives, asking for the job's certificate issues a new one."""
    _, owner = _owned(sha256, access, store, keys)
    issuer.forget(sha256, owner)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _owned(
    sha256: str, access: AccessDep, store: CertificateStore, keys: SigningKeys
) -> tuple[bytes, str | None]:
    """Certificate ``sha256``'s bytes and the account it was issued to, when the caller may see
    it (that account or an admin); 404, as for an unknown digest, otherwise."""
    unknown = HTTPException(status.HTTP_404_NOT_FOUND, f"unknown certificate {sha256[:80]!r}")
    data = store.read(sha256) if is_sha256(sha256) else None
    if data is None:
        raise unknown
    statement, _ = _opened(keys, data)
    owner = (statement.get("predicate") or {}).get("requested_by", {}).get("account")
    if not access.owns({"owner": owner}):
        access.hidden("certificate", sha256)
        raise unknown
    return data, owner


@router.get("/v1/signing-keys")
def signing_keys(keys: SigningKeysDep) -> dict[str, list[dict[str, Any]]]:
    """Every public key this service has signed certificates with, the active one first and the
    retired ones after (so a certificate from before a rotation still verifies). No key needed.
    Save the answer as keys.json for ``smoothcert verify --keys keys.json``."""
    return {"keys": [k.to_dict() for k in keys.public_keys()]}
