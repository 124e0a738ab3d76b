"""A certify request's inputs once decoded, against the real stack: a byte budget counted from the
headers before anything is decoded (413), 8-bit images stored as uint8 and certified exactly as
their float pixels, and every malformed ``.npy`` refused with the same 422 on the multipart and the
base64 JSON paths (service/core/inputs.py, service/api/submission.py).

The budget and the stored files are looked at on an API of this module's own (the session's data
dir, so it sees the session's models; a Redis database where no worker listens, so a job's
``inputs.npy`` stays as the API wrote it), whose memory counts only what these tests send it.
"""

from __future__ import annotations

import base64
import io
import pickle
import shutil
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from smoothcert.service.core.settings import Settings
from tests.support import images
from tests.support.proc import memory_bytes
from tests.support.stack import (
    USER_KEY,
    other_db,
    scratch_db,
    stack_env,
    start_api,
    stop_process,
    upload_model,
    wait_job,
)

IDLE_DB = 4  # no worker listens there
BUDGET = 4 << 20  # the idle API's SMOOTHCERT_MAX_DECODED_BYTES_PER_REQUEST
LARGE = (3, 224, 224)  # 150,528 bytes a uint8 image, 602,112 as float32
FORM = {"sigma": "0.25", "n0": "20", "n": "200", "seed": "7"}
MEMORY_BOUND = 32 << 20  # the 2,000-image request grew the API's peak by 3.4 GiB before


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def npy_claiming(shape: tuple[int, ...], data: bytes) -> bytes:
    """A .npy file whose header declares float32 of ``shape``, followed by ``data``."""
    buf = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + data


def rgb_onnx(height: int, width: int) -> bytes:
    """x (n, 3, H, W) -> scores (n, 10): a fixed linear map of every pixel (small images) or of
    the channel means (large ones, so that the file stays small)."""
    rng = np.random.default_rng(0)
    if height * width <= 64:
        nodes = [helper.make_node("Flatten", ["x"], ["features"])]
        weight = rng.normal(size=(3 * height * width, 10))
    else:
        nodes = [helper.make_node("ReduceMean", ["x"], ["features"], axes=[2, 3], keepdims=0)]
        weight = rng.normal(size=(3, 10))
    graph = helper.make_graph(
        [*nodes, helper.make_node("MatMul", ["features", "w"], ["scores"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, height, width])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 10])],
        [numpy_helper.from_array(weight.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def rgb_models(admin) -> Iterator[dict[str, dict]]:
    """Two ONNX models of 3-channel inputs, checked by the session's worker: "small" 3x8x8 and
    "large" 3x224x224; deleted afterwards."""
    models: dict[str, dict] = {}
    for name, (height, width) in (("small", (8, 8)), ("large", LARGE[1:])):
        resp = upload_model(admin, f"rgb-{name}.onnx", rgb_onnx(height, width), name=f"rgb-{name}")
        assert resp.status_code == 201, resp.text
        models[name] = resp.json()
    yield models
    for model in models.values():
        assert admin.delete(f"/v1/models/{model['id']}").status_code == 204


@pytest.fixture(scope="module")
def idle(redis_url, data_dir, demo_model, rgb_models):
    """The idle API (its process, and a client with the user key), with the default caps of
    inputs per job (10,000) and a 4 MiB body; job folders it made are removed afterwards."""
    made: list[str] = []
    with scratch_db(redis_url, IDLE_DB):
        env = stack_env(
            other_db(redis_url, IDLE_DB),
            data_dir,
            SMOOTHCERT_MAX_INPUTS="10000",
            SMOOTHCERT_MAX_REQUEST_BYTES=str(4 << 20),
            SMOOTHCERT_MAX_DECODED_BYTES_PER_REQUEST=str(BUDGET),
        )
        proc, url = start_api(env, data_dir / "api-decoded.log")
        try:
            with httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=120
            ) as client:
                yield proc, client, made
        finally:
            stop_process(proc)
            for job_id in made:
                shutil.rmtree(data_dir / "jobs" / job_id, ignore_errors=True)


def certify(client: httpx.Client, model_id: str, files: list, **form: str) -> httpx.Response:
    return client.post(
        "/v1/certify",
        files=[("inputs", f) for f in files],
        data={"model_id": model_id, **FORM, **form},
    )


def stored(idle, data_dir, resp: httpx.Response) -> np.ndarray:
    """The inputs.npy of an accepted job of the idle API, as written (nobody takes the job)."""
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]
    idle[2].append(job_id)
    return np.load(data_dir / "jobs" / job_id / "inputs.npy")


