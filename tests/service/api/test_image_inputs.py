"""Images uploaded to ``POST /v1/certify`` against the real API: the header is checked before any
pixel is decoded, and every kind of image is either converted by the documented rule or refused
with a 422 that names it (service/core/images.py)."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support import images
from tests.support.proc import memory_bytes
from tests.support.stack import USER_KEY, stack_env, start_api, stop_process, wait_job

FORM = {"sigma": "0.25", "n0": "20", "n": "200", "seed": "0"}
MEMORY_BOUND_KIB = (
    64 << 10
)  # one 13000 x 13000 bilevel image decoded is 165,039 KiB (1 byte a pixel)


@pytest.fixture(scope="module")
def digits(demo_paths):
    return np.load(demo_paths["test_x"]), np.load(demo_paths["test_y"])


@pytest.fixture(scope="module")
def own_api(redis_url, data_dir, worker):
    """An API process of its own (same Redis, data dir and worker as the session's), so that its
    memory counts only what the test sends it."""
    proc, url = start_api(stack_env(redis_url, data_dir), data_dir / "api-images.log")
    yield proc, url
    stop_process(proc)


def certify(client, model_id, files, **form):
    return client.post(
        "/v1/certify",
        files=[("inputs", f) for f in files],
        data={"model_id": model_id, **FORM, **form},
    )


def test_a_huge_image_small_on_the_wire_is_refused_from_its_header(own_api, demo_model, digits):
    """The attack: a 20 KB PNG claiming 13000 x 13000 pixels. Before the fix the API decoded it
    (+1.29 GB per image, three at once +3.86 GB) and then answered 422; now the header's size is
    refused before any pixel is decoded and the API's peak memory stays where it was."""
    proc, url = own_api
    huge = images.huge_bilevel(13000, 13000)
    assert len(huge) < 64 << 10
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=120
    ) as client:
        # First a valid upload, so that the peak below already holds what any image request costs.
        warm = certify(
            client, demo_model["id"], [("d.png", images.grey8(digits[0][0][0]), "image/png")]
        )
        assert warm.status_code == 202, warm.text
        before = memory_bytes(proc.pid, "VmHWM") // 1024

        resp = certify(
            client, demo_model["id"], [(f"huge{i}.png", huge, "image/png") for i in range(3)]
        )
        assert resp.status_code == 422, resp.text
        assert resp.json()["detail"] == (
            "huge0.png: 13000x13000 pixels (width x height), the model takes 8x8; "
            "resize it first (nothing is resized here)"
        )
        for i in range(3):
            resp = certify(
                client,
                demo_model["id"],
                [
                    ("d.png", images.grey8(digits[0][0][0]), "image/png"),
                    (f"huge{i}.png", huge, "image/png"),
                ],
            )
            assert (
                resp.status_code == 422
                and f"huge{i}.png: 13000x13000 pixels" in resp.json()["detail"]
            )

        grown = memory_bytes(proc.pid, "VmHWM") // 1024 - before
        assert grown < MEMORY_BOUND_KIB, f"the API's peak memory grew by {grown} KiB"
        assert memory_bytes(proc.pid, "VmRSS") // 1024 - before < MEMORY_BOUND_KIB
        # and it serves the next request as before
        assert wait_job(client, warm.json()["job_id"])["status"] == "succeeded"
        again = certify(
            client, demo_model["id"], [("d.png", images.grey8(digits[0][1][0]), "image/png")]
        )
        assert (
            again.status_code == 202
            and wait_job(client, again.json()["job_id"])["status"] == "succeeded"
        )


