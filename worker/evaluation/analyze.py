"""Certified accuracy from certification logs (`smoothcert analyze`).

A certification log is a tab-separated file with a header line whose columns include Cohen et
al.'s `idx label predict radius correct time` (ours add `p_a_lower n_a n radius_cap ...` after
them; columns are found by name and the rest are ignored, but for `radius_cap`, which bounds the
plot's axis). Certified accuracy at radius r is the share of rows with `correct == 1` and
`radius >= r`, and the average certified radius (ACR) the mean over the labelled rows (`label`
not −1) of `radius` where `correct == 1`, 0 elsewhere (:mod:`smoothcert.service.core.accuracy`);
the envelope takes, at each radius, the best over the files given (the way the paper's tables
take the best over σ).

The plot's legend names each file's σ and model from the provenance the CLI writes beside its
TSV (`FILE.json`, :func:`smoothcert.service.cli.options.write_out`), or the file's name without.

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
from typing import IO, TYPE_CHECKING, Any, Sequence

import numpy as np
from numpy.typing import DTypeLike

from smoothcert.service.core.accuracy import (
    DEFAULT_CURVE_RADII,
    average_certified_radius,
    certified_accuracy,
    certified_accuracy_steps,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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
    radius_cap: np.ndarray | None = None  # when the log has the column (ours, not Cohen's)

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


def _parse_cap(text: str) -> float:
    value = float(text)
    if math.isnan(value) or value < 0:
        raise ValueError(text)
    return value


# columns read when the header has them
_OPTIONAL_PARSERS: dict[str, tuple[Callable[[str], Any], str, DTypeLike]] = {
    "radius_cap": (_parse_cap, "a number >= 0", np.float64),
}


def read_log(path: str | Path) -> CertLog:
    """Read a certification TSV into a CertLog.

    Requires a header naming every column of REQUIRED_COLUMNS (any order, extra columns ignored)
    and, on every other non-blank line, exactly as many tab-separated fields as the header, with
    integers for idx/label/predict, 0 or 1 for correct, a finite radius >= 0, and time as plain
    seconds or H:MM:SS.micro (and a number >= 0 for radius_cap, when there is that column). Blank
    lines are skipped. A header-only log is valid and has no rows.
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
    parsers = dict(_PARSERS)
    if "radius_cap" in header:
        parsers["radius_cap"] = _OPTIONAL_PARSERS["radius_cap"]
    position = {column: header.index(column) for column in parsers}
    values: dict[str, list] = {column: [] for column in parsers}
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise AnalyzeError(
                f"{name}:{lineno}: {len(fields)} fields, expected {len(header)} as in the header"
            )
        for column, (parse, expected, _) in parsers.items():
            text = fields[position[column]].strip()
            try:
                values[column].append(parse(text))
            except ValueError:
                raise AnalyzeError(
                    f"{name}:{lineno}: column {column}: {text[:40]!r} is not {expected}"
                ) from None
    arrays = {c: np.asarray(values[c], dtype=dtype) for c, (_, _, dtype) in parsers.items()}
    return CertLog(path=name, **arrays)


def certified_accuracy_of_log(log: CertLog, radii: Sequence[float]) -> np.ndarray:
    """Share of the log's rows with correct == 1 and radius >= r, for each r in radii (float64
    array). A log with no rows has accuracy 0.0 at every radius.
    """
    return certified_accuracy(log.correct, log.radius, radii)


def acr_of_log(log: CertLog) -> float | None:
    """The log's average certified radius: the mean over its labelled rows (label not −1) of the
    radius where correct == 1, 0 elsewhere; None when no row has a label."""
    labelled = log.label != -1
    if not labelled.any():
        return None
    return average_certified_radius(log.correct[labelled], log.radius[labelled])


def analyze(paths: Sequence[str | Path], radii: Sequence[float]) -> dict:
    """Certified accuracy and ACR of each log, and the envelope over them.

    Returns {"radii": [...], "curves": {path_as_given: [...]}, "envelope": [...], "acr":
    {path_as_given: float or None}}, plain floats, accuracies as fractions in [0, 1]; the envelope
    is the maximum over the files at each radius; ACR is None for a log without labels.
    Raises AnalyzeError when no path is given or a log is malformed.
    """
    return _report(_read_all(paths), radii)


def _read_all(paths: Sequence[str | Path]) -> dict[str, CertLog]:
    if not paths:
        raise AnalyzeError("no certification logs given")
    return {str(p): read_log(p) for p in paths}


