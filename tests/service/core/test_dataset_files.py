"""Reading uploaded .npz datasets without servers: conversions, refusals, zip bombs, pickles."""

from __future__ import annotations

import io
import struct
import zipfile

import numpy as np
import pytest

from smoothcert.service.core.contract import chunk_seed, plan_chunks
from smoothcert.service.core.dataset_files import (
    DatasetFileError,
    DatasetTooLarge,
    read_dataset_npz,
)

CAP = 1 << 20
RNG = np.random.default_rng(0)
IMAGES = RNG.random((5, 1, 4, 4)).astype(np.float32)
LABELS = np.arange(5)


def npz(tmp_path, compressed: bool = False, **arrays) -> str:
    path = tmp_path / "data.npz"
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def test_float_images_and_labels_round_trip(tmp_path):
    data = read_dataset_npz(
        npz(tmp_path, x=IMAGES.astype(np.float64), y=LABELS.astype(np.int32)), CAP
    )
    assert data.x.dtype == np.float32 and np.array_equal(data.x, IMAGES)
    assert data.y.dtype == np.int64 and data.y.tolist() == LABELS.tolist()
    assert data.source_dtype == "float64"


def test_uint8_pixels_are_scaled_and_compressed_files_read(tmp_path):
    pixels = RNG.integers(0, 256, (5, 3, 2, 2), dtype=np.uint8)
    data = read_dataset_npz(npz(tmp_path, compressed=True, x=pixels, y=LABELS), CAP)
    assert (
        np.allclose(data.x, pixels / 255.0) and data.x.max() <= 1 and data.source_dtype == "uint8"
    )


def test_fortran_order_is_kept(tmp_path):
    data = read_dataset_npz(npz(tmp_path, x=np.asfortranarray(IMAGES), y=LABELS), CAP)
    assert np.array_equal(data.x, IMAGES)


@pytest.mark.parametrize(
    "arrays,phrase",
    [
        ({"x": IMAGES}, "lacks y (it holds x)"),
        ({"images": IMAGES, "labels": LABELS}, "lacks x and y"),
        ({"x": np.array([{"a": 1}] * 5, dtype=object), "y": LABELS}, "pickled Python objects"),
        ({"x": IMAGES, "y": np.array(["a"] * 5)}, "dtype <U1"),
        ({"x": IMAGES[:, 0], "y": LABELS}, "add the channel axis"),
        ({"x": IMAGES[:0], "y": LABELS[:0]}, "no empty axis"),
        ({"x": np.where(IMAGES > 0.5, np.nan, IMAGES), "y": LABELS}, "NaN"),
        ({"x": IMAGES * 255, "y": LABELS}, "[0, 1] pixel space"),
        ({"x": (IMAGES * 255).astype(np.int16), "y": LABELS}, "floats in [0, 1] or uint8"),
        ({"x": IMAGES, "y": LABELS[:4]}, "x holds 5 images but y holds 4"),
        ({"x": IMAGES, "y": LABELS.astype(float)}, "integer labels"),
        ({"x": IMAGES, "y": LABELS - 1}, "labels must lie in [0, 2^31)"),
    ],
)
def test_bad_arrays_are_refused_with_a_message(tmp_path, arrays, phrase):
    with pytest.raises(DatasetFileError) as info:
        read_dataset_npz(npz(tmp_path, **arrays), CAP)
    assert phrase in str(info.value)


def test_not_a_zip(tmp_path):
    path = tmp_path / "x.npz"
    np.save(path, IMAGES)  # an .npy, not an .npz
    with pytest.raises(DatasetFileError, match="not an .npz file"):
        read_dataset_npz(path, CAP)


def test_zip_bomb_is_refused_from_the_declared_sizes(tmp_path):
    zeros = np.zeros((4096, 1, 8, 8), dtype=np.float32)  # 1 MiB unzipped, a few kB zipped
    path = npz(tmp_path, compressed=True, x=zeros, y=np.zeros(4096, dtype=np.int64))
    assert path.stat().st_size < 64 << 10
    with pytest.raises(DatasetTooLarge, match=f"over this server's limit of {CAP} bytes"):
        read_dataset_npz(path, CAP)


