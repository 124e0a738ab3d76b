"""Tests for smoothcert.worker.evaluation.analyze: reading certification logs, certified accuracy, output."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

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
    assert set(report) == {"radii", "curves", "envelope"}


def test_tsv_parses(files):
    report = analyze(files, PAPER_RADII)
    lines = render(report, "tsv").split("\n")
    header = lines[0].split("\t")
    assert header[0] == "file" and [float(r) for r in header[1:]] == PAPER_RADII
    table = [line.split("\t") for line in lines[1:]]
    rows = {fields[0]: [float(x) for x in fields[1:]] for fields in table}
    assert list(rows) == [*files, "envelope"]
    assert rows["envelope"] == report["envelope"]
    assert all(rows[f] == report["curves"][f] for f in files)


def test_table_shows_percentages_per_file_and_envelope(files):
    table = render(analyze(files, PAPER_RADII), "table")
    rows = table.split("\n")
    assert rows[1].split() == ["radius", "0.5", "1", "1.5", "2", "2.5", "3", "3.5"]
    assert rows[-1].split() == ["envelope", "49.4", "37.2", "28.6", "19.4", "14.8", "12.2", "9.0"]
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
