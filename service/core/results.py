"""What a job keeps on the data volume rather than in Redis: ``DATA_DIR/results/<id>/``.

Redis holds every job's record, the queue and the limits under one memory budget
(``SMOOTHCERT_REDIS_MAXMEMORY``, ``noeviction``), so what grows with a job's inputs lives here:

* ``samples/<row>.npy``: the noisy copies a certify or predict job keeps of its first rows for
  people to look at (up to 1 MiB a job). They are kept ``SMOOTHCERT_SAMPLES_TTL_S`` from when
  they were written (the file's mtime); an older file reads as absent at once and the sweep
  deletes it.
* ``certificate_inputs.json``: what the API recorded of a certify or predict job for its
  certificate when it accepted the job (:mod:`smoothcert.service.core.issuer`): where the seed
  came from, and the digest of each input as decoded; lives as long as the record.
* ``rows.json``: the rows of a result too large to keep in its record (more than
  :data:`~smoothcert.service.core.jobs.ROWS_INLINE_BYTES` of JSON); the record keeps the result
  without them (its ``result_summary``) and says so (``rows_on_disk``). They live as long as the
  record: the sweep deletes the folder of a job whose record is gone.

The folder is not ``DATA_DIR/jobs/<id>`` (the saved inputs), which the worker deletes as soon as
a job ends. Files are written to a temporary name and renamed, so a reader never sees half of
one. :func:`sweep` is run by the workers (:mod:`smoothcert.worker.queue.result_sweep`), one at a
time, every :func:`sweep_every_s`. Standard library and redis only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from smoothcert.service.core.jobs import PREFIX, ResultRowsMissing, check_job_id, is_job_id
from smoothcert.service.core.store import inside

SAMPLES, ROWS, CERTIFICATE_INPUTS = "samples", "rows.json", "certificate_inputs.json"
SWEEP_LOCK = "smoothcert:results:sweep"
_SAMPLE = re.compile(r"^[0-9]{1,9}\.npy$")


def sweep_every_s(samples_ttl_s: int) -> int:
    """How often the workers sweep: every 10 minutes, or every TTL when that is shorter."""
    return max(1, min(600, samples_ttl_s))


class ResultFiles:
    """The ``results`` folder of the data volume; safe to use from the API and the workers at once."""

    def __init__(self, root: str | Path, samples_ttl_s: int):
        self.root = Path(root)
        self.samples_ttl_s = samples_ttl_s

    def folder(self, job_id: str) -> Path:
        """``root/<job id>``; InvalidJobId for anything but a job id, ValueError when the folder
        resolves outside the root (a link placed there)."""
        return inside(self.root, self.root / check_job_id(job_id))

    def _write(self, path: Path, data: bytes) -> None:
        """``data`` at ``path``, atomically; the folders are made again should a sweep have just
        removed them as empty."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        for attempt in range(3):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_bytes(data)
                os.replace(tmp, path)
                return
            except FileNotFoundError:
                if attempt == 2:
                    raise

    # ---------------------------------------------------------------- noisy copies

    def keep_samples(self, job_id: str, rows: dict[int, bytes]) -> None:
        """Keep ``rows`` (row index -> a ``.npy`` of its noisy copies) for ``samples_ttl_s``."""
        folder = self.folder(job_id) / SAMPLES
        for row, data in rows.items():
            self._write(folder / f"{int(row)}.npy", data)

    def samples(self, job_id: str, row: int) -> bytes | None:
        """The ``.npy`` of row ``row``'s noisy copies; None when none were kept, or they expired."""
        path = self.folder(job_id) / SAMPLES / f"{int(row)}.npy"
        try:
            if time.time() - path.stat().st_mtime > self.samples_ttl_s:
                return None
            return path.read_bytes()
        except OSError:
            return None

    # ---------------------------------------------------------------- certificate inputs

    def write_certificate_inputs(self, job_id: str, recorded: dict[str, Any]) -> None:
        """Keep what the API recorded for the job's certificate (seed source, input digests)."""
        self._write(self.folder(job_id) / CERTIFICATE_INPUTS, json.dumps(recorded).encode())

    def certificate_inputs(self, job_id: str) -> dict[str, Any] | None:
        """What :meth:`write_certificate_inputs` kept; None when nothing was (a job from before)."""
        try:
            return json.loads((self.folder(job_id) / CERTIFICATE_INPUTS).read_bytes())
        except (OSError, ValueError):
            return None

    # ---------------------------------------------------------------- result rows

    def write_rows(self, job_id: str, rows_json: str) -> None:
        """Keep a result's rows (their JSON, as the record would have held them)."""
        self._write(self.folder(job_id) / ROWS, rows_json.encode())

    def rows(self, job_id: str) -> list[Any]:
        """The rows :meth:`write_rows` kept; ResultRowsMissing when they are not there."""
        path = self.folder(job_id) / ROWS
        try:
            return json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ResultRowsMissing(
                f"the result rows of job {job_id} are missing from the data volume "
                f"(results/{job_id}/{ROWS}: {type(exc).__name__})"
            ) from None

    def drop_rows(self, job_id: str) -> None:
        """Delete kept rows that no record names (a job that did not turn succeeded after all)."""
        (self.folder(job_id) / ROWS).unlink(missing_ok=True)


@dataclass
class Swept:
    """What one :func:`sweep` deleted."""

    samples: int = 0  # noisy-copy files past their TTL
    folders: int = 0  # job folders whose record is gone (or which were empty)


def sweep(files: ResultFiles, client: redis.Redis, now: float | None = None) -> Swept:
    """Delete the noisy copies past ``samples_ttl_s``, and the folders of jobs whose record is gone
    (expired or deleted: nothing can read their rows any more) or that hold nothing any more.

    One pass over ``results/``: a ``stat`` per kept file and one pipelined EXISTS per job folder.
    Anything in the folder that is not a job's folder is left alone.
    """
    now = time.time() if now is None else now
    swept = Swept()
    try:
        entries = [e for e in os.scandir(files.root) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return swept
    jobs = [e for e in entries if is_job_id(e.name)]
    for entry in jobs:
        samples = Path(entry.path) / SAMPLES
        try:
            kept = list(os.scandir(samples))
        except OSError:
            continue
        for f in kept:
            try:
                if _SAMPLE.match(f.name) and now - f.stat().st_mtime > files.samples_ttl_s:
                    os.unlink(f.path)
                    swept.samples += 1
            except FileNotFoundError:
                pass
        try:
            samples.rmdir()  # only when empty
        except OSError:
            pass
    with client.pipeline(transaction=False) as pipe:
        for entry in jobs:
            pipe.exists(PREFIX + entry.name)
        alive = pipe.execute()
    for entry, exists in zip(jobs, alive):
        if not exists:
            shutil.rmtree(entry.path, ignore_errors=True)
            swept.folders += 1
            continue
        try:
            os.rmdir(entry.path)  # only when empty: no copies left and no rows
            swept.folders += 1
        except OSError:
            pass
    return swept


def sweep_once(files: ResultFiles, client: redis.Redis) -> Swept | None:
    """:func:`sweep`, unless another worker swept less than :func:`sweep_every_s` ago (a lock
    key in Redis with that TTL); None when it was not this one's turn."""
    if not client.set(SWEEP_LOCK, os.getpid(), nx=True, ex=sweep_every_s(files.samples_ttl_s)):
        return None
    return sweep(files, client)