def lying_npz(tmp_path, declared_x_size: int):
    """x and y zipped without zip64, then x's uncompressed size rewritten in both of its headers."""
    path = tmp_path / "lying.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for key, array in (("x", IMAGES), ("y", LABELS)):
            buf = io.BytesIO()
            np.save(buf, array)
            archive.writestr(f"{key}.npy", buf.getvalue())
        offset = archive.getinfo("x.npy").header_offset
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, offset + 22, declared_x_size)  # local file header
    central = data.find(b"PK\x01\x02")
    while struct.unpack_from("<I", data, central + 42)[0] != offset:  # its central directory entry
        central = data.find(b"PK\x01\x02", central + 4)
    struct.pack_into("<I", data, central + 24, declared_x_size)
    path.write_bytes(bytes(data))
    return path


def test_a_huge_declared_size_is_refused_before_any_unzipping(tmp_path):
    path = lying_npz(tmp_path, 0xF000_0000)
    with pytest.raises(DatasetTooLarge, match="unzip to"):
        read_dataset_npz(path, CAP)


def test_a_member_larger_than_declared_is_refused(tmp_path):
    # zipfile stops at the declared size and checks the CRC: what lies beyond is never unzipped.
    with pytest.raises(DatasetFileError, match="damaged"):
        read_dataset_npz(lying_npz(tmp_path, 200), CAP)


def test_an_npy_header_claiming_more_data_than_it_holds_is_refused(tmp_path):
    # np.load would allocate the claimed (N, 1, 4, 4) before noticing the data is missing.
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**9, 1, 4, 4)}
    )
    path = tmp_path / "claims.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", header.getvalue() + IMAGES.tobytes())
        buf = io.BytesIO()
        np.save(buf, LABELS)
        archive.writestr("y.npy", buf.getvalue())
    with pytest.raises(DatasetFileError, match=r"header declares shape \[1000000000, 1, 4, 4\]"):
        read_dataset_npz(path, CAP)


def test_chunks_cover_the_range_and_seeds_are_fixed():
    assert plan_chunks(3, 12, 4) == [(3, 7), (7, 11), (11, 12)]
    assert plan_chunks(0, 4, 4) == [(0, 4)]
    seeds = [chunk_seed(7, i) for i in range(3)]
    assert len(set(seeds)) == 3 and all(0 <= s < 2**63 for s in seeds)
    assert chunk_seed(7, 0) == chunk_seed(7, 0) != chunk_seed(8, 0)
    # Pinned: a change of the derivation would silently change every dataset job's answers.
    assert chunk_seed(0, 0) == 0xAC72368A586A18C1 >> 1  # sha256(b"0:0") starts ac72368a586a18c1


def test_store_keeps_the_arrays_and_leaves_nothing_behind_a_refusal(tmp_path):
    from smoothcert.service.core.dataset_store import DatasetMissing, DatasetStore

    store = DatasetStore(tmp_path / "datasets")
    caps = {"max_bytes": CAP, "max_unpacked_bytes": CAP}
    with open(npz(tmp_path, x=IMAGES, y=LABELS), "rb") as upload:
        meta = store.add(upload, "dir/five.npz", None, **caps)
    assert (
        meta["name"],
        meta["filename"],
        meta["num_inputs"],
        meta["input_shape"],
        meta["label_range"],
    ) == ("five", "five.npz", 5, [1, 4, 4], [0, 4])
    assert store.get(meta["id"]) == meta and store.list() == [meta]
    x, y = store.load(meta["id"], 1, 3)
    assert np.array_equal(x, IMAGES[1:3]) and y.tolist() == [1, 2]
    with pytest.raises(DatasetTooLarge, match="limit of 1024 bytes"):
        store.add(io.BytesIO(bytes(2048)), "big.npz", None, max_bytes=1024, max_unpacked_bytes=CAP)
    with pytest.raises(DatasetFileError, match="not an .npz"):
        store.add(io.BytesIO(b"junk"), "junk.npz", None, **caps)
    assert [p.name for p in (tmp_path / "datasets").iterdir()] == [meta["id"]]
    assert store.delete(meta["id"]) and not store.delete(meta["id"]) and store.get("../etc") is None
    with pytest.raises(DatasetMissing, match="was deleted"):
        store.load(meta["id"], 0, 1)


