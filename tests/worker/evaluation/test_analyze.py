"""Tests for smoothcert.worker.evaluation.analyze: reading certification logs, certified accuracy, output."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from smoothcert.service.core.accuracy import DEFAULT_CURVE_RADII
from smoothcert.worker.evaluation.analyze import (
    AnalyzeError,
    analyze,
    certified_accuracy_of_log,
    parse_radii,
    parse_time,
    read_log,
    render,
    run_cli,
)
from tests.support.paths import TESTS

TESTS_DIR = TESTS
# The copy in tests/data keeps a clean clone self-contained; SMOOTHCERT_REFERENCE_DIR may point
# at another copy of the same three logs.
REFERENCE_DIR = Path(
    os.environ.get("SMOOTHCERT_REFERENCE_DIR", TESTS_DIR / "data" / "cohen-imagenet")
)
SIGMAS = ("0.25", "0.50", "1.00")
COHEN_FILES = [REFERENCE_DIR / f"noise_{s}_sigma_{s}.tsv" for s in SIGMAS]

# Cohen et al. (2019), ImageNet certified top-1 accuracy (%), best over σ, at these radii.
PAPER_RADII = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]
PAPER_PERCENT = [49, 37, 29, 19, 15, 12, 9]
# The exact fractions behind them (counted by hand from the logs): certified-correct / rows.
ENVELOPE_FRACTIONS = [211 / 427, 186 / 500, 143 / 500, 97 / 500, 74 / 500, 61 / 500, 45 / 500]

OUR_HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime\tp_a_lower\tn_a\tn\tradius_cap"


def write_log(tmp_path: Path, text: str, name: str = "log.tsv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def files() -> list[str]:
    for path in COHEN_FILES:
        assert path.is_file(), f"reference log missing: {path}"
    return [str(path) for path in COHEN_FILES]


@pytest.fixture
def ours(tmp_path: Path) -> Path:
    """A log in our format: plain-seconds time and extra columns after Cohen's."""
    return write_log(
        tmp_path,
        "\n".join(
            [
                OUR_HEADER,
                "0\t3\t3\t0.8\t1\t1.25\t0.9\t95000\t100000\t3.81",
                "1\t4\t-1\t0.0\t0\t0.5\t0.3\t40000\t100000\t3.81",
                "2\t5\t5\t2.0\t1\t2\t0.99\t99900\t100000\t3.81",
                "3\t6\t7\t1.5\t0\t3.0e-1\t0.95\t97000\t100000\t3.81",
            ]
        )
        + "\n",
    )


def test_envelope_reproduces_cohen_imagenet_row(files):
    report = analyze(files, PAPER_RADII)
    assert report["envelope"] == pytest.approx(ENVELOPE_FRACTIONS, abs=1e-15)
    assert [round(100 * x) for x in report["envelope"]] == PAPER_PERCENT


def test_per_file_curves_on_reference_logs(files):
    report = analyze(files, [0.0, 0.5, 1.0, 2.0])
    assert report["curves"] == {
        files[0]: pytest.approx([285 / 427, 211 / 427, 0.0, 0.0], abs=1e-15),
        files[1]: pytest.approx([286 / 500, 229 / 500, 186 / 500, 0.0], abs=1e-15),
        files[2]: pytest.approx([218 / 500, 189 / 500, 163 / 500, 97 / 500], abs=1e-15),
    }


def test_hms_time_parses(files):
    log = read_log(files[0])
    assert len(log) == 427 and log.idx[0] == 0 and log.idx[-1] == 42600
    assert log.time[0] == pytest.approx(2 * 60 + 31.238689, abs=1e-9)  # "0:02:31.238689"
    assert parse_time("0:00:02") == 2.0
    assert parse_time("1 day, 0:00:01.5") == pytest.approx(86401.5)


def test_plain_seconds_time_and_extra_columns(ours):
    log = read_log(ours)
    assert log.time.tolist() == pytest.approx([1.25, 0.5, 2.0, 0.3])
    assert log.predict.tolist() == [3, -1, 5, 7]
    assert log.correct.tolist() == [True, False, True, False]
    shares = certified_accuracy_of_log(log, [0, 0.8, 1.0, 2.0, 2.01])
    assert shares.tolist() == [0.5, 0.5, 0.25, 0.25, 0]


