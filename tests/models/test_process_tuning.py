"""The CLI and the worker tune their own process (malloc, OpenMP, threads) and record it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from smoothcert.models.process_tuning import cores
from smoothcert.worker.queue.celery_app import _concurrency
from tests.support.stack import wait_job

TUNED_MALLOC = "M_MMAP_MAX=0 M_TRIM_THRESHOLD=2147483647 M_ARENA_MAX=1"


def _certify_in_a_fresh_process(demo_paths, tmp_path, **env: str) -> dict:
    """``smoothcert certify`` as a new process (clean of the caller's malloc/OpenMP settings) with
    ``env`` added; its provenance."""
    x = tmp_path / "x.npy"
    np.save(x, np.load(demo_paths["test_x"])[:2])
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MALLOC_", "OMP_", "GLIBC_TUNABLES", "SMOOTHCERT_TUNING"))
    }
    out = tmp_path / "r.tsv"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "smoothcert.service.cli",
            "certify",
            str(demo_paths["safetensors"]),
            "--inputs",
            str(x),
            "--sigma",
            "0.25",
            "--n0",
            "10",
            "--n",
            "100",
            "--seed",
            "0",
            "--out",
            str(out),
        ],
        env={**base, **env},
        check=True,
        timeout=300,
    )
    return json.loads((tmp_path / "r.tsv.json").read_text())["tuning"]


@pytest.mark.process
def test_the_cli_tunes_malloc_openmp_and_threads_and_records_them(demo_paths, tmp_path):
    # Empty variables set nothing, so they do not count as the user's settings.
    tuning = _certify_in_a_fresh_process(
        demo_paths, tmp_path, GLIBC_TUNABLES="", OMP_WAIT_POLICY=""
    )
    assert tuning == {
        "tuning": "on",
        "malloc": TUNED_MALLOC,
        "omp_wait_policy": "PASSIVE",
        "threads": cores(),
        "threads_source": f"{cores()} cores, for each of 1 processes",
        "torch_threads": cores(),
    }


@pytest.mark.process
def test_settings_the_user_made_are_kept_and_recorded_as_theirs(demo_paths, tmp_path):
    tuning = _certify_in_a_fresh_process(
        demo_paths, tmp_path, MALLOC_ARENA_MAX="2", OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1"
    )
    assert tuning["malloc"] == "user (MALLOC_ARENA_MAX)"
    assert tuning["omp_wait_policy"] == "ACTIVE (user)"
    assert (
        tuning["threads"] == tuning["torch_threads"] == 1
        and tuning["threads_source"] == "OMP_NUM_THREADS"
    )


@pytest.mark.process
def test_smoothcert_tuning_0_turns_it_off(demo_paths, tmp_path):
    tuning = _certify_in_a_fresh_process(demo_paths, tmp_path, SMOOTHCERT_TUNING="0")
    assert tuning["tuning"] == "off" and "malloc" not in tuning and tuning["threads"] is None


@pytest.mark.parametrize(
    "args, expected",
    [
        ([], 3),
        (["-c", "2"], 2),
        (["--concurrency", "4"], 4),
        (["--concurrency=5"], 5),
        (["-c6"], 6),
        (["-c", "x"], 3),
    ],
)
def test_the_worker_takes_its_pool_size_from_the_celery_options(args, expected):
    assert _concurrency(["--queues", "certify", *args], 3) == expected


def test_a_worker_job_records_the_tuning_of_its_pool_process(client, demo_model, demo_paths):
    x = np.load(demo_paths["test_x"])[:1]
    resp = client.post(
        "/v1/certify",
        json={
            "model_id": demo_model["id"],
            "inputs": x.tolist(),
            "sigma": 0.25,
            "n0": 10,
            "n": 100,
            "seed": 0,
        },
    )
    assert resp.status_code == 202, resp.text
    job = wait_job(client, resp.json()["job_id"])
    assert job["status"] == "succeeded", job["error"]
    tuning = job["result"]["provenance"]["tuning"]
    # Every pool process gets a thread per core (the session's worker runs one).
    assert tuning["tuning"] == "on" and tuning["malloc"] == TUNED_MALLOC
    assert tuning["threads"] == tuning["torch_threads"] == cores()
