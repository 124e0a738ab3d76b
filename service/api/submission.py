"""Submitting a certify or predict job: every rule a job must pass before it is queued, in one place.

``POST /v1/certify`` (:mod:`smoothcert.service.api.routes.certify`) parses its body into
:class:`~smoothcert.service.core.contract.CertifyParams` and an input source, and calls
:meth:`Submission.certify`. Everything a worker would refuse is refused here first, with a 4xx
that says why: the settings' caps, the model (404 unknown; a denoiser, a runtime or precision
that does not fit it: :meth:`ModelRecord.refusal`), the inputs (shape and label range from the
model's record; their decoded size, from their headers, against the decoded-bytes budget: 413),
a dataset's range (:meth:`DatasetRecord.refusal_for`) and the job's sample budget. 8-bit images
are kept as uint8 pixels (the worker scales them by 1/255), other inputs as float32; for discrete
noise, float inputs must lie on the 8-bit grid (422 otherwise) and are kept as uint8 too, rounded
when the request sets ``quantize`` (:mod:`smoothcert.service.core.grid`).
Then the inputs go to ``DATA_DIR/jobs/<job id>/inputs.npy``, counted against the key's
storage quota until they are deleted (413 when they do not fit), the seed is drawn so that it
is recorded, the job record is written (:class:`~smoothcert.service.core.contract.CertifyJob`)
and the messages are sent (:class:`~smoothcert.service.core.contract.CertifyTask`, or one
:class:`~smoothcert.service.core.contract.ChunkTask` per chunk of a dataset job), all or none:
room for every message is held in the queue before the record is written (503 when they do not
fit).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis
from fastapi import HTTPException, status

from smoothcert.service.api.access import Access
from smoothcert.service.api.schemas import (
    JobAccepted,
    check_inputs,
    check_labels,
    decode_inputs,
)
from smoothcert.service.core.certificates import input_digests
from smoothcert.service.core.contract import (
    CertifyJob,
    CertifyParams,
    CertifyTask,
    ChunkTask,
    DatasetRange,
    DatasetRecord,
    ModelRecord,
    plan_chunks,
)
from smoothcert.service.core.grid import grid_levels
from smoothcert.service.core.images import IMAGE_SUFFIXES, to_unit
from smoothcert.service.core.inputs import InputsTooLarge, decode_pixels, read_npy
from smoothcert.service.core.jobs import INPUTS_FILE, new_job_id
from smoothcert.service.core.params import DRAWN_SEED_BOUND, draw_seed
from smoothcert.service.core.queue import CERTIFY_CHUNK_TASK, CERTIFY_TASK, QUEUE
from smoothcert.service.core.storage_quota import drop_job_inputs, inputs_disk_bytes

Files = list[tuple[str, bytes]]
"""A multipart body's ``inputs`` files: (file name, bytes) each."""


@dataclass(frozen=True)
class InlineInputs:
    """Inputs sent with the request: a JSON body's ``inputs`` (nested list or base64 ``.npy``) or a
    multipart body's files, with their labels."""

    encoded: str | list[Any] | None
    files: Files | None
    labels: list[int] | None
    names: list[str] | None = None


@dataclass(frozen=True)
class DatasetSlice:
    """Inputs ``[skip, skip + limit)`` of an uploaded dataset, labelled by its ``y``."""

    dataset_id: str
    skip: int
    limit: int | None


def unprocessable(message: str) -> HTTPException:
    return HTTPException(422, message)


def decoded_too_large(exc: InputsTooLarge) -> HTTPException:
    """The 413 of inputs over the decoded-bytes budget (known from their headers)."""
    return HTTPException(
        status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
        f"{exc} (SMOOTHCERT_MAX_DECODED_BYTES_PER_REQUEST); send fewer inputs per request, or "
        "upload them as a dataset (POST /v1/datasets)",
    )


