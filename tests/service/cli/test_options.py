"""The flags certify/predict and submit share: one definition, defaults here or on the server."""

from __future__ import annotations

import argparse
from pathlib import Path

from smoothcert.service.cli import options
from smoothcert.service.cli.main import build_parser
from smoothcert.service.core.params import DEFAULT_ALPHA, DEFAULT_N, DEFAULT_N0

SHARED = (
    "inputs",
    "labels",
    "sigma",
    "n0",
    "n",
    "alpha",
    "batch_size",
    "seed",
    "bound",
    "target_radius",
    "out",
)


def actions(command: str) -> dict[str, argparse.Action]:
    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {a.dest: a for a in sub.choices[command]._actions}


def test_certify_and_submit_flags_differ_only_in_default_and_help():
    local, remote = actions("certify"), actions("submit")
    for dest in SHARED:
        a, b = local[dest], remote[dest]
        assert (a.option_strings, a.type, a.choices, a.metavar, a.nargs) == (
            b.option_strings,
            b.type,
            b.choices,
            b.metavar,
            b.nargs,
        ), dest
    assert [local[d].default for d in ("n0", "n", "alpha", "bound")] == [
        DEFAULT_N0,
        DEFAULT_N,
        DEFAULT_ALPHA,
        "cohen",
    ]
    assert all(remote[d].default is None for d in SHARED)  # the service applies its defaults
    assert local["n0"].help == f"samples to select the class (default {DEFAULT_N0})"
    assert remote["n0"].help == f"samples to select the class (server default {DEFAULT_N0})"


def test_write_out_without_a_file_prints_the_text_only(capsys):
    options.write_out("text", None, {"seed": 1})
    assert capsys.readouterr().out == "text"


def test_write_out_puts_the_provenance_beside_the_file(tmp_path, capsys):
    out = tmp_path / "rows.tsv"
    options.write_out("text", str(out), {"seed": 1})
    assert (out.read_text(), Path(f"{out}.json").read_text()) == ("text", '{\n  "seed": 1\n}\n')
    options.write_out("again", str(out))  # no provenance: the .json stays as it was
    assert (
        Path(f"{out}.json").read_text() == '{\n  "seed": 1\n}\n' and capsys.readouterr().out == ""
    )
