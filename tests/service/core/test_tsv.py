"""TSV rows keep Cohen et al.'s column order and full-precision numbers."""

from smoothcert.service.core.tsv import CERTIFY_COLUMNS, format_tsv
from smoothcert.worker.evaluation.analyze import read_log

ROWS = [
    {
        "index": 0,
        "prediction": 3,
        "abstained": False,
        "radius": 0.1234567890123456,
        "p_a_lower": 0.7,
        "n_a": 700,
        "n": 1000,
        "radius_cap": 0.77,
        "elapsed_s": 0.5,
    },
    {
        "index": 1,
        "prediction": None,
        "abstained": True,
        "radius": 0.0,
        "p_a_lower": 0.3,
        "n_a": 300,
        "n": 1000,
        "radius_cap": 0.77,
        "elapsed_s": 0.5,
    },
]


def test_certify_rows_with_labels(tmp_path):
    text = format_tsv(ROWS, labels=[3, 4])
    lines = [line.split("\t") for line in text.splitlines()]
    assert tuple(lines[0]) == CERTIFY_COLUMNS
    assert lines[1][:5] == ["0", "3", "3", "0.1234567890123456", "1"]
    assert lines[2][:5] == ["1", "4", "-1", "0.0", "0"]
    path = tmp_path / "r.tsv"
    path.write_text(text)
    log = read_log(path)
    assert list(log.correct) == [True, False] and log.radius[0] == 0.1234567890123456


def test_without_labels_label_is_minus_one_and_nothing_is_correct():
    lines = [line.split("\t") for line in format_tsv(ROWS).splitlines()[1:]]
    assert [(row[1], row[4]) for row in lines] == [("-1", "0"), ("-1", "0")]


def test_predict_rows_and_top2_column():
    predict = [
        {
            "index": 0,
            "prediction": 2,
            "abstained": False,
            "p_value": 0.001,
            "n_a": 90,
            "n_b": 10,
            "n": 100,
            "elapsed_s": 0.1,
        }
    ]
    header, row = format_tsv(predict, labels=[2]).splitlines()
    assert header.split("\t")[:5] == ["idx", "label", "predict", "correct", "time"]
    assert row.split("\t")[:4] == ["0", "2", "2", "1"]
    top2 = [{**ROWS[0], "p_b_upper": 0.2}]
    assert format_tsv(top2).splitlines()[0].endswith("\tp_b_upper")