def test_columns_found_by_header_name(tmp_path):
    path = write_log(tmp_path, "time\tcorrect\tradius\tpredict\tlabel\tidx\n1.0\t1\t0.7\t2\t2\t0\n")
    log = read_log(path)
    assert log.radius.tolist() == [0.7] and log.correct.tolist() == [True]


def test_curves_monotone_non_increasing(files):
    for curve in analyze(files, DEFAULT_CURVE_RADII)["curves"].values():
        assert all(a >= b for a, b in zip(curve, curve[1:]))
        assert all(0.0 <= x <= 1.0 for x in curve)


def test_accuracy_at_radius_zero_is_share_correct(files, ours):
    for path in [*files, ours]:
        log = read_log(path)
        share = certified_accuracy_of_log(log, [0.0])[0]
        assert share == pytest.approx(log.correct.mean(), abs=1e-15)


def test_header_only_log_has_zero_accuracy(tmp_path):
    path = write_log(tmp_path, OUR_HEADER + "\n")
    assert len(read_log(path)) == 0
    assert analyze([path], [0.0, 1.0])["curves"][str(path)] == [0.0, 0.0]


def test_default_radii_are_the_curves_of_the_shared_contract():
    assert DEFAULT_CURVE_RADII == tuple(0.25 * i for i in range(17))  # 0, 0.25, ..., 4.0


def test_parse_radii():
    assert parse_radii("0,0.5,1") == [0.0, 0.5, 1.0]
    assert parse_radii(" 1, 0.25 ,1") == [0.25, 1.0]


@pytest.mark.parametrize("text", ["", "0,,1", "a", "0,-0.5", "nan", "inf"])
def test_parse_radii_rejects_garbage(text):
    with pytest.raises(AnalyzeError, match="--radii"):
        parse_radii(text)


def test_json_round_trips(files):
    report = analyze(files, PAPER_RADII)
    assert json.loads(render(report, "json")) == report
    assert set(report) == {"radii", "curves", "envelope", "acr"}


def test_tsv_parses(files):
    report = analyze(files, PAPER_RADII)
    lines = render(report, "tsv").split("\n")
    header = lines[0].split("\t")
    assert header[0] == "file" and header[-1] == "acr"
    assert [float(r) for r in header[1:-1]] == PAPER_RADII
    table = [line.split("\t") for line in lines[1:]]
    rows = {fields[0]: [float(x) for x in fields[1:-1]] for fields in table}
    assert list(rows) == [*files, "envelope"]
    assert rows["envelope"] == report["envelope"]
    assert all(rows[f] == report["curves"][f] for f in files)


def test_table_shows_percentages_per_file_and_envelope(files):
    table = render(analyze(files, PAPER_RADII), "table")
    rows = table.split("\n")
    assert rows[1].split() == ["radius", "0.5", "1", "1.5", "2", "2.5", "3", "3.5", "ACR"]
    assert rows[-1].split() == [
        "envelope",
        "49.4",
        "37.2",
        "28.6",
        "19.4",
        "14.8",
        "12.2",
        "9.0",
        "—",
    ]
    assert [row.split()[0] for row in rows[2:-1]] == files


def test_render_rejects_unknown_format(files):
    with pytest.raises(AnalyzeError, match="unknown format"):
        render(analyze(files, [0.0]), "csv")


def test_plot_writes_png(files, tmp_path):
    out = tmp_path / "curves.png"
    assert run_cli(files, None, "table", str(out), out=io.StringIO()) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_cli_prints_report(files):
    buffer = io.StringIO()
    assert run_cli(files, "0.5,1", "json", None, out=buffer) == 0
    report = json.loads(buffer.getvalue())
    assert report["radii"] == [0.5, 1.0]
    assert report["envelope"] == pytest.approx(ENVELOPE_FRACTIONS[:2], abs=1e-15)


BAD_LOGS = {
    "missing column": ("idx\tlabel\tpredict\tcorrect\ttime\n0\t1\t1\t1\t0.5\n", 1, "radius"),
    "bad number": (
        OUR_HEADER + "\n0\t1\t1\t0.5\t1\t1.0\t0.9\t9\t10\t3\n1\t1\t1\tabc\t1\t1.0\t0.9\t9\t10\t3\n",
        3,
        "radius",
    ),
    "ragged row": ("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\n", 2, "fields"),
    "correct not 0/1": (
        "idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t2\t1\n",
        2,
        "correct",
    ),
    "bad time": ("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\t0:2:x\n", 2, "time"),
    "empty file": ("", 1, "header"),
}