@dataclass
class Submission:
    """What submitting a job needs: the settings, the stores, the queue and the caller's admission
    (:mod:`smoothcert.service.api.limits`)."""

    settings: Any
    jobs: Any
    models: Any
    datasets: Any
    queue: Any
    admission: Any
    access: Access
    _seed_source: str = "service"

    def certify(
        self,
        params: CertifyParams,
        source: InlineInputs | DatasetSlice,
        radii: list[float] | None,
    ) -> JobAccepted:
        """Check and queue one certify or predict job; its 202 answer."""
        self._check_caps(params, radii)
        model = self._model(params)
        # A certificate says whether its seed was the client's choice: a client who may choose
        # seeds can try many and keep the best.
        self._seed_source = "client" if params.seed is not None else "service"
        if isinstance(source, DatasetSlice):
            return self._queue_dataset_job(params, model, source, radii)
        return self._queue_inputs_job(params, model, source, radii)

    def _check_caps(self, params: CertifyParams, radii: list[float] | None) -> None:
        cap = self.settings.max_n
        for name, value in (("n0", params.n0), ("n", params.n)):
            if value > cap:
                raise unprocessable(
                    f"{name}={value} exceeds this server's cap of {cap} samples (SMOOTHCERT_MAX_N)"
                )
        if radii is not None and any(not np.isfinite(r) or r < 0 for r in radii):
            raise unprocessable("radii must be finite and non-negative")

    def _model(self, params: CertifyParams) -> ModelRecord:
        """The model's record; 404 when unknown (or another account's private model), 422 when it
        cannot run these parameters."""
        meta = self.access.model(self.models, params.model_id)
        model = ModelRecord.from_meta(meta)
        refusal = model.refusal(params.runtime, params.precision, self.settings.device)
        if refusal is None and model.denoiser_id is not None:
            denoiser = self.models.get(model.denoiser_id)
            if denoiser is not None:
                refusal = ModelRecord.from_meta(denoiser).sigma_refusal(params.sigma, model.id)
        if refusal is not None:
            raise unprocessable(refusal)
        return model

    def _queue_inputs_job(
        self,
        params: CertifyParams,
        model: ModelRecord,
        source: InlineInputs,
        radii: list[float] | None,
    ) -> JobAccepted:
        budget = self.settings.max_decoded_bytes_per_request
        try:
            if source.files is not None:
                x = _decode_files(source.files, model.input_shape, budget)
            elif source.encoded is not None:
                x = check_inputs(decode_inputs(source.encoded, budget), model.input_shape)
            else:
                raise ValueError("no inputs: give inputs or dataset_id")
            if params.noise == "discrete":
                x = _on_grid(x, params.quantize)
            if source.labels is not None:
                check_labels(source.labels, len(x), model.classes)
            names = _names(source, len(x))
        except InputsTooLarge as exc:
            raise decoded_too_large(exc) from None
        except ValueError as exc:
            raise unprocessable(str(exc)) from None
        cap = self.settings.max_inputs
        if len(x) > cap:
            raise unprocessable(
                f"{len(x)} inputs exceed this server's cap of {cap} per job "
                "(SMOOTHCERT_MAX_INPUTS); upload them as a dataset (POST /v1/datasets)"
            )
        job = CertifyJob(_with_seed(params), len(x))
        self._check_budget(job)
        job_id = new_job_id()
        with self.admission.room(QUEUE, 1):
            folder = self.settings.jobs_dir / job_id
            # The inputs count against the caller's storage quota before a byte is written (413
            # over it) until they are deleted: by the worker when the job ends, by DELETE of the
            # queued job, or by the workers' sweep should this process die before the job is
            # recorded (service/core/storage_quota.py).
            self.admission.reserve_inputs(
                self.datasets, job_id, inputs_disk_bytes(x, self.settings.data_dir)
            )
            try:
                folder.mkdir(parents=True)
                np.save(folder / INPUTS_FILE, x)
                task = CertifyTask(job, source.labels, radii)
                digests = input_digests(to_unit(x) if x.dtype == np.uint8 else x)
                with self._recorded(job_id, job, digests, names):
                    self.queue.send_task(
                        CERTIFY_TASK, args=[job_id, task.to_message()], task_id=job_id
                    )
            except Exception:
                with contextlib.suppress(redis.RedisError):  # else the sweep gives it back
                    drop_job_inputs(self.jobs.redis, self.settings.jobs_dir, job_id)
                raise
        return _accepted(job_id)

    def _queue_dataset_job(
        self,
        params: CertifyParams,
        model: ModelRecord,
        source: DatasetSlice,
        radii: list[float] | None,
    ) -> JobAccepted:
        """Queue one task per chunk of the dataset's inputs ``[skip, skip + limit)``
        (job_chunks.py), all or none: room for every chunk's message is held in the queue before
        the first is sent."""
        dataset = DatasetRecord.from_meta(self.access.dataset(self.datasets, source.dataset_id))
        refusal = dataset.refusal_for(model)
        if refusal is not None:
            raise unprocessable(refusal)
        size = dataset.num_inputs
        if source.skip >= size:
            raise unprocessable(
                f"skip={source.skip} leaves no inputs: dataset {dataset.id} holds {size}"
            )
        stop = size if source.limit is None else min(size, source.skip + source.limit)
        chunk_size = self.settings.chunk_size
        chunks = len(plan_chunks(source.skip, stop, chunk_size))
        job = CertifyJob(
            _with_seed(params),
            stop - source.skip,
            DatasetRange(dataset.id, source.skip, source.limit, chunk_size, chunks),
        )
        self._check_budget(job)
        bound = self.settings.max_queued_messages
        if chunks > bound:
            raise unprocessable(
                f"this dataset job is {chunks} chunks of up to {chunk_size} inputs, one "
                f"queue message each, more than the queue's bound of {bound} messages "
                f"(SMOOTHCERT_MAX_QUEUED_MESSAGES), so it could never be queued; certify at most "
                f"{bound * chunk_size} inputs per job (skip and limit)"
            )
        job_id = new_job_id()
        with self.admission.room(QUEUE, chunks), self._recorded(job_id, job):
            for index in range(chunks):
                task = ChunkTask.planned(job, index, dataset.sha256, radii)
                self.queue.send_task(
                    CERTIFY_CHUNK_TASK,
                    args=[job_id, task.to_message()],
                    task_id=f"{job_id}.{index}",
                )
        return _accepted(job_id)

    def _check_budget(self, job: CertifyJob) -> None:
        """422 when the job would draw more than the server's budget of samples (the most it
        may: a target-radius job's n is its cap per input)."""
        budget = self.settings.max_job_samples
        if job.total_samples > budget:
            per_input = job.params.samples_per_input
            what = "n" if job.params.mode == "predict" else "n0 + n"
            raise unprocessable(
                f"this job asks for {job.num_inputs} inputs x {per_input} samples ({what}) = "
                f"{job.total_samples} samples, over this server's budget of {budget} samples "
                "per job (SMOOTHCERT_MAX_JOB_SAMPLES); lower n, or split the inputs into smaller jobs"
            )

    @contextlib.contextmanager
    def _recorded(
        self,
        job_id: str,
        job: CertifyJob,
        digests: list[str] | None = None,
        names: list[str] | None = None,
    ) -> Iterator[None]:
        """Write the job's record (status queued) and what its certificate needs from this
        process (where the seed came from; the inputs' digests, as decoded here), then run the
        block that sends its messages; when that fails, the record is failed ("could not be
        queued") and the error goes on (Redis or broker errors become 503 (app.py);
        ActiveJobsExceeded 429 (limits.py))."""
        try:
            self.jobs.create(
                job_id,
                job.params.mode,
                job.record_params(),
                total=job.progress_total,
                owner=self.admission.caller,
                max_active=self.admission.max_active,
            )
            if self.jobs.files is not None:
                recorded = {
                    "seed_source": self._seed_source,
                    "input_digests": digests,
                    **({"names": names} if names else {}),
                }
                self.jobs.files.write_certificate_inputs(job_id, recorded)
            yield
        except Exception:
            with contextlib.suppress(Exception):
                self.jobs.fail(job_id, "the job could not be queued")
            raise


