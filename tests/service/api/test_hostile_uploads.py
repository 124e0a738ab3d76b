"""Hostile uploads against the running stack, the issue's checklist: each one is refused with a
4xx whose message says why, nothing is unpickled, no file outside the data dir is read or
written, and nothing is left behind in the data dir (no pending model, no partial dataset).

Payloads are built in memory, so the test's own tmp dir stays empty: it only names the marker
file that an unpickled payload would create.
"""

from __future__ import annotations

import io
import json
import pickle
import socket
import struct
import time
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from tests.support.stack import ADMIN_KEY, upload_dataset, upload_model

# ---------------------------------------------------------------- the watch on the file system


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


@pytest.fixture
def untouched(data_dir, tmp_path):
    """The test's tmp dir (where the marker would appear); models/ and datasets/ as they were."""
    watched = [data_dir / "models", data_dir / "datasets", tmp_path]
    before = [tree(root) for root in watched]
    yield tmp_path
    for root, old in zip(watched, before):
        assert tree(root) == old, f"{root} changed: {sorted(tree(root) ^ old)}"


def refused(resp, status: int, *phrases: str) -> None:
    assert resp.status_code == status, resp.text
    detail = resp.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail
    for phrase in phrases:
        assert phrase in detail, detail


# ---------------------------------------------------------------- pickles, never unpickled


