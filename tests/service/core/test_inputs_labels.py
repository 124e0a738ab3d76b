"""load_labels: a label file (.npy, or text with one label per line) or a comma list "0, 1, 2"."""

from __future__ import annotations

import numpy as np
import pytest

from smoothcert.service.core.inputs import InputFileError, load_labels, parse_label_list


@pytest.mark.parametrize("text", ["0,1,2", "0, 1,2", " 0 , 1 , 2 ", "0,1,2 "])
def test_a_comma_list(text):
    labels = load_labels(text, 3)
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 2]


def test_one_label_for_one_input():
    assert load_labels("7", 1).tolist() == [7]


def test_files_as_before(tmp_path):
    np.save(tmp_path / "y.npy", np.array([3, 1], dtype=np.int32))
    (tmp_path / "y.txt").write_text("3\n1\n")
    assert load_labels(tmp_path / "y.npy", 2).tolist() == [3, 1]
    assert load_labels(str(tmp_path / "y.txt"), 2).tolist() == [3, 1]


def test_a_file_wins_over_a_list(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "5").write_text("1\n2\n")  # a file named like a one-label list
    assert load_labels("5", 2).tolist() == [1, 2]


@pytest.mark.parametrize(
    "text", ["0,,1", "0;1;2", "a,b", "0,1.5", "-1,0", "", ",", "0 1 2", "missing.npy"]
)
def test_anything_else_is_a_clear_error(text):
    with pytest.raises(InputFileError) as info:
        load_labels(text, 3)
    message = str(info.value)
    assert "neither a file" in message and "comma list" in message and "\n" not in message
    assert parse_label_list(text) is None


def test_the_count_is_checked_for_a_list_too():
    with pytest.raises(InputFileError, match="2 labels for 3 inputs"):
        load_labels("0, 1", 3)