def test_a_16_bit_digit_is_scaled_not_clipped_and_gets_the_class_of_its_8_bit_version(
    client, demo_model, demo_paths, digits
):
    from smoothcert.models.loaders import load_model
    from smoothcert.worker.smoothing import RunOptions
    from smoothcert.worker.smoothing import certify as engine_certify

    x, y = digits
    index = int(np.flatnonzero(y == 3)[0])
    form = {
        "n0": "100",
        "n": "1000",
        "batch_size": "100",
        "labels": json.dumps([3]),
        "runtime": "torch",
    }
    rows = {}
    for name, data in (
        ("d8.png", images.grey8(x[index][0])),
        ("d16.png", images.grey16(x[index][0])),
    ):
        resp = certify(client, demo_model["id"], [(name, data, "image/png")], **form)
        assert resp.status_code == 202, resp.text
        job = wait_job(client, resp.json()["job_id"])
        assert job["status"] == "succeeded", job["error"]
        rows[name] = job["result"]["results"][0]
    assert rows["d16.png"]["prediction"] == rows["d8.png"]["prediction"] == 3
    # The job certified exactly the 16-bit pixels over 65535: the engine on those gives its very counts.
    x16 = np.round(x[index : index + 1] * 65535).astype(np.uint16).astype(np.float32) / np.float32(
        65535
    )
    direct = engine_certify(
        load_model(demo_paths["safetensors"], device="cpu"),
        x16,
        0.25,
        n0=100,
        n=1000,
        options=RunOptions(batch_size=100, seed=0),
    ).to_dict()["results"][0]
    assert (rows["d16.png"]["prediction"], rows["d16.png"]["n_a"]) == (
        direct["prediction"],
        direct["n_a"],
    )


REFUSED = [
    ("apng.png", images.frames("PNG"), "apng.png: 3 frames (an animated or multi-picture PNG)"),
    ("anim.png", images.frames("GIF"), "anim.png: a GIF image; only PNG and JPEG are accepted"),
    ("pages.png", images.frames("TIFF"), "pages.png: a TIFF image; only PNG and JPEG are accepted"),
    ("pair.jpg", images.frames("MPO"), "pair.jpg: 3 frames (an animated or multi-picture MPO)"),
    (
        "cmyk.jpg",
        images.save(Image.new("CMYK", (8, 8), (0, 0, 0, 128)), "JPEG"),
        "cmyk.jpg: a CMYK JPEG; convert it to RGB with its colour profile first",
    ),
    ("rgb16.png", images.rgb16(8, 8), "rgb16.png: a 16-bit colour or grey-and-alpha PNG"),
    (
        "clear.png",
        images.save(Image.new("RGBA", (8, 8), (9, 9, 9, 0))),
        "clear.png: 64 of 64 pixels are not fully opaque",
    ),
    (
        "wide.png",
        images.save(Image.new("L", (9, 8))),
        "wide.png: 9x8 pixels (width x height), the model takes 8x8",
    ),
]


@pytest.mark.parametrize("name,data,phrase", REFUSED, ids=[r[0] for r in REFUSED])
def test_images_outside_the_rule_are_refused_naming_them(client, demo_model, name, data, phrase):
    resp = certify(client, demo_model["id"], [(name, data, "image/png")])
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    assert detail.startswith(phrase), detail
    if "frames" in phrase or "CMYK" in phrase or "16-bit" in phrase:
        assert "accepted: PNG or JPEG, one frame" in detail  # says what is allowed


def test_an_opaque_rgba_image_is_accepted_with_its_alpha_dropped(client, demo_model, digits):
    grey = (digits[0][0][0] * 255).round().astype(np.uint8)
    rgba = Image.merge("RGBA", [Image.fromarray(grey)] * 3 + [Image.new("L", (8, 8), 255)])
    for name, data in (
        ("rgba.png", images.save(rgba)),
        ("grey.png", images.grey8(digits[0][0][0])),
    ):
        resp = certify(client, demo_model["id"], [(name, data, "image/png")], mode="predict")
        assert resp.status_code == 202, resp.text
        job = wait_job(client, resp.json()["job_id"])
        assert job["status"] == "succeeded", job["error"]
        if name == "rgba.png":
            first = job["result"]["results"][0]
        else:  # the same pixels, so the same seed gives the same answer
            assert job["result"]["results"][0]["prediction"] == first["prediction"]
