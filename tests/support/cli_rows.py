"""The CLI's certificates for the inputs of an API job, to hold the two side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from smoothcert.service.cli.main import main


def cli_certify(
    model: Path, denoiser: Path, x: np.ndarray, job: dict[str, Any], folder: Path
) -> list[dict[str, str]]:
    """``smoothcert certify MODEL --denoiser DENOISER`` on ``x`` with ``job``'s parameters as flags;
    the TSV's rows as dicts (its provenance beside it, ``folder/cli.tsv.json``)."""
    np.save(folder / "x.npy", x)
    out = folder / "cli.tsv"
    assert (
        main(
            [
                "certify",
                str(model),
                "--denoiser",
                str(denoiser),
                "--inputs",
                str(folder / "x.npy"),
                *[f"--{k.replace('_', '-')}={v}" for k, v in job.items()],
                "--out",
                str(out),
            ]
        )
        == 0
    )
    lines = [line.split("\t") for line in out.read_text().splitlines()]
    return [dict(zip(lines[0], line)) for line in lines[1:]]


def assert_same_certificates(api: list[dict[str, Any]], cli: list[dict[str, str]]) -> None:
    """The API's rows and the CLI's TSV rows give the same class, n_a and radius per input. The TSV
    writes an abstention as class -1 (Cohen et al.'s layout), JSON as null."""
    assert [(-1 if r["prediction"] is None else r["prediction"], r["n_a"]) for r in api] == [
        (int(r["predict"]), int(r["n_a"])) for r in cli
    ]
    assert [r["radius"] or 0.0 for r in api] == pytest.approx(
        [float(r["radius"]) for r in cli], rel=1e-9
    )
