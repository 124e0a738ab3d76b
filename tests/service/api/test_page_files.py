"""The page's files as shipped: the test ids end-to-end tests rely on, nothing from elsewhere, and
demo digits that are what tools/demo_digits.py makes. The page in a browser: tests/browser."""

from __future__ import annotations

import importlib.util
import json
import re

import numpy as np
from PIL import Image

from smoothcert.models.demo import load_digits_split
from tests.support.paths import ROOT

UI = ROOT / "service" / "api" / "static" / "ui"
# issue 14's list: stable hooks for end-to-end tests
TEST_IDS = (
    "api-key",
    "save-key",
    "model-select",
    "image-input",
    "sigma",
    "n",
    "alpha",
    "submit",
    "job-id",
    "job-status",
    "progress",
    "cancel",
    "result-class",
    "result-radius",
    "result-cap",
    "result-abstained",
    "vote-histogram",
    "noisy-samples",
    "jobs-table",
    "curve",
)


def test_the_page_carries_every_test_id_once():
    html = (UI / "index.html").read_text()
    for test_id in TEST_IDS:
        assert html.count(f'data-testid="{test_id}"') == 1, test_id


# XML namespace names look like URLs but are only names: nothing ever fetches them.
NAMESPACES = ("http://www.w3.org/2000/svg",)


def test_the_page_names_no_other_origin():
    for path in UI.glob("*.*"):
        if path.suffix in (".html", ".js", ".css"):
            text = path.read_text()
            for name in NAMESPACES:
                text = text.replace(f'"{name}"', '""')
            assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), path.name


def test_the_demo_digits_are_what_the_tool_makes(tmp_path):
    spec = importlib.util.spec_from_file_location("demo_digits", ROOT / "tools" / "demo_digits.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    made = tool.write_digits(tmp_path)
    shipped = json.loads((UI / "digits" / "digits.json").read_text())["digits"]
    assert made == shipped and [d["label"] for d in shipped] == list(range(10))
    _, _, test_x, test_y = load_digits_split()
    for entry in shipped:
        pixels = np.asarray(Image.open(UI / "digits" / entry["file"]))
        assert np.array_equal(pixels, np.asarray(Image.open(tmp_path / entry["file"])))
        assert test_y[entry["test_index"]] == entry["label"]
        assert np.abs(pixels / 255 - test_x[entry["test_index"], 0]).max() <= 1 / 510 + 1e-6