class Marker:
    """Unpickling this creates the file ``path``: code execution, made visible."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def plain_pickle(protocol: int):
    return lambda marker: pickle.dumps(
        {"fc.weight": [1.0, 2.0], "hook": Marker(marker)}, protocol=protocol
    )


def torch_save(zip_format: bool):
    def build(marker: Path) -> bytes:
        buf = io.BytesIO()
        torch.save(
            {"fc.weight": torch.zeros(2), "hook": Marker(marker)},
            buf,
            _use_new_zipfile_serialization=zip_format,
        )
        return buf.getvalue()

    return build


PICKLES = {
    "pickle4": plain_pickle(4),
    "pickle2": plain_pickle(2),
    "pickle0": plain_pickle(0),
    "torch-zip": torch_save(True),
    "torch-legacy": torch_save(False),
}


@pytest.mark.parametrize("kind", sorted(PICKLES))
def test_the_pickle_payloads_are_live(tmp_path, kind):
    """The control: unpickled here, each payload does create its marker."""
    marker, data = tmp_path / "control", PICKLES[kind](tmp_path / "control")
    if kind.startswith("torch"):
        torch.load(io.BytesIO(data), weights_only=False)
    else:
        pickle.loads(data)
    assert marker.exists()


@pytest.mark.parametrize(
    "kind,filename,phrases",
    [
        ("pickle4", "model.safetensors", ["never unpickles"]),
        ("pickle4", "model.pt", ["never unpickles"]),
        ("pickle2", "model.pth", ["never unpickles"]),
        ("pickle4", "model.onnx", ["never unpickles"]),
        ("torch-zip", "model.safetensors", ["never unpickles"]),
        ("torch-zip", "model.pt", ["never unpickles"]),
        ("torch-legacy", "model.pth", ["never unpickles"]),
        # Protocol 0 has no magic bytes to sniff: refused by what it is not (its name, or a safetensors header).
        ("pickle0", "model.pt", ["upload a .onnx file"]),
        ("pickle0", "model.safetensors", ["model refused", "safetensors header length"]),
    ],
)
def test_pickles_are_refused_and_never_unpickled(admin, untouched, kind, filename, phrases):
    marker = untouched / "unpickled"
    refused(upload_model(admin, filename, PICKLES[kind](marker), arch="digits_cnn"), 422, *phrases)
    assert not marker.exists()


# ---------------------------------------------------------------- safetensors headers that lie
# Refused by the API from the header alone (models/store.py), before a worker sees the file.


def safetensors(header: dict, data: bytes, declared_length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared_length is None else declared_length) + raw + data


def f32(begin: int, end: int, shape: list[int] | None = None) -> dict:
    return {"dtype": "F32", "shape": shape or [(end - begin) // 4], "data_offsets": [begin, end]}


@pytest.mark.parametrize(
    "content,phrase",
    [
        (
            safetensors({"w": f32(0, 4096)}, bytes(8)),
            "header describes 4096 bytes of tensor data, the file holds 8",
        ),
        (
            safetensors({"a": f32(0, 16), "b": f32(8, 24)}, bytes(24)),
            "starts at byte 8, expected 16",
        ),
        (
            safetensors({"w": f32(0, 16, [10**12])}, bytes(16)),
            "claims 16 bytes, its shape [1000000000000]",
        ),
        (
            safetensors({"w": f32(0, 16)}, bytes(16), declared_length=2**62),
            "header length 4611686018427387904",
        ),
        (safetensors({"w": f32(0, 16)}, bytes(16), declared_length=100_000_001), "does not fit"),
    ],
    ids=[
        "beyond-the-file",
        "overlapping",
        "shape-vs-offsets",
        "huge-header",
        "header-over-the-cap",
    ],
)
def test_lying_safetensors_headers_are_refused(admin, untouched, content, phrase):
    refused(
        upload_model(admin, "lying.safetensors", content, arch="digits_cnn"),
        422,
        "model refused",
        phrase,
    )


# ---------------------------------------------------------------- ONNX: custom ops, external data
# Refused by the worker's check (models/onnx_runtime.py) before onnxruntime opens the file.


def onnx_bytes(nodes: list, opsets: dict[str, int], initializers=()) -> bytes:
    """x (n, 1, 8, 8) -> Flatten -> nodes -> y; serialized as is (onnx.save would follow external data)."""
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["flat"]), *nodes],
        "hostile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])],
        list(initializers),
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()], ir_version=8
    )
    return model.SerializeToString()


def external_weight(location: str) -> TensorProto:
    weight = TensorProto(
        name="w", data_type=TensorProto.FLOAT, dims=[64], data_location=TensorProto.EXTERNAL
    )
    for key, value in [("location", location), ("offset", "0"), ("length", "256")]:
        weight.external_data.add(key=key, value=value)
    return weight


@pytest.mark.parametrize(
    "content,phrase",
    [
        (
            onnx_bytes(
                [helper.make_node("Exfiltrate", ["flat"], ["y"], domain="com.evil")],
                {"": 17, "com.evil": 1},
            ),
            "uses the operator 'com.evil:Exfiltrate', which is not standard ONNX",
        ),
        # onnxruntime would run this contrib op as it is: the allow-list, not onnxruntime, refuses it.
        (
            onnx_bytes(
                [helper.make_node("Gelu", ["flat"], ["y"], domain="com.microsoft")],
                {"": 17, "com.microsoft": 1},
            ),
            "uses the operator 'com.microsoft:Gelu'",
        ),
        (
            onnx_bytes([helper.make_node("Identity", ["flat"], ["y"])], {"": 17, "com.evil": 1}),
            "imports the operator set 'com.evil'",
        ),
        (
            onnx_bytes(
                [helper.make_node("Add", ["flat", "w"], ["y"])],
                {"": 17},
                [external_weight("../../../etc/passwd")],
            ),
            "external data files (tensor 'w' in '../../../etc/passwd')",
        ),
        (
            onnx_bytes(
                [helper.make_node("Add", ["flat", "w"], ["y"])],
                {"": 17},
                [external_weight("/etc/passwd")],
            ),
            "external data files (tensor 'w' in '/etc/passwd')",
        ),
    ],
    ids=[
        "custom-domain",
        "onnxruntime-contrib-op",
        "custom-opset-import",
        "external-relative",
        "external-absolute",
    ],
)
def test_hostile_onnx_models_are_refused(admin, untouched, content, phrase):
    refused(upload_model(admin, "hostile.onnx", content), 422, "model refused", phrase)


# ---------------------------------------------------------------- datasets: zip bombs and odd archives


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def zip_bomb() -> bytes:
    """An honest .npz whose x is over 1 GiB of zeros (the stack's default unzipped cap), ~5 MB zipped."""
    count = (1 << 30) // 256 + 1  # images of 1x8x8 float32, 256 bytes each
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (count, 1, 8, 8)}
    )
    zeros, left, buf = bytes(64 << 20), count * 256, io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            member.write(header.getvalue())
            while left:
                member.write(zeros[: min(left, len(zeros))])
                left -= min(left, len(zeros))
        archive.writestr("y.npy", npy(np.zeros(count, dtype=np.uint8)))
    return buf.getvalue()