def job_folders(data_dir) -> set[str]:
    jobs = data_dir / "jobs"
    return {p.name for p in jobs.iterdir()} if jobs.exists() else set()


def refused(resp: httpx.Response, status: int) -> str:
    assert resp.status_code == status, resp.text
    detail = resp.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail
    return detail


def tiny_pngs(count: int) -> list[tuple[str, bytes, str]]:
    """``count`` 1-bit black PNGs of 224 x 224 pixels, ~100 bytes each."""
    png = images.huge_bilevel(*LARGE[1:])
    assert len(png) < 128
    return [(f"{i}.png", png, "image/png") for i in range(count)]


# ---------------------------------------------------------------- the budget, from the headers


def test_many_tiny_pngs_are_refused_from_their_count_before_any_is_decoded(
    idle, data_dir, rgb_models
):
    """The attack: 2,000 PNGs of ~100 bytes (0.3 MB of body) for a 3x224x224 model, 1.2 GB as
    float32. Before the fix the API decoded them all (+3.4 GiB of peak memory, 1.15 GiB of
    inputs.npy); now it is a 413 naming the budget, with the API's memory where it was and no
    job folder written. The default budget refuses it too."""
    assert 2000 * np.prod(LARGE) > Settings().max_decoded_bytes_per_request
    proc, client, _ = idle
    model = rgb_models["large"]["id"]
    # A valid request first, so that the peak below already holds what any image request costs.
    assert stored(idle, data_dir, certify(client, model, tiny_pngs(20))).dtype == np.uint8
    before, folders = memory_bytes(proc.pid, "VmHWM"), job_folders(data_dir)

    detail = refused(certify(client, model, tiny_pngs(2000)), 413)
    assert detail == (
        f"2000 images of 3x224x224 as uint8 would take 301,056,000 bytes once decoded, over the "
        f"budget of {BUDGET:,} bytes of decoded inputs per request "
        "(SMOOTHCERT_MAX_DECODED_BYTES_PER_REQUEST); send fewer inputs per request, or upload "
        "them as a dataset (POST /v1/datasets)"
    )
    grown = memory_bytes(proc.pid, "VmHWM") - before
    assert grown < MEMORY_BOUND, f"the API's peak memory grew by {grown / 2**20:.1f} MiB"
    assert not job_folders(data_dir) - folders


def test_one_16_bit_png_makes_the_request_float32_and_counts_4_bytes_a_value(
    idle, data_dir, rgb_models
):
    """20 8-bit images fit as uint8 (3 MB); with a 16-bit PNG among them the request is stored as
    float32, and its 12 MB are refused from the headers."""
    _, client, _ = idle
    model = rgb_models["large"]["id"]
    deep = ("deep.png", images.grey16(np.zeros(LARGE[1:])), "image/png")
    folders = job_folders(data_dir)
    detail = refused(certify(client, model, [*tiny_pngs(19), deep]), 413)
    assert detail.startswith(
        "20 images of 3x224x224 as float32 would take 12,042,240 bytes once decoded"
    )
    assert not job_folders(data_dir) - folders


