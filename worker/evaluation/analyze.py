"""Certified accuracy from certification logs (`smoothcert analyze`).

A certification log is a tab-separated file with a header line whose columns include Cohen et
al.'s `idx label predict radius correct time` (ours add `p_a_lower n_a n radius_cap ...` after
them; columns are found by name and the rest are ignored). Certified accuracy at radius r is the
share of rows with `correct == 1` and `radius >= r` (:mod:`smoothcert.service.core.accuracy`);
the envelope takes, at each radius, the best over the files given (the way the paper's tables
take the best over σ).

This module needs numpy only; matplotlib is imported when a plot is asked for.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Sequence

import numpy as np
from numpy.typing import DTypeLike

from smoothcert.service.core.accuracy import DEFAULT_CURVE_RADII, certified_accuracy

REQUIRED_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
FORMATS = ("table", "json", "tsv")

# str(datetime.timedelta), as in Cohen's logs: "0:02:31.238689", "1 day, 0:00:01"
_TIMEDELTA = re.compile(r"^(?:(\d+) days?, )?(\d+):([0-5]\d):([0-5]\d(?:\.\d+)?)$")


class AnalyzeError(Exception):
    """A log or an argument that cannot be analysed; the message is one line."""


@dataclass(frozen=True)
class CertLog:
    """The columns of one certification log, one array entry per row (time in seconds)."""

    path: str
    idx: np.ndarray
    label: np.ndarray
    predict: np.ndarray
    radius: np.ndarray
    correct: np.ndarray  # bool
    time: np.ndarray

    def __len__(self) -> int:
        return len(self.radius)


def parse_time(text: str) -> float:
    """Seconds from `151.2` or str(timedelta)'s `[D day[s], ]H:MM:SS[.micro]`; else ValueError."""
    match = _TIMEDELTA.match(text)
    if match:
        days, hours, minutes, seconds = match.groups()
        return ((int(days or 0) * 24 + int(hours)) * 60 + int(minutes)) * 60 + float(seconds)
    return float(text)


