"""PNG/JPEG decoding shared by the inputs to certify and the training image folders: the header
checked before any pixel is decoded, and each kind of image converted by the module's one rule."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from smoothcert.service.core.images import (
    MAX_IMAGE_PIXELS,
    ImageError,
    has_image_suffix,
    read_header,
    read_pixels,
    to_unit,
)
from tests.support import images


def png(mode: str, size=(3, 2), color=None) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_suffixes_in_any_case():
    assert has_image_suffix("a/b.PNG") and has_image_suffix("x.jpeg") and has_image_suffix("x.Jpg")
    assert not has_image_suffix("x.npy") and not has_image_suffix("png")


@pytest.mark.parametrize(
    "mode,target,shape",
    [("L", None, (2, 3)), ("RGB", None, (2, 3, 3)), ("RGB", "L", (2, 3)), ("L", "RGB", (2, 3, 3))],
)
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


def test_the_size_is_checked_from_the_header_before_any_pixel_is_decoded():
    # No pixel data at all: decoding would fail as "not readable", the header check answers first.
    claims = images.raw_png(5000, 4000, 8, 0, None)
    header = read_header(claims, "big.png")
    assert (header.width, header.height, header.frames, header.mode) == (5000, 4000, 1, "L")
    with pytest.raises(
        ImageError, match=r"^big\.png: 5000x4000 pixels \(width x height\), the model takes 8x8"
    ):
        read_pixels(claims, "big.png", "L", (8, 8))
    with pytest.raises(ImageError, match=f"over the cap of {MAX_IMAGE_PIXELS:,} pixels"):
        read_pixels(claims, "big.png")
    with pytest.raises(ImageError, match=r"over the cap"):  # past Pillow's own bomb limit too
        read_pixels(images.raw_png(100_000, 100_000, 1, 0, None), "bomb.png")


def test_sixteen_bit_grey_is_scaled_by_its_depth_not_clipped():
    values = np.linspace(0, 1, 64).reshape(8, 8)
    pixels = read_pixels(images.grey16(values), "g16.png", "L", (8, 8))
    assert pixels.dtype == np.uint16 and pixels.max() == 65535
    assert np.allclose(to_unit(pixels), values, atol=0.5 / 65535)
    assert np.allclose(
        to_unit(read_pixels(images.grey8(values), "g8.png", "L")), values, atol=0.5 / 255
    )
    rgb = read_pixels(images.grey16(values), "g16.png", "RGB")
    assert (
        rgb.shape == (8, 8, 3)
        and (rgb[..., 0] == rgb[..., 2]).all()
        and (rgb[..., 0] == pixels).all()
    )


@pytest.mark.parametrize(
    "fmt,phrase",
    [
        ("PNG", "3 frames (an animated or multi-picture PNG)"),
        ("MPO", "3 frames (an animated or multi-picture MPO)"),
        ("GIF", "a GIF image; only PNG and JPEG"),
        ("TIFF", "a TIFF image; only PNG and JPEG"),
    ],
)
def test_animated_and_multi_frame_images_are_refused(fmt, phrase):
    with pytest.raises(
        ImageError, match=r"^x\.png: " + phrase.replace("(", r"\(").replace(")", r"\)")
    ):
        read_pixels(images.frames(fmt), "x.png")


@pytest.mark.parametrize(
    "data,phrase",
    [
        (images.save(Image.new("CMYK", (4, 4)), "JPEG"), "a CMYK JPEG; convert it to RGB"),
        (images.rgb16(4, 4), "16-bit colour or grey-and-alpha PNG"),
        (images.save(Image.new("RGB", (4, 4)), "WEBP"), "a WebP image"),
        (images.save(Image.new("RGB", (4, 4)), "BMP"), "a BMP image"),
    ],
)
def test_modes_and_formats_outside_the_accepted_set_are_refused_saying_what_is_accepted(
    data, phrase
):
    with pytest.raises(ImageError, match=phrase) as info:
        read_pixels(data, "x.png")
    assert "PNG" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "image,options",
    [
        (Image.new("RGBA", (4, 4), (10, 20, 30, 255)), {}),
        (Image.new("LA", (4, 4), (10, 255)), {}),
        (Image.new("P", (4, 4), 1), {"transparency": 0}),  # palette entry 0 transparent, unused
        (Image.new("L", (4, 4), 10), {"transparency": 0}),  # colour key 0 transparent, unused
    ],
)
def test_transparency_is_accepted_when_every_pixel_is_opaque(image, options):
    assert read_pixels(images.save(image, **options), "x.png", "RGB").shape == (4, 4, 3)


@pytest.mark.parametrize(
    "image,options",
    [
        (Image.new("RGBA", (4, 4), (10, 20, 30, 254)), {}),
        (Image.new("LA", (4, 4), (10, 0)), {}),
        (Image.new("P", (4, 4), 0), {"transparency": 0}),
        (Image.new("L", (4, 4), 0), {"transparency": 0}),
    ],
)
def test_a_pixel_that_is_not_fully_opaque_refuses_the_image(image, options):
    with pytest.raises(ImageError, match="16 of 16 pixels are not fully opaque"):
        read_pixels(images.save(image, **options), "x.png")


def test_palette_and_bilevel_images_are_looked_up_and_scaled():
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([200, 100, 50] + [0] * 765)
    assert (read_pixels(images.save(palette), "p.png") == [200, 100, 50]).all()
    assert read_pixels(images.save(Image.new("1", (2, 2), 1)), "b.png").tolist() == [
        [255, 255],
        [255, 255],
    ]