@pytest.mark.parametrize("path", ["multipart", "base64"])
def test_a_npy_over_the_budget_is_refused_from_its_header(idle, data_dir, rgb_models, path):
    """A 1.2 MB uint8 .npy would be 4.8 MB of float32 inputs: 413 on either path."""
    _, client, _ = idle
    data = npy(np.zeros((8, *LARGE), np.uint8))
    model = rgb_models["large"]["id"]
    folders = job_folders(data_dir)
    if path == "multipart":
        resp = certify(client, model, [("x.npy", data, "application/octet-stream")])
    else:
        resp = client.post(
            "/v1/certify",
            json={"model_id": model, "sigma": 0.25, "inputs": base64.b64encode(data).decode()},
        )
    assert refused(resp, 413).startswith(
        "an array of shape [8, 3, 224, 224] as float32 would take 4,816,896 bytes once decoded, "
        f"over the budget of {BUDGET:,} bytes"
    )
    assert not job_folders(data_dir) - folders


# ---------------------------------------------------------------- what a job stores


def test_8_bit_images_are_stored_as_uint8_pixels(idle, data_dir, demo_model, rgb_models):
    """inputs.npy holds the images' own pixels: uint8, one byte a value (150,528 bytes a 3x224x224
    image instead of 602,112); 16-bit PNGs and .npy arrays stay float32 in [0, 1]."""
    _, client, _ = idle
    large = stored(idle, data_dir, certify(client, rgb_models["large"]["id"], tiny_pngs(3)))
    assert large.dtype == np.uint8 and large.shape == (3, *LARGE) and large.nbytes == 3 * 150_528

    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)
    pngs = [
        (f"g{i}.png", images.save(Image.fromarray(p, "L")), "image/png") for i, p in enumerate(grey)
    ]
    x = stored(idle, data_dir, certify(client, demo_model["id"], pngs))
    assert x.dtype == np.uint8 and np.array_equal(x, grey[:, None])

    colour = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    pngs = [
        (f"c{i}.png", images.save(Image.fromarray(p, "RGB")), "image/png")
        for i, p in enumerate(colour)
    ]
    x = stored(idle, data_dir, certify(client, rgb_models["small"]["id"], pngs))
    assert x.dtype == np.uint8 and np.array_equal(x, colour.transpose(0, 3, 1, 2))

    deep = rng.integers(0, 65536, (8, 8), dtype=np.uint16)
    pngs = [("d.png", images.save(Image.fromarray(deep)), "image/png"), pngs[0]]
    x = stored(idle, data_dir, certify(client, rgb_models["small"]["id"], pngs))
    assert x.dtype == np.float32
    assert np.array_equal(x[0], np.repeat(deep[None] / np.float32(65535), 3, axis=0))
    assert np.array_equal(x[1], colour[0].transpose(2, 0, 1) / np.float32(255))

    floats = grey[:, None] / np.float32(255)
    x = stored(idle, data_dir, certify(client, demo_model["id"], [("x.npy", npy(floats))]))
    assert x.dtype == np.float32 and np.array_equal(x, floats)


def rows(job: dict) -> list[dict]:
    assert job["status"] == "succeeded", job["error"]
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in job["result"]["results"]]


