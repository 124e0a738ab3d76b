"""Dataset readers on small files the tests write: what they read, and the one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from smoothcert.models.demo import load_digits_split
from smoothcert.worker.data.datasets import CIFAR_RECORD_BYTES, DatasetError, load_dataset
from tests.support import images


def test_digits_is_the_demo_split_in_unit_pixels():
    data = load_dataset("digits")
    train_x, train_y, test_x, test_y = load_digits_split()
    assert np.array_equal(data.x, train_x) and np.array_equal(data.test_y, test_y)
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10 and len(data.test_x) == 359
    assert 0.0 == data.x.min() < data.x.max() == 1.0 and data.class_names[3] == "3"


# --- .npz ---------------------------------------------------------------------------------------


def test_npz_of_floats_or_uint8(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, size=(6, 3, 4, 5), dtype=np.uint8)
    y = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "u8.npz", x=x, y=y)
    np.savez_compressed(tmp_path / "f.npz", x=x.astype(np.float32) / 255, y=y)
    for name in ("u8.npz", "f.npz"):
        data = load_dataset(tmp_path / name)
        assert data.x.dtype == np.float32 and data.x.shape == (6, 3, 4, 5) and data.test_x is None
        assert np.allclose(data.x, x / 255.0) and data.num_classes == 3 and data.name == name


@pytest.mark.parametrize(
    "arrays,message",
    [
        (
            {"x": np.zeros((2, 1, 4, 4)), "y": np.array([object(), 1], dtype=object)},
            "pickled Python objects",
        ),
        ({"x": np.zeros((2, 1, 4, 4))}, "lacks y"),
        (
            {"x": np.zeros((2, 4, 4)), "y": np.zeros(2, dtype=int)},
            r"must be \(N, C, H, W\).*add the channel axis",
        ),
        ({"x": np.full((2, 1, 4, 4), 2.0), "y": np.zeros(2, dtype=int)}, r"must lie in \[0, 1\]"),
        (
            {"x": np.zeros((2, 1, 4, 4)), "y": np.zeros(3, dtype=int)},
            "2 images but y holds 3 labels",
        ),
    ],
)
def test_malformed_npz_is_refused_in_one_line(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetError, match=message) as error:
        load_dataset(tmp_path / "bad.npz")
    assert str(error.value).startswith("bad.npz: ") and "\n" not in str(error.value)


def test_a_file_that_is_not_a_zip_is_not_an_npz(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(DatasetError, match="junk.npz: not an .npz file"):
        load_dataset(tmp_path / "junk.npz")


# --- CIFAR-10 binary ----------------------------------------------------------------------------


def _cifar_records(labels, seed):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    return np.concatenate([np.array(labels, dtype=np.uint8)[:, None], pixels], axis=1), pixels


def test_cifar10_binary_folder_reads_train_and_test_splits(tmp_path):
    first, p1 = _cifar_records([3, 0, 9], 0)
    second, _ = _cifar_records([1, 1], 1)
    test, _ = _cifar_records([7], 2)
    first.tofile(tmp_path / "data_batch_1.bin")
    second.tofile(tmp_path / "data_batch_2.bin")
    test.tofile(tmp_path / "test_batch.bin")
    names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    (tmp_path / "batches.meta.txt").write_text("\n".join(names) + "\n\n")
    data = load_dataset(tmp_path)
    assert data.x.shape == (5, 3, 32, 32) and data.test_x.shape == (1, 3, 32, 32)
    assert data.y.tolist() == [3, 0, 9, 1, 1] and data.test_y.tolist() == [7]
    assert data.class_names == names and data.num_classes == 10
    # Each record is the red plane, then green, then blue, each row by row.
    assert data.x[0, 1, 2, 5] == pytest.approx(p1[0, 1024 + 2 * 32 + 5] / 255)


def test_a_single_cifar_batch_file_is_a_dataset(tmp_path):
    records, _ = _cifar_records([4, 5], 3)
    records.tofile(tmp_path / "test_batch.bin")
    data = load_dataset(tmp_path / "test_batch.bin")
    assert data.y.tolist() == [4, 5] and data.class_names is None and data.num_classes == 6


def test_truncated_cifar_binary_is_refused(tmp_path):
    records, _ = _cifar_records([1, 2], 0)
    (tmp_path / "data_batch_1.bin").write_bytes(records.tobytes()[:-100])
    with pytest.raises(
        DatasetError, match=f"data_batch_1.bin: {2 * CIFAR_RECORD_BYTES - 100} bytes .* truncated"
    ):
        load_dataset(tmp_path)


def test_cifar_label_bytes_beyond_nine_are_refused(tmp_path):
    records, _ = _cifar_records([1, 12], 0)
    records.tofile(tmp_path / "data_batch_1.bin")
    with pytest.raises(DatasetError, match="record 1 has label byte 12, not a CIFAR-10 class"):
        load_dataset(tmp_path)


def test_a_cifar_folder_needs_its_training_batches(tmp_path):
    records, _ = _cifar_records([1], 0)
    records.tofile(tmp_path / "test_batch.bin")
    with pytest.raises(DatasetError, match="no data_batch_\\*.bin files"):
        load_dataset(tmp_path)


# --- image folders ------------------------------------------------------------------------------


def _png(path, size=(6, 5), mode="L", value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 255 - value)).save(path)


def test_image_folder_one_subfolder_per_class(tmp_path):
    for cls, value in (("cat", 10), ("dog", 250)):
        for i in range(3):
            _png(tmp_path / cls / f"{i}.png", value=value)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    data = load_dataset(tmp_path)
    assert data.x.shape == (6, 1, 5, 6) and data.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.class_names == ["cat", "dog"] and data.x[4, 0, 0, 0] == pytest.approx(250 / 255)


def test_image_folder_mixing_grey_and_colour_is_read_as_rgb(tmp_path):
    _png(tmp_path / "a" / "0.png", mode="L", value=40)
    _png(tmp_path / "b" / "0.png", mode="RGB", value=200)
    data = load_dataset(tmp_path)
    assert data.x.shape == (2, 3, 5, 6)
    assert data.x[0, :, 0, 0] == pytest.approx([40 / 255] * 3)
    assert data.x[1, :, 0, 0] == pytest.approx([200 / 255, 0, 55 / 255])


def test_image_folder_with_train_and_test_splits(tmp_path):
    for split in ("train", "test"):
        for cls in ("x", "y"):
            _png(tmp_path / split / cls / "0.png")
    data = load_dataset(tmp_path)
    assert len(data.x) == len(data.test_x) == 2 and data.class_names == ["x", "y"]


def test_empty_image_folder_is_refused(tmp_path):
    with pytest.raises(
        DatasetError, match="needs one sub-folder of PNG/JPEG images per class.*found none"
    ):
        load_dataset(tmp_path)


def test_class_folder_without_images_is_refused(tmp_path):
    _png(tmp_path / "a" / "0.png")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="no PNG or JPEG images in class folder 'b'"):
        load_dataset(tmp_path)


def test_images_of_different_sizes_are_refused(tmp_path):
    _png(tmp_path / "a" / "0.png", size=(6, 5))
    _png(tmp_path / "b" / "0.png", size=(8, 8))
    with pytest.raises(DatasetError, match=r"images differ in size \(6x5 a/0.png, 8x8 b/0.png\)"):
        load_dataset(tmp_path)


def test_unreadable_image_is_refused_by_name(tmp_path):
    _png(tmp_path / "a" / "0.png")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match="broken.png: not a readable PNG or JPEG image"):
        load_dataset(tmp_path)


def test_unknown_paths_and_formats(tmp_path):
    with pytest.raises(DatasetError, match="no such dataset"):
        load_dataset(tmp_path / "missing.npz")
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(DatasetError, match="data.csv: unknown dataset format"):
        load_dataset(tmp_path / "data.csv")


def test_image_folder_headers_are_checked_before_any_pixel_is_decoded(tmp_path):
    _png(tmp_path / "a" / "0.png")
    (tmp_path / "b").mkdir()
    # a header claiming 5000x4000 pixels and no pixel data: decoding it would fail otherwise
    (tmp_path / "b" / "huge.png").write_bytes(images.raw_png(5000, 4000, 8, 0, None))
    with pytest.raises(
        DatasetError,
        match=r"huge\.png: 5000x4000 pixels \(width x height\) is over the cap of "
        r"16,777,216 pixels per image",
    ):
        load_dataset(tmp_path)


def test_image_folder_of_16_bit_grey_is_scaled_by_65535(tmp_path):
    values = np.linspace(0, 1, 30).reshape(5, 6)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "0.png").write_bytes(images.grey16(values))
    (tmp_path / "b" / "1.png").write_bytes(images.grey8(values))  # 8- and 16-bit mix in one folder
    data = load_dataset(tmp_path)
    assert data.x.shape == (3, 1, 5, 6)
    assert np.allclose(data.x[0, 0], values, atol=0.5 / 65535) and data.x[0].max() == 1.0
    assert np.allclose(data.x[2, 0], values, atol=0.5 / 255)


@pytest.mark.parametrize(
    "data,phrase",
    [
        (images.frames("PNG", size=(6, 5)), "3 frames"),
        (images.save(Image.new("RGBA", (6, 5), (1, 2, 3, 0))), "not fully opaque"),
        (images.save(Image.new("CMYK", (6, 5)), "JPEG"), "a CMYK JPEG"),
    ],
)
def test_image_folder_refuses_what_the_image_rule_refuses(tmp_path, data, phrase):
    _png(tmp_path / "a" / "0.png")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "odd.png").write_bytes(data)
    with pytest.raises(DatasetError, match=f"odd.png: .*{phrase}"):
        load_dataset(tmp_path)
