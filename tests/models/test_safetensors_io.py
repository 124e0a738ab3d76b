"""safetensors files: the header is checked in plain Python before any tensor is read."""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smoothcert.models.architectures import build_network
from smoothcert.models.metadata import (
    METADATA_KEY,
    ModelError,
    ModelInfo,
    Normalization,
    parse_info_json,
)
from smoothcert.models.safetensors_header import read_safetensors_header
from smoothcert.models.safetensors_io import load_safetensors_state, save_safetensors_model


def write_raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    """A file laid out as the format says, with whatever header we choose (honest or not)."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _digits_info(**changes) -> ModelInfo:
    fields = dict(
        format="safetensors",
        input_shape=(1, 8, 8),
        num_classes=10,
        arch="digits_cnn",
        class_names=[str(i) for i in range(10)],
        normalization=Normalization((0.3,), (0.4,)),
        sigma=0.25,
        name="digits",
        extra={"epochs": 3},
    )
    fields.update(changes)
    return ModelInfo(**fields)


def test_saved_file_describes_itself_in_its_header(tmp_path):
    net = build_network("digits_cnn", 10)
    path = save_safetensors_model(tmp_path / "m.safetensors", net, _digits_info())
    tensors, metadata = read_safetensors_header(path)
    assert set(tensors) == set(net.state_dict())
    assert tensors["fc.weight"] == {
        "dtype": "F32",
        "shape": [10, 128],
        "data_offsets": tensors["fc.weight"]["data_offsets"],
    }
    fields = parse_info_json(metadata[METADATA_KEY])
    assert fields["arch"] == "digits_cnn" and fields["sigma"] == 0.25
    assert fields["normalization"] == Normalization((0.3,), (0.4,))
    assert fields["input_shape"] == (1, 8, 8) and fields["extra"] == {"epochs": 3}
    state, _ = load_safetensors_state(path)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_saving_needs_an_allow_listed_architecture(tmp_path):
    net = build_network("digits_cnn", 10)
    with pytest.raises(ModelError, match="arch"):
        save_safetensors_model(tmp_path / "m.safetensors", net, _digits_info(arch=None))
    with pytest.raises(ModelError, match="unknown architecture"):
        save_safetensors_model(tmp_path / "m.safetensors", net, _digits_info(arch="mystery"))


def test_an_honest_hand_written_file_passes(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "I64", "shape": [], "data_offsets": [8, 16]},
        "__metadata__": {"k": "v"},
    }
    tensors, metadata = read_safetensors_header(
        write_raw_safetensors(tmp_path / "ok.safetensors", header, bytes(16))
    )
    assert set(tensors) == {"a", "b"} and metadata == {"k": "v"}


LIES = {
    "data shorter than the header claims": (
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
        8,
        "truncated",
    ),
    "offsets disagree with the shape": (
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}},
        16,
        "needs 8",
    ),
    "overlapping tensors": (
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        12,
        "overlapping",
    ),
    "a gap between tensors": (
        {
            "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
        },
        12,
        "gapped",
    ),
    "trailing bytes": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 12, "padded"),
    "an unknown dtype": (
        {"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}},
        4,
        "unknown dtype",
    ),
    "a negative dimension": (
        {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
        4,
        "invalid shape",
    ),
    "reversed offsets": (
        {"a": {"dtype": "F32", "shape": [0], "data_offsets": [4, 0]}},
        4,
        "invalid data_offsets",
    ),
    "an extra field": (
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}},
        4,
        "exactly",
    ),
    "non-string metadata": ({"__metadata__": {"k": 1}}, 0, "strings to strings"),
}


@pytest.mark.parametrize("case", sorted(LIES))
def test_a_lying_header_is_refused(tmp_path, case):
    header, data_size, message = LIES[case]
    path = write_raw_safetensors(tmp_path / "lie.safetensors", header, bytes(data_size))
    with pytest.raises(ModelError, match=message):
        read_safetensors_header(path)
    with pytest.raises(ModelError):
        load_safetensors_state(path)


def test_header_length_beyond_the_file_is_refused(tmp_path):
    path = tmp_path / "long.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b'{"a": 1}')
    with pytest.raises(ModelError, match="does not fit"):
        read_safetensors_header(path)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "too short"),
        (b"\x02\x00\x00", "too short"),
        (struct.pack("<Q", 4) + b"nope", "not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "object"),
        (struct.pack("<Q", 16) + b'{"a": 1, "a": 2}', "twice"),
    ],
)
def test_malformed_files_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=message):
        read_safetensors_header(path)


def test_a_truncated_model_file_is_refused(tmp_path):
    path = save_safetensors_model(
        tmp_path / "m.safetensors", build_network("digits_cnn", 10), _digits_info()
    )
    content = path.read_bytes()
    for cut in (len(content) - 1, len(content) // 2, 100):
        path.write_bytes(content[:cut])
        with pytest.raises(ModelError):
            load_safetensors_state(path)


class _WritesMarker:
    """Unpickling this object creates a file: proof that someone unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_is_refused_without_unpickling_it(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(_WritesMarker(marker), protocol=4))
    with pytest.raises(ModelError, match="pickled PyTorch checkpoint.*never unpickles"):
        read_safetensors_header(path)
    with pytest.raises(ModelError, match="pickled"):
        load_safetensors_state(path)
    assert not marker.exists()


@pytest.mark.process
def test_header_checks_do_not_import_torch(tmp_path):
    path = save_safetensors_model(
        tmp_path / "m.safetensors", build_network("digits_cnn", 10), _digits_info()
    )
    code = (
        "import sys; from smoothcert.models.safetensors_header import read_safetensors_header; "
        f"read_safetensors_header({str(path)!r}); "
        "assert 'torch' not in sys.modules and 'safetensors' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("header_len", [0x280, 0x380, 0x580])
def test_a_header_length_that_starts_like_a_pickle_is_still_safetensors(tmp_path, header_len):
    # 0x280 is written b"\x80\x02\0\0\0\0\0\0": the bytes of a protocol-2 pickle's start.
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header = header.ljust(header_len, b" ")  # the format pads headers with spaces
    path = tmp_path / "padded.safetensors"
    path.write_bytes(struct.pack("<Q", header_len) + header + struct.pack("<2f", 1.5, -2.0))
    assert path.read_bytes()[:1] == b"\x80"
    tensors, _ = read_safetensors_header(path)
    assert tensors["a"]["shape"] == [2]
    state, _ = load_safetensors_state(path)
    assert state["a"].tolist() == [1.5, -2.0]