@pytest.mark.parametrize("model", ["digits", "rgb"])
def test_images_stored_as_uint8_certify_exactly_as_their_float_pixels(
    client, demo_model, rgb_models, model
):
    """The same seed on 8-bit PNGs (and a JPEG), stored as uint8 and scaled by the worker, and on
    a float32 .npy of their pixels / 255 (how the API stored them before): the very same rows."""
    rng = np.random.default_rng(2)
    if model == "digits":
        model_id, pixels = demo_model["id"], rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)
        files = [(f"{i}.png", images.save(Image.fromarray(p, "L"))) for i, p in enumerate(pixels)]
        floats = pixels[:, None] / np.float32(255)
    else:
        model_id, pixels = rgb_models["small"]["id"], rng.integers(0, 256, (3, 8, 8, 3), np.uint8)
        files = [(f"{i}.png", images.save(Image.fromarray(p, "RGB"))) for i, p in enumerate(pixels)]
        files[2] = ("2.jpg", images.save(Image.fromarray(pixels[2], "RGB"), "JPEG", quality=90))
        pixels[2] = np.asarray(Image.open(io.BytesIO(files[2][1])).convert("RGB"))
        floats = pixels.transpose(0, 3, 1, 2) / np.float32(255)
    assert floats.dtype == np.float32
    form = {"n0": "50", "n": "500", "batch_size": "100", "labels": "[0, 1, 2]"}
    jobs = [
        certify(client, model_id, files, **form),
        certify(client, model_id, [("x.npy", npy(floats), "application/octet-stream")], **form),
    ]
    for resp in jobs:
        assert resp.status_code == 202, resp.text
    from_images, from_floats = (rows(wait_job(client, r.json()["job_id"])) for r in jobs)
    # The images' rows carry their file names; everything certified is the same.
    assert [row.pop("name") for row in from_images] == [name for name, _ in files]
    assert from_images == from_floats
    assert len({r["n_a"] for r in from_images}) > 1 or len(from_images[0]["votes"]) > 1


# ---------------------------------------------------------------- malformed .npy: one 422 rule

_FLOATS = np.zeros((1, 1, 8, 8), np.float32).tobytes()
MALFORMED = {
    "npz": (npz(x=np.zeros((1, 1, 8, 8))), "inputs: a .npz archive, not a .npy array"),
    "absurd header": (
        npy_claiming((10**12, 1, 8, 8), _FLOATS),
        "inputs: the .npy header declares shape [1000000000000, 1, 8, 8] of float32 "
        "(256,000,000,000,000 bytes of data) but the file holds 256",
    ),
    "truncated": (
        npy_claiming((1, 1, 8, 8), _FLOATS[:-4]),
        "declares shape [1, 1, 8, 8] of float32 (256 bytes of data) but the file holds 252",
    ),
    "negative shape": (npy_claiming((-1, 1, 8, 8), _FLOATS), "declares shape [-1, 1, 8, 8]"),
    "structured": (
        npy(np.zeros((1, 1, 8, 8), dtype=[("a", "<f4"), ("b", "<f4")])),
        "(a structured dtype)",
    ),
    "object": (npy(np.array([{"a": 1}], dtype=object)), "(pickled Python objects"),
    "strings": (npy(np.full((1, 1, 8, 8), "0.5")), "not dtype <U3 (strings)"),
    "bytes": (npy(np.full((1, 1, 8, 8), b"0")), "(byte strings)"),
    "booleans": (npy(np.zeros((1, 1, 8, 8), bool)), "not dtype bool (booleans)"),
    "complex": (npy(np.zeros((1, 1, 8, 8), complex)), "not dtype complex128 (complex numbers)"),
    "dates": (npy(np.zeros((1, 1, 8, 8), "datetime64[D]")), "(dates)"),
    "time spans": (npy(np.zeros((1, 1, 8, 8), "timedelta64[s]")), "(time spans)"),
    "a pickle": (pickle.dumps([0.5] * 64), "inputs: not a .npy array (the magic string"),
    "not numpy": (b"hello", "inputs: not a .npy array"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_npy_is_the_same_422_on_both_paths(client, demo_model, case):
    """Before, on the multipart path a .npz, an absurd header and a structured dtype were 500s,
    and booleans, strings, complex numbers and dates were accepted."""
    data, phrase = MALFORMED[case]
    multipart = client.post(
        "/v1/certify",
        files=[("inputs", ("x.npy", data, "application/octet-stream"))],
        data={"model_id": demo_model["id"], **FORM},
    )
    body = {"model_id": demo_model["id"], "sigma": 0.25, "inputs": base64.b64encode(data).decode()}
    json_body = client.post("/v1/certify", json=body)
    detail = refused(multipart, 422)
    assert phrase in detail
    assert refused(json_body, 422) == detail
