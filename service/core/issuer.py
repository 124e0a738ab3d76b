"""Issuing certificates: an API process turns a succeeded certify or predict job into a signed
certificate on the data volume (:mod:`smoothcert.service.core.certificates`).

What a certificate binds comes from what the API recorded itself, not from the worker: the model's
digest (computed at upload), the inputs' digests (computed from the inputs as the API decoded them
when it accepted the job, or, for a dataset job, from the dataset's arrays as stored), the
parameters and the seed (and whether the client chose it). The worker contributes the rows and its
provenance (runtime, provider, precision, versions), which a verifier can recompute.

When: a worker that records a job succeeded queues its id (``smoothcert:certificates:pending``);
every API process drains that list in the background (:meth:`Issuer.drain`), and any request for
a succeeded job's certificate issues it on the spot when it is not there yet (a worker that died
between the two steps). Once written, a certificate outlives the job's record and Redis itself,
for ``SMOOTHCERT_CERTIFICATE_RETENTION_DAYS``: meanwhile it counts against its account's storage
quota, and the drain thread deletes it once it is older (one API process at a time, under a lock).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any

import redis

from smoothcert.service.core.certificates import (
    CertificateStore,
    envelope_bytes,
    input_digests,
    sign,
    statement,
    summary,
)
from smoothcert.service.core.contract import chunk_seed, plan_chunks
from smoothcert.service.core.dataset_store import DatasetMissing, DatasetStore
from smoothcert.service.core.jobs import (
    CERTIFICATES_PENDING,
    SUCCEEDED,
    JobRecord,
    JobStore,
    rfc3339,
)
from smoothcert.service.core.keys import DEFAULT_ACCOUNT
from smoothcert.service.core.model_store import ModelStore
from smoothcert.service.core.signing import SigningKeys
from smoothcert.service.core.storage_quota import hold_certificate, release_certificate

log = logging.getLogger(__name__)

CERTIFIED_KINDS = ("certify", "predict")
SWEEP_LOCK = "smoothcert:certificates:sweep"
SWEEP_EVERY_S = 600  # how often one API process of all deletes certificates past their retention
_DIGEST_ROWS = 4096  # dataset rows read at a time to digest them


class NotCertifiable(Exception):
    """A job that has no certificate and cannot get one; the message says why."""


class Issuer:
    """Builds, signs and stores certificates; safe to use from several threads and processes."""

    def __init__(
        self,
        jobs: JobStore,
        models: ModelStore,
        datasets: DatasetStore,
        keys: SigningKeys,
        store: CertificateStore,
        retention_s: float = 365 * 86400,
    ):
        self.jobs, self.models, self.datasets = jobs, models, datasets
        self.keys, self.store, self.retention_s = keys, store, retention_s

    def issue(self, job_id: str, record: JobRecord | None = None) -> str:
        """The SHA-256 of job ``job_id``'s certificate, issued now when it has none yet;
        NotCertifiable when the job is not a succeeded certify or predict job (or what it needs is
        gone)."""
        existing = self.store.of_job(job_id)
        if existing is not None:
            return existing
        record = record if record is not None else self.jobs.get(job_id)
        if record is None:
            raise NotCertifiable(f"job {job_id} has no record and no certificate")
        if record.kind not in CERTIFIED_KINDS or record.status != SUCCEEDED:
            raise NotCertifiable(
                f"job {job_id} is a {record.status} {record.kind} job: certificates are issued "
                "for succeeded certify and predict jobs"
            )
        document = self._statement(record)
        keyid, key = self.keys.active()
        sha = self.store.put(job_id, envelope_bytes(sign(document, key, keyid)))
        hold_certificate(
            self.jobs.redis,
            record.owner or DEFAULT_ACCOUNT,
            sha,
            self.store.disk_bytes(sha),
            int(self.retention_s * 1000),
        )
        return sha

    def forget(self, sha256: str, owner: str | None) -> None:
        """Delete stored certificate ``sha256`` of account ``owner`` and stop counting it against
        the account's storage quota."""
        self.store.remove(sha256)
        release_certificate(self.jobs.redis, owner or DEFAULT_ACCOUNT, sha256)

    def sweep(self) -> int:
        """Delete the certificates past their retention, unless another API process swept less
        than :data:`SWEEP_EVERY_S` ago (a lock key in Redis); how many went. What they held
        against their accounts' quotas lapses by itself at the same age."""
        if not self.jobs.redis.set(SWEEP_LOCK, os.getpid(), nx=True, ex=SWEEP_EVERY_S):
            return 0
        return self.store.sweep(self.retention_s)

    def _statement(self, record: JobRecord) -> dict[str, Any]:
        job = record.certify_job()
        params = job.params
        rows = list((record.result or {}).get("results") or [])
        provenance = dict((record.result or {}).get("provenance") or {})
        files = self.jobs.files
        recorded = (files.certificate_inputs(record.id) if files is not None else None) or {}
        model = self.models.get(params.model_id, include_pending=True)
        if model is None:  # deleted since: the worker recorded the digest of what it ran
            sha = provenance.get("model_sha256")
            if not sha:
                raise NotCertifiable(f"model {params.model_id} of job {record.id} is gone")
            model = {"id": params.model_id, "sha256": sha}
        elif provenance.get("model_sha256") not in (None, model["sha256"]):
            raise NotCertifiable(
                f"job {record.id} ran a model file whose digest differs from model "
                f"{params.model_id}'s record"
            )
        dataset, chunks = None, None
        if job.dataset is not None:
            dataset, digests = self._dataset(job.dataset.dataset_id, job.first_row, len(rows))
            chunks = [
                {"index": i, "first": a, "count": b - a, "seed": chunk_seed(params.seed or 0, i)}
                for i, (a, b) in enumerate(
                    plan_chunks(
                        job.first_row, job.first_row + job.num_inputs, job.dataset.chunk_size
                    )
                )
            ]
        else:
            kept = recorded.get("input_digests")
            if not isinstance(kept, list) or len(kept) != len(rows):
                raise NotCertifiable(
                    f"job {record.id} has no record of its inputs' digests (accepted before "
                    "certificates were issued?)"
                )
            digests = [str(d) for d in kept]
        return statement(
            job={
                "id": record.id,
                "kind": record.kind,
                "finished_time": rfc3339(record.finished_at),
                "owner": record.owner,
                "params": record.params,
                "seed_source": recorded.get("seed_source", "unknown"),
                "provenance": provenance,
                "summary": summary(rows, params.mode),
            },
            model=model,
            rows=rows,
            digests=digests,
            dataset=dataset,
            chunks=chunks,
            issued_time=rfc3339(time.time()) or "",
        )

    def _dataset(self, dataset_id: str, first: int, count: int) -> tuple[dict[str, Any], list[str]]:
        """The dataset's part of the statement, and the digests of rows ``[first, first+count)``
        as the worker certified them."""
        meta = self.datasets.get(dataset_id)
        if meta is None:
            raise NotCertifiable(f"dataset {dataset_id} was deleted before its job was certified")
        try:
            sha = meta.get("arrays_sha256") or self.datasets.arrays_sha256(dataset_id)
            digests: list[str] = []
            for a in range(first, first + count, _DIGEST_ROWS):
                x, _ = self.datasets.load(dataset_id, a, min(a + _DIGEST_ROWS, first + count))
                digests += input_digests(x)
        except DatasetMissing as exc:
            raise NotCertifiable(str(exc)) from None
        info = {"id": dataset_id, "name": meta.get("name"), "arrays_sha256": sha}
        return {**info, "num_inputs": meta.get("num_inputs")}, digests

    def drain(self, stop: threading.Event, every_s: float = 0.5) -> None:
        """Issue the certificates of the jobs workers queued, until ``stop`` is set (an API
        process's background thread). A job that cannot be certified is logged and dropped."""
        next_sweep = 0.0
        while not stop.is_set():
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + SWEEP_EVERY_S / 10
                try:
                    if gone := self.sweep():
                        log.info("deleted %d certificates past their retention", gone)
                except redis.RedisError:
                    pass  # the next round tries again
                except Exception:  # noqa: BLE001 - the sweep must not stop the certificates
                    log.exception("the sweep of %s failed", self.store.root)
            try:
                job_id = self.jobs.redis.lpop(CERTIFICATES_PENDING)
            except redis.RedisError:
                stop.wait(5 * every_s)
                continue
            if job_id is None:
                stop.wait(every_s)
                continue
            text = job_id.decode() if isinstance(job_id, bytes) else str(job_id)
            try:
                self.issue(text)
            except NotCertifiable as exc:
                log.warning("no certificate for job %s: %s", text, exc)
            except redis.RedisError:
                with contextlib.suppress(redis.RedisError):
                    self.jobs.redis.rpush(CERTIFICATES_PENDING, text)  # try again later
                stop.wait(5 * every_s)
            except Exception:  # noqa: BLE001 - one job must not stop the others' certificates
                log.exception("issuing the certificate of job %s failed", text)
