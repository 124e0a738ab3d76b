"""`--labels` through the real CLI, in process: a comma list such as "0, 1,2" labels the rows as a
file of the same labels does, and anything else is one clear line and exit status 2."""

from __future__ import annotations

import numpy as np
import pytest

from smoothcert.service.cli.main import main
from smoothcert.worker.evaluation.analyze import read_log


@pytest.fixture(scope="module")
def three(demo_paths, tmp_path_factory):
    """The first three test digits, and their true labels as a comma list with spaces."""
    folder = tmp_path_factory.mktemp("three")
    x, y = np.load(demo_paths["test_x"])[:3], np.load(demo_paths["test_y"])[:3]
    np.save(folder / "x.npy", x)
    np.save(folder / "y.npy", y)
    text = f"{y[0]}, {y[1]},{y[2]}"
    assert " " in text and text.count(",") == 2
    return folder, y, text


def _certify(demo_paths, x, labels, out) -> int:
    return main(
        [
            "certify",
            str(demo_paths["safetensors"]),
            "--inputs",
            str(x),
            "--labels",
            labels,
            "--sigma",
            "0.25",
            "--n0",
            "20",
            "--n",
            "200",
            "--seed",
            "3",
            "--runtime",
            "torch",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )


def test_a_comma_list_labels_the_rows_like_a_file(demo_paths, three, tmp_path):
    folder, y, text = three
    assert _certify(demo_paths, folder / "x.npy", text, tmp_path / "list.tsv") == 0
    assert _certify(demo_paths, folder / "x.npy", str(folder / "y.npy"), tmp_path / "file.tsv") == 0
    listed, filed = read_log(tmp_path / "list.tsv"), read_log(tmp_path / "file.tsv")
    assert listed.label.tolist() == [int(v) for v in y]
    assert listed.correct.tolist() == (listed.predict == y).tolist()
    assert listed.correct.any()  # the demo model gets most digits right
    assert listed.correct.tolist() == filed.correct.tolist()
    assert listed.radius.tolist() == filed.radius.tolist()


@pytest.mark.parametrize("labels", ["0;1;2", "zero,one,two", "0,1,"])
def test_anything_else_is_one_clear_line_and_status_2(demo_paths, three, tmp_path, capsys, labels):
    folder, _, _ = three
    assert _certify(demo_paths, folder / "x.npy", labels, tmp_path / "r.tsv") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "comma list" in err and repr(labels) in err
    assert not (tmp_path / "r.tsv").exists()


def test_a_list_of_the_wrong_length_is_refused(demo_paths, three, tmp_path, capsys):
    folder, _, _ = three
    assert _certify(demo_paths, folder / "x.npy", "0, 1", tmp_path / "r.tsv") == 2
    assert "2 labels for 3 inputs" in capsys.readouterr().err