def _parse_correct(text: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError(text)
    return text == "1"


def _parse_radius(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError(text)
    return value


# column -> (parser, what a valid value looks like for the error message, array dtype)
_PARSERS: dict[str, tuple[Callable[[str], Any], str, DTypeLike]] = {
    "idx": (int, "an integer", np.int64),
    "label": (int, "an integer", np.int64),
    "predict": (int, "an integer", np.int64),
    "radius": (_parse_radius, "a finite number >= 0", np.float64),
    "correct": (_parse_correct, "0 or 1", bool),
    "time": (parse_time, "seconds or H:MM:SS.micro", np.float64),
}


def read_log(path: str | Path) -> CertLog:
    """Read a certification TSV into a CertLog.

    Requires a header naming every column of REQUIRED_COLUMNS (any order, extra columns ignored)
    and, on every other non-blank line, exactly as many tab-separated fields as the header, with
    integers for idx/label/predict, 0 or 1 for correct, a finite radius >= 0, and time as plain
    seconds or H:MM:SS.micro. Blank lines are skipped. A header-only log is valid and has no rows.
    Raises AnalyzeError("FILE:LINE: ...") on the first violation, or "FILE: ..." if unreadable.
    """
    name = str(path)
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise AnalyzeError(f"{name}: cannot read: {reason}") from None
    lines = [line.rstrip("\r") for line in lines]
    if not lines or not lines[0].strip():
        raise AnalyzeError(f"{name}:1: empty file, expected a header line")
    header = [column.strip() for column in lines[0].split("\t")]
    missing = [column for column in REQUIRED_COLUMNS if column not in header]
    if missing:
        raise AnalyzeError(f"{name}:1: missing column(s) {', '.join(missing)} in header")
    position = {column: header.index(column) for column in REQUIRED_COLUMNS}
    values: dict[str, list] = {column: [] for column in REQUIRED_COLUMNS}
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise AnalyzeError(
                f"{name}:{lineno}: {len(fields)} fields, expected {len(header)} as in the header"
            )
        for column, (parse, expected, _) in _PARSERS.items():
            text = fields[position[column]].strip()
            try:
                values[column].append(parse(text))
            except ValueError:
                raise AnalyzeError(
                    f"{name}:{lineno}: column {column}: {text[:40]!r} is not {expected}"
                ) from None
    arrays = {c: np.asarray(values[c], dtype=dtype) for c, (_, _, dtype) in _PARSERS.items()}
    return CertLog(path=name, **arrays)


def certified_accuracy_of_log(log: CertLog, radii: Sequence[float]) -> np.ndarray:
    """Share of the log's rows with correct == 1 and radius >= r, for each r in radii (float64
    array). A log with no rows has accuracy 0.0 at every radius.
    """
    return certified_accuracy(log.correct, log.radius, radii)


def analyze(paths: Sequence[str | Path], radii: Sequence[float]) -> dict:
    """Certified accuracy of each log and the envelope over them.

    Returns {"radii": [...], "curves": {path_as_given: [...]}, "envelope": [...]}, plain floats,
    accuracies as fractions in [0, 1]; the envelope is the maximum over the files at each radius.
    Raises AnalyzeError when no path is given or a log is malformed.
    """
    if not paths:
        raise AnalyzeError("no certification logs given")
    radii = [float(r) for r in radii]
    curves = {str(p): certified_accuracy_of_log(read_log(p), radii) for p in paths}
    envelope = np.max(np.stack(list(curves.values())), axis=0)
    return {
        "radii": radii,
        "curves": {name: curve.tolist() for name, curve in curves.items()},
        "envelope": envelope.tolist(),
    }


def parse_radii(text: str) -> list[float]:
    """Parse "0,0.5,1" into sorted, distinct radii; AnalyzeError on an empty list, a
    non-number, a negative or a non-finite value."""
    radii = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise AnalyzeError(f"--radii: {item.strip()!r} is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise AnalyzeError(f"--radii: {item.strip()!r} is not a finite radius >= 0")
        radii.append(value)
    return sorted(set(radii))


def _radius_label(r: float) -> str:
    short = f"{r:g}"
    return short if float(short) == r else repr(r)


def _rows(report: dict) -> list[tuple[str, list[float]]]:
    return [*report["curves"].items(), ("envelope", report["envelope"])]


def render(report: dict, fmt: str) -> str:
    """Format an analyze() report, without a trailing newline.

    table: one row per file plus `envelope`, radii as column headers, percentages to one decimal;
    json: json.dumps of the report itself; tsv: a `file` column then one per radius, fractions
    at full precision, the envelope as the last row. AnalyzeError on an unknown format.
    """
    if fmt == "json":
        return json.dumps(report, indent=2)
    labels = [_radius_label(r) for r in report["radii"]]
    if fmt == "tsv":
        lines = ["\t".join(["file", *labels])]
        lines += ["\t".join([name, *map(repr, values)]) for name, values in _rows(report)]
        return "\n".join(lines)
    if fmt == "table":
        rows = [(name, [f"{100 * v:.1f}" for v in values]) for name, values in _rows(report)]
        first = max(len("radius"), *(len(name) for name, _ in rows))
        widths = [max(len(label), 5) for label in labels]

        def line(head: str, cells: list[str]) -> str:
            return "  ".join([head.ljust(first), *(c.rjust(w) for c, w in zip(cells, widths))])

        body = [line(name, cells) for name, cells in rows]
        return "\n".join(["certified accuracy (%) at radius", line("radius", labels), *body])
    raise AnalyzeError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def plot(report: dict, out_png: str | Path) -> None:
    """Write one PNG: a step curve of certified accuracy against radius per file, and the
    envelope dashed. Between two radii each step shows the accuracy at the larger one, a lower
    bound there, so the plot never overstates. AnalyzeError if the file cannot be written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    radii = report["radii"]
    for name, curve in report["curves"].items():
        ax.step(radii, curve, where="pre", label=name)
    ax.step(radii, report["envelope"], where="pre", color="black", linestyle="--", label="envelope")
    ax.set_xlabel("radius (ℓ₂)")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    try:
        fig.savefig(out_png, format="png")
    except OSError as exc:
        raise AnalyzeError(f"{out_png}: cannot write plot: {exc.strerror or exc}") from None


def run_cli(
    paths: Sequence[str],
    radii_text: str | None,
    fmt: str,
    plot_path: str | None,
    out: IO[str] | None = None,
) -> int:
    """`smoothcert analyze`: print the report for `paths` in `fmt` to `out` (stdout by default),
    write the plot when `plot_path` is given, return the exit code (0). `radii_text` None means
    DEFAULT_CURVE_RADII. AnalyzeError propagates for the caller to print as one line."""
    if fmt not in FORMATS:
        raise AnalyzeError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    radii = DEFAULT_CURVE_RADII if radii_text is None else parse_radii(radii_text)
    report = analyze(paths, radii)
    if plot_path:
        plot(report, plot_path)
    out = sys.stdout if out is None else out
    out.write(render(report, fmt) + "\n")
    return 0
