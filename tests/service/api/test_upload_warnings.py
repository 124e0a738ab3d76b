"""An upload without normalization is answered with a warning saying what that means (the model
then receives pixels in [0, 1] as they are); with it, or from a file that carries it, none."""

from __future__ import annotations

import pytest
import torch

from tests.support.stack import upload_model, upload_model_file
from tests.test_guide import load_example

pytestmark = pytest.mark.process


@pytest.fixture(scope="module")
def plain_onnx(tmp_path_factory):
    """The guide's MLP (untrained: its weights do not matter here) as ONNX without metadata."""
    example = load_example()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    return example.export(model, tmp_path_factory.mktemp("plain") / "plain.onnx")


def test_no_normalization_is_warned_of(admin, plain_onnx):
    resp = upload_model_file(admin, plain_onnx)
    assert resp.status_code == 201, resp.text
    [warning] = resp.json()["warnings"]
    assert warning.startswith("no normalization given") and "[0, 1]" in warning
    assert admin.get(f"/v1/models/{resp.json()['id']}").json()["warnings"] == [warning]


def test_given_normalization_is_not(admin, plain_onnx, demo_paths):
    given = upload_model(
        admin, "norm.onnx", plain_onnx.read_bytes(), normalization='{"mean": [0.3], "std": [0.4]}'
    )
    assert given.status_code == 201, given.text
    assert "warnings" not in given.json()
    carried = upload_model_file(admin, demo_paths["onnx"])  # its metadata holds normalization
    assert carried.status_code == 201 and "warnings" not in carried.json()