def _with_seed(params: CertifyParams) -> CertifyParams:
    """``params`` with a seed: the caller's, or one drawn here, so that it is recorded."""
    return params if params.seed is not None else params.with_seed(draw_seed(DRAWN_SEED_BOUND))


def _accepted(job_id: str) -> JobAccepted:
    return JobAccepted(job_id=job_id, status="queued", location=f"/v1/jobs/{job_id}")


def _on_grid(x: np.ndarray, quantize: bool) -> np.ndarray:
    """Inputs for discrete noise: 8-bit pixels as they are; float inputs on the 8-bit grid, or
    rounded onto it when ``quantize`` (kept as uint8, so the job's digests are the rounded
    image's); ValueError (a 422) for float inputs off the grid otherwise."""
    if x.dtype == np.uint8:
        return x
    return grid_levels(x, quantize).astype(np.uint8)


def _names(source: InlineInputs, count: int) -> list[str] | None:
    """The inputs' names: the request's ``names``, else a multipart body's image file names (a
    single .npy names none); ValueError when ``names`` does not name each input once."""
    if source.names is not None:
        if len(source.names) != count:
            raise ValueError(f"names has {len(source.names)} entries for {count} inputs")
        return list(source.names)
    files = source.files or []
    if files and not (len(files) == 1 and files[0][0].lower().endswith(".npy")):
        return [Path(name).name for name, _ in files]
    return None


def _decode_files(files: Files, input_shape: list[int], max_bytes: int) -> np.ndarray:
    """A multipart body's inputs as the job stores them: one .npy array, read and checked as a
    JSON body's base64 .npy (float32 in [0, 1]); or PNG/JPEG images decoded into one (N, C, H, W)
    buffer, uint8 when all are 8-bit (the worker scales them by 1/255), each header checked
    against the model's input shape and the buffer against ``max_bytes`` before any pixel is
    decoded (inputs.decode_pixels). ValueError otherwise; InputsTooLarge over ``max_bytes``."""
    if len(files) == 1 and files[0][0].lower().endswith(".npy"):
        return check_inputs(read_npy(files[0][1], "inputs", max_bytes), input_shape)
    if any(not name.lower().endswith(IMAGE_SUFFIXES) for name, _ in files):
        raise ValueError("inputs files must be PNG/JPEG images or a single .npy array")
    return decode_pixels(files, input_shape, max_bytes)
