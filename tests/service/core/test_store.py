"""FolderStore and copy_upload: ids, folders, atomic records, listing and deletion, the size cap."""

from __future__ import annotations

import hashlib
import io

import pytest

from smoothcert.service.core.store import RECORD, FolderStore, copy_upload


class TooLarge(ValueError):
    pass


@pytest.mark.parametrize("bad", ["", "../etc", "a/b", ".hidden", "x" * 65])
def test_a_malformed_id_names_no_folder(tmp_path, bad):
    store = FolderStore(tmp_path)
    with pytest.raises(KeyError):
        store.folder(bad)
    assert store.get(bad) is None and store.read(bad) is None and not store.delete(bad)


def test_records_round_trip_oldest_first_and_folders_without_one_stay_invisible(tmp_path):
    store = FolderStore(tmp_path / "root")
    assert store.list() == []
    ids = []
    for stamp in (2.0, 1.0):
        with store.new_folder() as (record_id, folder):
            assert folder == store.folder(record_id) and folder.is_dir() and len(record_id) == 16
            store.write(record_id, {"id": record_id, "created_at": stamp})
        ids.append(record_id)
    with store.new_folder() as (in_progress, _):
        pass  # no record written: as an upload still running
    assert [r["id"] for r in store.list()] == ids[::-1]
    assert sorted(p.name for p in store.folder(ids[0]).iterdir()) == [RECORD]  # no temporary left
    assert store.get(in_progress) is None and not store.delete(in_progress)
    assert store.delete(ids[0]) and not store.folder(ids[0]).exists() and not store.delete(ids[0])


def test_a_failing_block_leaves_no_folder(tmp_path):
    store = FolderStore(tmp_path)
    with pytest.raises(RuntimeError):
        with store.new_folder() as (_, folder):
            (folder / "payload").write_bytes(b"x")
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []


def test_copy_upload_counts_the_head_and_stops_at_the_cap(tmp_path):
    dest = tmp_path / "f"
    sha, size = copy_upload(io.BytesIO(b"world"), dest, 11, lambda: TooLarge(), head=b"hello ")
    assert (sha, size, dest.read_bytes()) == (
        hashlib.sha256(b"hello world").hexdigest(),
        11,
        b"hello world",
    )
    assert copy_upload(io.BytesIO(bytes(64)), dest, None, lambda: TooLarge())[1] == 64
    with pytest.raises(TooLarge):
        copy_upload(io.BytesIO(bytes(64)), dest, 63, lambda: TooLarge())