def test_integer_pixels_are_stored_as_uploaded_and_scaled_when_loaded(tmp_path):
    from smoothcert.service.core.dataset_store import DatasetStore

    store = DatasetStore(tmp_path / "datasets")
    caps = {"max_bytes": CAP, "max_unpacked_bytes": CAP}
    cases = [
        (RNG.integers(0, 256, (5, 1, 4, 4), dtype=np.uint8), np.uint8, 255),
        (RNG.integers(0, 65536, (5, 1, 4, 4), dtype=np.uint16).astype(">u2"), np.uint16, 65535),
    ]
    for pixels, stored, scale in cases:
        with open(
            npz(tmp_path, compressed=True, x=pixels, y=LABELS.astype(np.uint8)), "rb"
        ) as upload:
            meta = store.add(upload, "px.npz", None, owner="someone", **caps)
        folder = tmp_path / "datasets" / meta["id"]
        assert (
            np.load(folder / "x.npy").dtype == stored
            and np.load(folder / "y.npy").dtype == np.uint8
        )
        assert meta["stored_bytes"] == sum(p.stat().st_size for p in folder.glob("*.npy"))
        assert meta["owner"] == "someone" and meta["label_range"] == [0, 4]
        x, y = store.load(meta["id"], 1, 4)
        # Bit for bit what scaling the whole upload to float32 at once gave.
        assert x.dtype == np.float32 and np.array_equal(
            x, pixels[1:4].astype(np.float32) / np.float32(scale)
        )
        assert y.dtype == np.int64 and y.tolist() == [1, 2, 3]
    assert read_dataset_npz(npz(tmp_path, x=cases[1][0], y=LABELS), CAP).x.max() <= 1


def test_floats_are_stored_as_float32_at_most_and_fortran_order_survives(tmp_path):
    from smoothcert.service.core.dataset_store import DatasetStore

    store = DatasetStore(tmp_path / "datasets")
    caps = {"max_bytes": CAP, "max_unpacked_bytes": CAP}
    for x, stored in (
        (IMAGES.astype(np.float64), np.float32),
        (IMAGES.astype(np.float16), np.float16),
        (np.asfortranarray(IMAGES), np.float32),
    ):
        with open(npz(tmp_path, x=x, y=LABELS), "rb") as upload:
            meta = store.add(upload, "f.npz", None, **caps)
        assert np.load(tmp_path / "datasets" / meta["id"] / "x.npy").dtype == stored
        assert np.array_equal(store.load(meta["id"], 0, 5)[0], x.astype(np.float32))


def test_values_are_checked_across_blocks(tmp_path, monkeypatch):
    from smoothcert.service.core import dataset_files

    monkeypatch.setattr(dataset_files, "BLOCK_BYTES", 64)  # 16 float32 values: one image per block
    late = IMAGES.copy()
    late[4, 0, 3, 3] = 1.5  # in the last block only
    with pytest.raises(DatasetFileError, match=r"found values in \[0(\.\d+)?, 1.5\]"):
        read_dataset_npz(npz(tmp_path, x=late, y=LABELS), CAP)
    late[4, 0, 3, 3] = np.inf
    with pytest.raises(DatasetFileError, match="NaN or infinite"):
        read_dataset_npz(npz(tmp_path, x=late, y=LABELS), CAP)
    many = np.arange(300) % 7
    data = read_dataset_npz(npz(tmp_path, x=np.zeros((300, 1, 1, 1), dtype=np.uint8), y=many), CAP)
    assert data.y.tolist() == many.tolist()
    with pytest.raises(DatasetFileError, match=r"found values in \[-1, 6\]"):
        read_dataset_npz(
            npz(tmp_path, x=np.zeros((300, 1, 1, 1), dtype=np.uint8), y=np.where(many, many, -1)),
            CAP,
        )


def test_a_refusing_admit_leaves_nothing_and_is_told_the_size_on_disk(tmp_path):
    from smoothcert.service.core.dataset_store import DatasetStore, block_size

    store, seen = DatasetStore(tmp_path / "datasets"), []

    def admit(dataset_id: str, stored_bytes: int):
        seen.append(stored_bytes)
        raise DatasetTooLarge("over the quota")

    pixels = np.zeros((5, 1, 4, 4), dtype=np.uint8)
    with (
        open(npz(tmp_path, x=pixels, y=LABELS), "rb") as upload,
        pytest.raises(DatasetTooLarge, match="quota"),
    ):
        store.add(upload, "q.npz", None, max_bytes=CAP, max_unpacked_bytes=CAP, admit=admit)
    # x.npy, y.npy and meta.json, and the folder: one block each at this size
    assert pixels.nbytes + 128 < block_size(tmp_path) and seen == [4 * block_size(tmp_path)]
    assert list((tmp_path / "datasets").iterdir()) == []
