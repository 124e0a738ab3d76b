"""Who may see and use what: every route that names a job, dataset or model by id reads it here.

A record belongs to the account in its ``owner`` field (:mod:`smoothcert.service.core.owners`).
A key sees its own account's jobs, datasets and models, and every public model; a key with the
``admin`` scope sees everything. Anything else is answered exactly as an id that does not exist
(404, the same text), so an id tells a caller nothing about another account; the refusal is
written to the audit log with the account that asked. A public model that is not the caller's
may be used (certify, a pipeline's part, a training job's classifier) but not changed: changing
or deleting it is 403, since its existence is no secret.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status

from smoothcert.service.api import audit
from smoothcert.service.api.deps import Caller, CallerDep
from smoothcert.service.core.dataset_store import DatasetStore
from smoothcert.service.core.jobs import JOB_ID_FORM, JobRecord, JobStore, is_job_id
from smoothcert.service.core.keys import account_of
from smoothcert.service.core.model_store import PUBLIC, ModelStore, visibility


@dataclass(frozen=True)
class Access:
    """The caller of one request, and what it may read and use."""

    request: Request
    caller: Caller

    def owns(self, record: Mapping[str, Any] | JobRecord) -> bool:
        """Whether the record is the caller's account's (or the caller is an admin)."""
        owner = record.owner if isinstance(record, JobRecord) else record.get("owner")
        return self.caller.admin or account_of(owner) == self.caller.account

    def may_use(self, model: Mapping[str, Any]) -> bool:
        """Whether the caller may run ``model``: its own, a public one, or any for an admin."""
        return self.owns(model) or visibility(model) == PUBLIC

    def hidden(self, kind: str, record_id: str) -> None:
        """Write the audit line of a 404 given for another account's ``kind``."""
        audit.refused(
            self.request,
            404,
            f"{kind} {record_id} belongs to another account",
            self.caller.account,
            self.caller.key_id,
        )

    def job(self, jobs: JobStore, job_id: str) -> JobRecord:
        """The caller's job ``job_id``; 404 for a malformed, unknown or another account's id."""
        if not is_job_id(job_id):
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                f"unknown job {job_id[:80]!r}: job ids are {JOB_ID_FORM}, as submitting a job "
                "returns",
            )
        record = jobs.get(job_id)
        unknown = f"unknown job {job_id!r}"
        if record is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, unknown)
        if not self.owns(record):
            self.hidden("job", job_id)
            raise HTTPException(status.HTTP_404_NOT_FOUND, unknown)
        return record

    def visible_dataset(self, datasets: DatasetStore, dataset_id: str) -> dict[str, Any] | None:
        """The caller's dataset ``dataset_id``, or None, as for an unknown id, when there is none
        or it is another account's (audited): for a route that also takes built-in names."""
        meta = datasets.get(dataset_id)
        if meta is not None and not self.owns(meta):
            self.hidden("dataset", dataset_id)
            return None
        return meta

    def dataset(self, datasets: DatasetStore, dataset_id: str) -> dict[str, Any]:
        """The caller's dataset ``dataset_id``; 404 for an unknown or another account's id."""
        meta = self.visible_dataset(datasets, dataset_id)
        if meta is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown dataset {dataset_id!r}")
        return meta

    def visible_model(self, models: ModelStore, model_id: str) -> dict[str, Any] | None:
        """A ready model the caller may use (its own, or public), or None, as for an unknown id
        (audited when it is another account's private model)."""
        meta = models.get(model_id)
        if meta is not None and not self.may_use(meta):
            self.hidden("model", model_id)
            return None
        return meta

    def model(self, models: ModelStore, model_id: str, role: str = "model") -> dict[str, Any]:
        """A ready model the caller may use; 404 otherwise. ``role`` names it in the message
        ("denoiser model", "classifier model", ...)."""
        meta = self.visible_model(models, model_id)
        if meta is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown {role} {model_id!r}")
        return meta

    def own_model(self, models: ModelStore, model_id: str) -> dict[str, Any]:
        """A model the caller may change or delete: 404 when it may not even see it, 403 when it
        is another account's public model."""
        meta = self.model(models, model_id)
        if not self.owns(meta):
            detail = (
                f"model {model_id} is a public model of account {account_of(meta.get('owner'))!r}; "
                "only that account or the admin may change or delete it"
            )
            audit.refused(self.request, 403, detail, self.caller.account, self.caller.key_id)
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail)
        return meta


def get_access(request: Request, caller: CallerDep) -> Access:
    return Access(request, caller)


AccessDep = Annotated[Access, Depends(get_access)]
