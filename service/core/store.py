"""Uploads kept on disk: one folder per id under a root, its JSON record ``meta.json`` beside the payload.

What the model and dataset stores share. An id is 1 to 64 characters of letters, digits, ``_``,
``.`` and ``-`` that starts with a letter or digit, so it can never name a path outside the
root; anything else is treated as an id that does not exist, and so is a folder or file that
resolves outside the root (a link), as a second line of defence. A record is replaced atomically
(written to a temporary file, then renamed), so readers never see half of one, and a folder
without its record (an upload in progress, or one that failed) is invisible. Standard library only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

RECORD = "meta.json"
# The data dir holds every key's datasets, models and job inputs, Redis' dump and the logs: the
# processes of the service create what they write there for their own user only.
PRIVATE_UMASK, PRIVATE_DIR_MODE = 0o077, 0o700
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_BLOCK = 1 << 20


# The accounts of the bootstrap keys: SMOOTHCERT_ADMIN_KEY's and SMOOTHCERT_API_KEY's.
ADMIN_ACCOUNT, DEFAULT_ACCOUNT = "admin", "default"


def account_of(owner: str | None) -> str:
    """The account a record's ``owner`` field names; a record without one (from before ownership
    was recorded) belongs to ``default``."""
    return owner or DEFAULT_ACCOUNT


def block_size(path: str | os.PathLike[str]) -> int:
    """The allocation unit of the file system holding ``path`` (at least 512 bytes)."""
    return max(512, os.statvfs(path).f_frsize)


def disk_bytes(file_sizes: list[int], block: int) -> int:
    """What a folder holding files of ``file_sizes`` takes on disk (a dataset's or a model's, as
    storage quotas count them): each file, and the folder itself, rounded up to whole blocks, at
    least one each."""
    return block * (1 + sum(max(1, -(-size // block)) for size in file_sizes))


class FolderStore:
    """Records under ``root``, one folder each; safe to use from the API and the workers at once."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def folder(self, record_id: str) -> Path:
        """The folder of ``record_id`` (which may not exist); KeyError for a malformed id, or
        for a folder that resolves outside the root."""
        if not isinstance(record_id, str) or not _ID.match(record_id):
            raise KeyError(record_id)
        try:
            return inside(self.root, self.root / record_id)
        except ValueError:
            raise KeyError(record_id) from None

    def file(self, record_id: str, name: str) -> Path:
        """File ``name`` of ``record_id``'s folder; KeyError as :meth:`folder`, and when the file
        resolves outside the root."""
        try:
            return inside(self.root, self.folder(record_id) / name)
        except ValueError:
            raise KeyError(record_id) from None

    def read(self, record_id: str) -> dict[str, Any] | None:
        """The stored record, whatever its state; None when there is none."""
        try:
            return json.loads((self.folder(record_id) / RECORD).read_text())
        except (KeyError, OSError, ValueError):
            return None

    def get(self, record_id: str) -> dict[str, Any] | None:
        """The record when it is visible to users (every stored one, unless a subclass narrows it)."""
        return self.read(record_id)

    def write(self, record_id: str, record: dict[str, Any]) -> None:
        """Replace the record of ``record_id`` atomically."""
        path = self.folder(record_id) / RECORD
        tmp = path.with_name(f"{RECORD}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
        os.replace(tmp, path)

    def list(self) -> list[dict[str, Any]]:
        """The records :meth:`get` returns, oldest ``created_at`` first."""
        if not self.root.is_dir():
            return []
        records = (self.get(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted((r for r in records if r), key=lambda r: r.get("created_at", 0))

    def delete(self, record_id: str) -> bool:
        """Remove the folder of a stored record; False when there was none."""
        if self.read(record_id) is None:
            return False
        shutil.rmtree(self.folder(record_id), ignore_errors=True)
        return True

    @contextlib.contextmanager
    def new_folder(self) -> Iterator[tuple[str, Path]]:
        """A fresh id and its new, empty folder; the folder is removed if the block raises anything."""
        record_id = uuid.uuid4().hex[:16]
        folder = self.folder(record_id)
        folder.mkdir(parents=True)
        try:
            yield record_id, folder
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise


def copy_upload(
    src: BinaryIO,
    dest: Path,
    max_bytes: int | None,
    too_large: Callable[[], Exception],
    head: bytes = b"",
) -> tuple[str, int]:
    """Write ``head`` and then the rest of ``src`` to ``dest``; return the sha256 hex digest and size.

    ``head`` is what the caller already read from ``src`` to sniff its format. Raises
    ``too_large()`` as soon as the bytes read after ``head`` take the size past ``max_bytes``
    (None: no cap); ``dest`` is then left partly written for the caller to remove.
    """
    digest, size = hashlib.sha256(head), len(head)
    with open(dest, "wb") as out:
        out.write(head)
        while block := src.read(_BLOCK):
            size += len(block)
            if max_bytes is not None and size > max_bytes:
                raise too_large()
            digest.update(block)
            out.write(block)
    return digest.hexdigest(), size


def private_data_dir(data_dir: Path) -> Path:
    """Make this process create files 0600 and folders 0700 from now on (umask 077; the processes
    it starts inherit it), and ``data_dir`` exist with mode 0700 (an existing one this user owns is
    narrowed to it). The API, the worker and ``smoothcert up`` call it as they start."""
    os.umask(PRIVATE_UMASK)
    data_dir.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    with contextlib.suppress(OSError):  # another user's folder is left as it is
        if data_dir.stat().st_uid == os.getuid():
            data_dir.chmod(PRIVATE_DIR_MODE)
    return data_dir


def inside(root: str | Path, path: str | Path) -> Path:
    """``path`` if, with every link resolved, it lies inside ``root`` (resolved too); ValueError
    otherwise. ``path`` need not exist."""
    base, resolved = Path(root).resolve(), Path(path).resolve()
    if resolved != base and base not in resolved.parents:
        raise ValueError(f"{path} lies outside {root}")
    return Path(path)


def created_at() -> float:
    """The ``created_at`` of a new record: seconds since the epoch, to the millisecond."""
    return round(time.time(), 3)