def npz_with(extra_names: list[str]) -> bytes:
    """A valid dataset of 4 images, plus empty members under ``extra_names``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("x.npy", npy(np.full((4, 1, 8, 8), 0.5, dtype=np.float32)))
        archive.writestr("y.npy", npy(np.arange(4)))
        for name in extra_names:
            archive.writestr(name, b"")
    return buf.getvalue()


def test_a_zip_bomb_dataset_is_refused_from_its_declared_sizes(client, untouched):
    bomb = zip_bomb()
    assert len(bomb) < 16 << 20
    refused(upload_dataset(client, bomb), 413, "x and y unzip to", "over this server's limit")


@pytest.mark.parametrize(
    "names,status,phrase",
    [
        ([f"junk-{i:06d}" for i in range(5000)], 422, "zip directory takes"),
        ([f"arr_{i}.npy" for i in range(100)], 422, "holds 102 members, over 64"),
        (["../x.npy"], 422, "member named '../x.npy'"),
        (["../../../../tmp/evil.npy"], 422, "member named '../../../../tmp/evil.npy'"),
        (["/etc/cron.d/evil.npy"], 422, "member named '/etc/cron.d/evil.npy'"),
        (["nested/dir/x.npy"], 422, "without folders"),
    ],
    ids=["5000-entries", "100-arrays", "dotdot", "deep-dotdot", "absolute", "nested"],
)
def test_archives_numpy_savez_would_not_write_are_refused(client, untouched, names, status, phrase):
    refused(upload_dataset(client, npz_with(names)), status, phrase)


# ---------------------------------------------------------------- a 10 GB Content-Length


def declare_body(api_url: str, path: str, length: int) -> tuple[int, dict, float]:
    """Send only the head of a POST that declares ``length`` bytes; the status, JSON body and
    seconds until the answer. Reads the answer by its Content-Length, so a server that keeps the
    connection open cannot hang the test (the socket times out after 10 s anyway)."""
    url = urlsplit(api_url)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {ADMIN_KEY}\r\n"
        f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {length}\r\n\r\n--b\r\n"
    )
    start = time.monotonic()
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(head.encode())
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536) or pytest.fail(f"connection closed after {data!r}")
        status_head, body = data.split(b"\r\n\r\n", 1)
        lines = status_head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        while len(body) < int(headers["content-length"]):
            body += sock.recv(65536) or pytest.fail("connection closed mid-answer")
    return int(lines[0].split()[1]), json.loads(body), time.monotonic() - start


@pytest.mark.parametrize("path", ["/v1/models", "/v1/datasets", "/v1/certify"])
def test_a_declared_10_gb_body_is_refused_before_it_is_read(api_url, client, untouched, path):
    status, body, seconds = declare_body(api_url, path, 10 * 10**9)
    assert status == 413 and "request body exceeds this server's limit of" in body["detail"]
    assert seconds < 5
    assert client.get("/healthz").status_code == 200


# ---------------------------------------------------------------- multipart bodies that cannot be parsed

TOO_MANY_PARTS = (
    b"".join(
        b'--b\r\nContent-Disposition: form-data; name="f%d"\r\n\r\n1\r\n' % i for i in range(1001)
    )
    + b"--b--\r\n"
)


@pytest.mark.parametrize("path", ["/v1/models", "/v1/datasets"])
@pytest.mark.parametrize(
    "content_type,body,phrase",
    [
        ("multipart/form-data", b"--b\r\n", "Missing boundary"),
        ("multipart/form-data; boundary=b", TOO_MANY_PARTS, "Too many fields"),
        (
            "multipart/form-data; boundary=b",
            b"--b\r\nno headers--b--\r\n",
            "Invalid multipart data",
        ),
    ],
    ids=["no-boundary", "1001-parts", "headerless-part"],
)
def test_unparsable_multipart_bodies_are_422(admin, untouched, path, content_type, body, phrase):
    resp = admin.post(path, content=body, headers={"Content-Type": content_type})
    refused(resp, 422, phrase)
