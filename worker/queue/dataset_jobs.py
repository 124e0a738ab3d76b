"""One chunk of a dataset job, and the job's result combined from all of its chunks.

The split, the chunk seeds and the Redis ledger are in :mod:`smoothcert.service.core.job_chunks`.
A chunk's outcome is its result rows (``index`` = position in the dataset, ``label`` from its
``y``) and a short provenance naming the worker that computed it. No Celery, no Redis here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from smoothcert.service.core.contract import ChunkTask
from smoothcert.service.core.dataset_store import DatasetMissing, DatasetStore
from smoothcert.worker.queue.certify_run import kept_samples, label_metrics, label_rows, run_engine
from smoothcert.worker.smoothing import CancelCheck, Progress

# Provenance fields that differ from chunk to chunk; the job's provenance lists them per chunk.
_PER_CHUNK = (
    "chunk",
    "start",
    "stop",
    "worker",
    "pid",
    "seed",
    "num_inputs",
    "device",
    "elapsed_s",
    "batch_size",
)


def run_chunk(
    model,
    task: ChunkTask,
    datasets: DatasetStore,
    worker: str,
    progress: Progress,
    should_cancel: CancelCheck,
    memory_budget: int | None = None,
    keep: Callable[[dict[int, bytes]], Any] | None = None,
) -> dict[str, Any]:
    """Certify (or predict) inputs ``[task.start, task.stop)`` of the job's dataset
    (``memory_budget`` as in :func:`~smoothcert.worker.queue.certify_run.run_engine`); first hand
    ``keep`` the noisy copies to keep of those among the job's first rows (certify_run.kept_samples).

    Returns ``{"rows": [...], "provenance": {...}}``; raises DatasetMissing when the dataset was
    deleted or changed, and whatever the engine raises.
    """
    start, stop, dataset_id = task.start, task.stop, task.dataset.dataset_id
    x, y = datasets.load(dataset_id, start, stop)
    if len(x) != stop - start:
        raise DatasetMissing(f"dataset {dataset_id} no longer holds inputs {start} to {stop - 1}")
    if keep is not None:
        keep(kept_samples(model, x, task.job, start))
    result = run_engine(
        model, x, task.job.params, task.chunk_seed, progress, should_cancel, memory_budget
    )
    rows = result["results"]
    label_rows(rows, y)
    for row in rows:
        row["index"] += start
    provenance = {
        **result["provenance"],
        "chunk": task.index,
        "start": start,
        "stop": stop,
        "worker": worker,
        "pid": os.getpid(),
    }
    return {"rows": rows, "provenance": provenance}


def combine_chunks(
    task: ChunkTask, outcomes: dict[int, dict[str, Any]], elapsed_s: float
) -> dict[str, Any]:
    """The job's result from every chunk's outcome (``task``: any chunk of the job): rows in
    dataset order, the label metrics, totals and a provenance with one entry per chunk.
    ``elapsed_s`` is the job's wall time."""
    job, dataset, params = task.job, task.dataset, task.job.params
    ordered = [outcomes[i] for i in range(dataset.chunks)]
    rows = [row for outcome in ordered for row in outcome["rows"]]
    first = ordered[0]["provenance"]
    chunks = [{k: o["provenance"][k] for k in _PER_CHUNK} for o in ordered]
    shared = {k: v for k, v in first.items() if k not in _PER_CHUNK}
    devices = sorted({c["device"] for c in chunks})
    sizes = sorted({c["batch_size"] for c in chunks})  # each worker fits its own device's memory
    provenance = {
        **shared,
        "seed": job.seed,
        "batch_size": sizes[0] if len(sizes) == 1 else "mixed: " + ", ".join(map(str, sizes)),
        "device": devices[0] if len(devices) == 1 else "mixed: " + ", ".join(devices),
        "num_inputs": len(rows),
        "elapsed_s": elapsed_s,
        "model_id": params.model_id,
        "dataset_id": dataset.dataset_id,
        "dataset_sha256": task.dataset_sha256,
        "skip": dataset.skip,
        "limit": dataset.limit,
        "chunk_size": dataset.chunk_size,
        "chunk_seed": "first 8 bytes of SHA-256('<seed>:<chunk>'), big-endian, >> 1",
        "workers": sorted({c["worker"] for c in chunks}),
        "chunks": chunks,
    }
    totals = {
        "inputs": len(rows),
        "abstentions": sum(r["abstained"] for r in rows),
        "chunks": len(chunks),
        "elapsed_s": elapsed_s,
        "images_per_s": len(rows) / elapsed_s if elapsed_s > 0 else None,
    }
    if params.target_radius is not None:  # what the test spent against what a fixed n would have
        totals.update(
            samples_used=sum(r["samples_used"] for r in rows),
            samples_fixed_n=len(rows) * (params.n0 + params.n),
        )
    return {
        "results": rows,
        "provenance": provenance,
        "totals": totals,
        **label_metrics(rows, params.mode, task.radii),
    }
