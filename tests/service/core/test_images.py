"""PNG/JPEG decoding shared by the inputs to certify and the training image folders."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from smoothcert.service.core.images import ImageError, has_image_suffix, read_pixels


def png(mode: str, size=(3, 2), color=None) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_suffixes_in_any_case():
    assert has_image_suffix("a/b.PNG") and has_image_suffix("x.jpeg") and has_image_suffix("x.Jpg")
    assert not has_image_suffix("x.npy") and not has_image_suffix("png")


@pytest.mark.parametrize("mode,target,shape", [("L", None, (2, 3)), ("RGB", None, (2, 3, 3)),
                                               ("RGB", "L", (2, 3)), ("L", "RGB", (2, 3, 3))])
def test_grey_stays_grey_unless_a_mode_is_asked_for(tmp_path, mode, target, shape):
    path = tmp_path / "im.png"
    path.write_bytes(png(mode, color=200 if mode == "L" else (200, 200, 200)))
    for source in (path, path.read_bytes()):
        pixels = read_pixels(source, "im", target)
        assert pixels.dtype == np.uint8 and pixels.shape == shape and (pixels == 200).all()


def test_an_unreadable_image_is_named_in_one_line():
    with pytest.raises(ImageError, match=r"^cat\.png: not a readable PNG or JPEG image \(") as info:
        read_pixels(b"not an image", "cat.png")
    assert "\n" not in str(info.value)