@pytest.mark.parametrize("case", list(BAD_LOGS))
def test_malformed_log_names_file_and_line(tmp_path, case):
    text, line, word = BAD_LOGS[case]
    path = write_log(tmp_path, text)
    with pytest.raises(AnalyzeError) as info:
        analyze([path], [0.0])
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: ") and word in message and "\n" not in message


def test_missing_file_names_file(tmp_path):
    path = tmp_path / "absent.tsv"
    with pytest.raises(AnalyzeError) as info:
        run_cli([str(path)], None, "table", None, out=io.StringIO())
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


@pytest.mark.process
def test_cli_analyze_end_to_end(files, tmp_path):
    command = [
        sys.executable,
        "-m",
        "smoothcert.service.cli",
        "analyze",
        *files,
        "--radii",
        ",".join(map(str, PAPER_RADII)),
        "--format",
        "json",
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "no output: is `analyze` wired into smoothcert.service.cli?"
    report = json.loads(done.stdout)
    assert [round(100 * x) for x in report["envelope"]] == PAPER_PERCENT


# ---------------------------------------------------------------- average certified radius

# `ours` by hand: rows 0 (radius 0.8) and 2 (radius 2.0) are right; the abstention and the wrong
# row count 0: (0.8 + 0 + 2.0 + 0) / 4 = 0.7.
OURS_ACR = 0.7


def _acr_by_hand(path: Path) -> float:
    """ACR with no numpy: read the columns by name, sum the radii of correct labelled rows."""
    lines = [line.split("\t") for line in path.read_text().splitlines() if line.strip()]
    header, rows = lines[0], lines[1:]
    at = {name: header.index(name) for name in ("label", "radius", "correct")}
    labelled = [row for row in rows if row[at["label"]] != "-1"]
    total = sum(float(row[at["radius"]]) for row in labelled if row[at["correct"]] == "1")
    return total / len(labelled)


def test_acr_of_our_log_by_hand(ours):
    assert analyze([ours], [0.0])["acr"] == {str(ours): pytest.approx(OURS_ACR, abs=1e-15)}


def test_acr_of_the_reference_logs(files):
    acr = analyze(files, [0.0])["acr"]
    for path in files:
        assert acr[path] == pytest.approx(_acr_by_hand(Path(path)), abs=1e-12)
    # larger σ trades accuracy near 0 for certificates further out: ACR grows with σ here
    assert [round(acr[path], 3) for path in files] == [0.477, 0.733, 0.875]


def test_a_log_without_labels_has_no_acr(tmp_path):
    path = write_log(tmp_path, OUR_HEADER + "\n0\t-1\t3\t0.8\t0\t1.0\t0.9\t95\t100\t3.81\n")
    report = analyze([path], [0.0])
    assert report["acr"] == {str(path): None}
    assert render(report, "tsv").split("\n")[1].split("\t")[-1] == ""
    assert render(report, "table").split("\n")[2].split()[-1] == "—"
    assert json.loads(render(report, "json"))["acr"][str(path)] is None


@pytest.mark.parametrize("fmt", ["table", "json", "tsv"])
def test_acr_in_every_format(ours, files, fmt):
    buffer = io.StringIO()
    assert run_cli([str(ours), files[1]], "0,1", fmt, None, out=buffer) == 0
    text = buffer.getvalue()
    expected = {str(ours): OURS_ACR, files[1]: _acr_by_hand(Path(files[1]))}
    if fmt == "json":
        assert json.loads(text)["acr"] == pytest.approx(expected, abs=1e-15)
    elif fmt == "tsv":
        lines = [line.split("\t") for line in text.rstrip("\n").split("\n")]
        assert lines[0] == ["file", "0", "1", "acr"] and all(len(f) == 4 for f in lines)
        acr = {fields[0]: fields[-1] for fields in lines[1:]}
        assert {name: float(acr[name]) for name in expected} == pytest.approx(expected, abs=1e-15)
        assert acr["envelope"] == ""
    else:
        lines = text.strip().split("\n")
        assert lines[1].split() == ["radius", "0", "1", "ACR"]
        acr = {line.split()[0]: line.split()[-1] for line in lines[2:]}
        assert acr == {
            str(ours): "0.700",
            files[1]: f"{expected[files[1]]:.3f}",
            "envelope": "—",
        }


# ---------------------------------------------------------------- the plot


def _with_provenance(tmp_path: Path, files: list[str]) -> list[str]:
    """Copies of the reference logs with the provenance the CLI writes beside a TSV."""
    out = []
    for path, sigma in zip(files, (0.25, 0.5, 1.0)):
        copy = tmp_path / Path(path).name
        copy.write_bytes(Path(path).read_bytes())
        provenance = {"sigma": sigma, "model_arch": "imagenet_resnet50", "n": 100000}
        Path(str(copy) + ".json").write_text(json.dumps(provenance))
        out.append(str(copy))
    return out


def _lines(fig):
    (ax,) = fig.axes
    envelope = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    runs = [line for line in ax.get_lines() if line.get_linestyle() != "--"]
    return ax, runs, envelope


def test_plot_covers_the_datas_radii_with_one_line_per_file_and_a_dashed_envelope(files, tmp_path):
    import matplotlib

    from smoothcert.worker.evaluation.analyze import plot

    paths = _with_provenance(tmp_path, files)
    logs = {path: read_log(path) for path in paths}
    out = tmp_path / "curves.png"
    fig = plot(logs, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert type(fig.canvas).__name__ == "FigureCanvasAgg" or matplotlib.get_backend() == "agg"
    ax, runs, envelope = _lines(fig)
    largest = max(float(log.radius.max()) for log in logs.values())
    assert ax.get_xlim() == pytest.approx((0.0, largest), abs=1e-12) and largest < 4.0
    assert len(runs) == len(files) and len(envelope) == 1
    # the envelope is beneath every run, so it shows beside them and hides none
    assert all(envelope[0].get_zorder() < run.get_zorder() for run in runs)
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert len(legend) == len(files) + 1
    for text, sigma in zip(legend, ("0.25", "0.5", "1")):
        assert f"σ={sigma}" in text and "imagenet_resnet50" in text and "ACR" in text
    assert "envelope" in legend[-1]


def test_plot_curves_are_exact_steps_not_a_grid(files, tmp_path):
    from smoothcert.worker.evaluation.analyze import plot

    logs = {path: read_log(path) for path in files}
    _, runs, (envelope,) = _lines(plot(logs, tmp_path / "c.png"))
    for run, log in zip(runs, logs.values()):
        xs, ys = run.get_xdata(), run.get_ydata()
        # every radius of a correct row is a corner, so far more points than a 0.25 grid's 17
        assert set(np.unique(log.radius[log.correct])) <= set(xs) and len(xs) > 100
        for r in (0.1, 0.5, 0.77, 1.3):  # the drawn curve at r is the certified accuracy at r
            after = [y for x, y in zip(xs, ys) if x >= r][0]
            assert after == pytest.approx(certified_accuracy_of_log(log, [r])[0], abs=1e-15)
    radii = [0.1, 0.5, 1.0, 2.0, 3.0]
    best = analyze(files, radii)["envelope"]
    xs, ys = envelope.get_xdata(), envelope.get_ydata()
    assert [[y for x, y in zip(xs, ys) if x >= r][0] for r in radii] == pytest.approx(best)


def test_plot_axis_reaches_the_radius_cap_and_the_legend_falls_back_to_the_file_name(
    ours, tmp_path
):
    from smoothcert.worker.evaluation.analyze import plot

    fig = plot({str(ours): read_log(ours)}, tmp_path / "c.png")
    ax, runs, _ = _lines(fig)
    assert ax.get_xlim() == pytest.approx((0.0, 3.81)) and runs[0].get_xdata()[-1] == 3.81
    assert ax.get_legend().get_texts()[0].get_text().startswith(ours.name + "; ACR 0.700")


def test_cli_plot_through_main(files, tmp_path, capsys):
    from smoothcert.service.cli.main import main

    paths = _with_provenance(tmp_path, files)
    out = tmp_path / "curves.png"
    assert main(["analyze", *paths, "--plot", str(out), "--format", "json"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(json.loads(capsys.readouterr().out)["acr"]) == set(paths)
