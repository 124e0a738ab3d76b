"""Result rows as TSV: Cohen et al.'s columns first (so their tools read our files), then ours."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

CERTIFY_COLUMNS = (
    "idx",
    "label",
    "predict",
    "radius",
    "correct",
    "time",
    "p_a_lower",
    "n_a",
    "n",
    "radius_cap",
)
PREDICT_COLUMNS = ("idx", "label", "predict", "correct", "time", "p_value", "n_a", "n_b", "n")
AT_RADIUS_COLUMNS = (
    "idx",
    "label",
    "predict",
    "radius",
    "correct",
    "time",
    "p_a_lower",
    "n_a",
    "n",
    "certified_at_r",
    "samples_used",
    "target_radius",
)


def format_tsv(
    results: Sequence[dict], labels: Sequence[int] | Mapping[int, int] | None = None
) -> str:
    """Render certify or predict result dicts (``Run.to_dict()["results"]``) as one TSV text.

    ``labels[row["index"]]`` is a row's label. ``predict`` is −1 on abstention; ``label`` is −1
    and ``correct`` 0 without labels; radii and probabilities are written at full float precision
    (``repr``), ``time`` in seconds. Certify rows from the top2 bound get a trailing
    ``p_b_upper`` column; rows of a target-radius run end with ``certified_at_r samples_used
    target_radius`` instead of ``radius_cap``. Rows with a ``name`` (the input's file name, or
    the request's ``names``) add a last ``name`` column.
    """
    certify = bool(results) and "radius" in results[0]
    at_radius = certify and "certified_at_r" in results[0]
    columns = list(
        AT_RADIUS_COLUMNS
        if at_radius
        else CERTIFY_COLUMNS
        if certify or not results
        else PREDICT_COLUMNS
    )
    top2 = certify and "p_b_upper" in results[0]
    if top2:
        columns.append("p_b_upper")
    named = any(row.get("name") is not None for row in results)
    if named:
        columns.append("name")
    lines = ["\t".join(columns)]
    for row in results:
        index = row["index"]
        label = -1 if labels is None else int(labels[index])
        prediction = -1 if row["prediction"] is None else int(row["prediction"])
        correct = int(labels is not None and prediction == label and prediction != -1)
        values = {
            "idx": index,
            "label": label,
            "predict": prediction,
            "correct": correct,
            "time": repr(float(row["elapsed_s"])),
            **{k: row[k] for k in ("n_a", "n")},
        }
        if at_radius:
            values.update(
                radius=repr(float(row["radius"])),
                p_a_lower=repr(float(row["p_a_lower"])),
                certified_at_r=int(row["certified_at_r"]),
                samples_used=row["samples_used"],
                target_radius=repr(float(row["target_radius"])),
            )
        elif certify:
            values.update(
                radius=repr(float(row["radius"])),
                p_a_lower=repr(float(row["p_a_lower"])),
                radius_cap=repr(float(row["radius_cap"])),
            )
            if top2:
                values["p_b_upper"] = repr(float(row["p_b_upper"]))
        else:
            values.update(p_value=repr(float(row["p_value"])), n_b=row["n_b"])
        if named:  # names hold no control character (tabs, newlines): they were checked
            values["name"] = row.get("name") or ""
        lines.append("\t".join(str(values[c]) for c in columns))
    return "\n".join(lines) + "\n"
