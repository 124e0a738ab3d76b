"""Write the web page's demo digits: one held-out scikit-learn digit of each class as an 8x8 PNG.

    PYTHONPATH=<a view of the package> python tools/demo_digits.py [OUT_DIR]

OUT_DIR defaults to service/api/static/ui/digits, where the page finds them; the files there
were made by this script, once, and are committed. The digits are the first test-split example
of each class 0-9, from the same split the demo model holds out (models/demo.py:
load_digits_split), so the demo model never saw them in training. Pixels are the digits' 0-16
values scaled to 8-bit grey (round(v / 16 * 255)); the API reads them back as v / 16 to within
1/510. digits.json lists each file with its label and its index in the test split.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from smoothcert.models.demo import load_digits_split

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "service" / "api" / "static" / "ui" / "digits"


def write_digits(out: Path) -> list[dict]:
    """The ten PNGs and digits.json under ``out``; returns the manifest's entries."""
    _, _, test_x, test_y = load_digits_split()
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for label in range(10):
        index = int(np.flatnonzero(test_y == label)[0])
        pixels = np.rint(test_x[index, 0] * 255).astype(np.uint8)
        name = f"digit-{label}.png"
        Image.fromarray(pixels).save(out / name, optimize=True)
        entries.append({"file": name, "label": label, "test_index": index})
    (out / "digits.json").write_text(
        json.dumps(
            {"source": "scikit-learn load_digits, test split of models/demo.py", "digits": entries},
            indent=1,
        )
        + "\n"
    )
    return entries


if __name__ == "__main__":
    write_digits(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