def _report(logs: dict[str, CertLog], radii: Sequence[float]) -> dict:
    radii = [float(r) for r in radii]
    curves = {name: certified_accuracy_of_log(log, radii) for name, log in logs.items()}
    envelope = np.max(np.stack(list(curves.values())), axis=0)
    return {
        "radii": radii,
        "curves": {name: curve.tolist() for name, curve in curves.items()},
        "envelope": envelope.tolist(),
        "acr": {name: acr_of_log(log) for name, log in logs.items()},
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


def _rows(report: dict) -> list[tuple[str, list[float], float | None]]:
    acr = report.get("acr", {})
    return [
        *((name, curve, acr.get(name)) for name, curve in report["curves"].items()),
        ("envelope", report["envelope"], None),
    ]


def render(report: dict, fmt: str) -> str:
    """Format an analyze() report, without a trailing newline.

    table: one row per file plus `envelope`, radii as column headers, percentages to one decimal,
    then the file's ACR to three decimals (`—` for the envelope and a log without labels);
    json: json.dumps of the report itself; tsv: a `file` column, one per radius, fractions at full
    precision, then `acr` (empty for the envelope, the last row, and a log without labels).
    AnalyzeError on an unknown format.
    """
    if fmt == "json":
        return json.dumps(report, indent=2)
    labels = [_radius_label(r) for r in report["radii"]]
    if fmt == "tsv":
        lines = ["\t".join(["file", *labels, "acr"])]
        lines += [
            "\t".join([name, *map(repr, values), "" if acr is None else repr(acr)])
            for name, values, acr in _rows(report)
        ]
        return "\n".join(lines)
    if fmt == "table":
        rows = [
            (name, [f"{100 * v:.1f}" for v in values] + ["—" if acr is None else f"{acr:.3f}"])
            for name, values, acr in _rows(report)
        ]
        first = max(len("radius"), *(len(name) for name, _ in rows))
        widths = [max(len(label), 5) for label in [*labels, "ACR"]]

        def line(head: str, cells: list[str]) -> str:
            return "  ".join([head.ljust(first), *(c.rjust(w) for c, w in zip(cells, widths))])

        body = [line(name, cells) for name, cells in rows]
        title = "certified accuracy (%) at radius; ACR: average certified radius"
        return "\n".join([title, line("radius", [*labels, "ACR"]), *body])
    raise AnalyzeError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def read_provenance(path: str | Path) -> dict | None:
    """The provenance the CLI writes beside a TSV (``FILE.json``), or None when there is none or it
    is not a JSON object."""
    try:
        value = json.loads(Path(str(path) + ".json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def legend_label(path: str | Path, provenance: dict | None = None) -> str:
    """A file's name on the plot: ``σ=S, MODEL`` from its provenance (the model's id in the store,
    else its architecture, else its format; the file's name when none), else the file's name."""
    name = Path(path).name
    if not provenance:
        return name
    model = next(
        (
            str(provenance[key])
            for key in ("model_id", "model_arch", "model_format")
            if provenance.get(key) not in (None, "")
        ),
        name,
    )
    sigma = provenance.get("sigma")
    if isinstance(sigma, (int, float)) and not isinstance(sigma, bool):
        return f"σ={sigma:g}, {model}"
    return model


def plot_extent(logs: Sequence[CertLog]) -> float:
    """The radii the plot covers, [0, this]: the largest radius of any row, or the largest radius
    cap where a log has that column (beyond it no row could be certified); 1.0 when both are 0."""
    largest = 0.0
    for log in logs:
        if len(log):
            largest = max(largest, float(log.radius.max()))
        if log.radius_cap is not None and len(log.radius_cap):
            caps = log.radius_cap[np.isfinite(log.radius_cap)]
            if len(caps):
                largest = max(largest, float(caps.max()))
    return largest if largest > 0 else 1.0


def envelope_steps(logs: Sequence[CertLog]) -> list[tuple[float, float]]:
    """The envelope's whole curve as (radius, accuracy) corners, like
    :func:`~smoothcert.service.core.accuracy.certified_accuracy_steps`: every file's curve is
    constant between the radii of the files' correct rows, so the best of them is too."""
    steps = np.unique(np.concatenate([log.radius[log.correct] for log in logs])).tolist()
    at = np.max(
        np.stack([certified_accuracy(log.correct, log.radius, [0.0, *steps]) for log in logs]),
        axis=0,
    ).tolist()
    past = [*at[2:], 0.0]
    points = [(0.0, at[0])]
    for step, a, b in zip(steps, at[1:], past):
        points += [(step, a), (step, b)]
    return points


def _to(points: list[tuple[float, float]], extent: float) -> tuple[list[float], list[float]]:
    """The corners as x and y lists, carried on flat to ``extent``."""
    points = [*points, (max(extent, points[-1][0]), points[-1][1])]
    return [x for x, _ in points], [y for _, y in points]


def plot(logs: dict[str, CertLog], out_png: str | Path) -> Figure:
    """Write one PNG: each file's certified accuracy against radius as its exact, continuous step
    curve over the radii the data covers (:func:`plot_extent`), labelled by σ and model
    (:func:`legend_label`) and its ACR, and the envelope (the best file at each radius) as a wide,
    pale dashed line drawn beneath the runs, so that it shows beside them and hides none.
    Returns the figure; AnalyzeError if the file cannot be written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    extent = plot_extent(list(logs.values()))
    labels = {name: legend_label(name, read_provenance(name)) for name in logs}
    repeated = {label for label in labels.values() if list(labels.values()).count(label) > 1}
    for name, log in logs.items():
        label = labels[name]
        if label in repeated:
            label = f"{label} ({Path(name).name})"
        acr = acr_of_log(log)
        if acr is not None:
            label = f"{label}; ACR {acr:.3f}"
        xs, ys = _to(certified_accuracy_steps(log.correct, log.radius), extent)
        ax.plot(xs, ys, linewidth=1.5, zorder=3, label=label)
    xs, ys = _to(envelope_steps(list(logs.values())), extent)
    ax.plot(
        xs,
        ys,
        color="0.55",
        linestyle="--",
        linewidth=3.5,
        alpha=0.6,
        zorder=2,
        label="envelope (best at each radius)",
    )
    ax.set_xlim(0, extent)
    ax.set_ylim(0, 1)
    ax.set_xlabel("radius (ℓ₂)")
    ax.set_ylabel("certified accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    try:
        fig.savefig(out_png, format="png")
    except OSError as exc:
        raise AnalyzeError(f"{out_png}: cannot write plot: {exc.strerror or exc}") from None
    return fig


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
    logs = _read_all(paths)
    report = _report(logs, radii)
    if plot_path:
        plot(logs, plot_path)
    out = sys.stdout if out is None else out
    out.write(render(report, fmt) + "\n")
    return 0
