"""The service's Ed25519 signing keys, on the data volume (torch-free; the API signs with them).

Only API processes sign: workers run uploaded models, which may be hostile, and a process that
runs them should hold no key whose signature means "smoothcert computed this". The API builds
each certificate from what it recorded itself (the model's digest, the inputs' digests, the
parameters and the seed) and the rows the worker reported, and signs it.

Layout under ``DATA_DIR/signing`` (folder 0700, files 0600)::

    active.pem            the private key in use (PKCS#8 PEM), unless SMOOTHCERT_SIGNING_KEY_FILE
                          names another file
    public/<keyid>.pem    the public key of every key ever used here, retired ones included, so
                          certificates signed before a rotation stay verifiable
    retired/<keyid>.json  when a key was retired: {"keyid", "retired_time"}

A key id is the SHA-256 of the raw 32-byte public key, in hex. The key is generated at the first
start when there is none (several API processes may start at once: the first to link its file
wins, the others read it) and kept; :func:`rotate` retires it and makes a new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from smoothcert.service.core.certificates import utc_text

ALGORITHM = "ed25519"


class SigningKeyError(ValueError):
    """A signing key file that cannot be read or used; the message names the file."""


def key_id(public: Ed25519PublicKey) -> str:
    """The key id: the SHA-256 of the raw public key, in hex."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def public_pem(public: Ed25519PublicKey) -> str:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def load_public_pem(text: str | bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from its PEM (SubjectPublicKeyInfo); ValueError otherwise."""
    key = serialization.load_pem_public_key(text.encode() if isinstance(text, str) else text)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


def _write_private(path: Path, key: Ed25519PrivateKey) -> None:
    """Write ``key`` to ``path`` (0600) unless a file is there already; first writer wins."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".key-")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)  # atomic, and never over a key another process wrote
    finally:
        os.unlink(tmp)


def read_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PKCS#8 PEM file; SigningKeyError naming the file otherwise."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SigningKeyError(f"cannot read the signing key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"the signing key {path} is not an Ed25519 private key")
    return key


@dataclass(frozen=True)
class PublicKey:
    """A key as ``GET /v1/signing-keys`` lists it."""

    keyid: str
    pem: str
    active: bool
    retired_time: str | None

    def to_dict(self) -> dict[str, object]:
        return {
            "keyid": self.keyid,
            "algorithm": ALGORITHM,
            "public_key_pem": self.pem,
            "active": self.active,
            "retired_time": self.retired_time,
        }


class SigningKeys:
    """The keys under ``root`` (``DATA_DIR/signing``); ``key_file`` overrides the active one."""

    def __init__(self, root: Path, key_file: Path | None = None):
        self.root = Path(root)
        self.key_file = Path(key_file) if key_file else None

    @property
    def active_path(self) -> Path:
        return self.key_file or self.root / "active.pem"

    def active(self) -> tuple[str, Ed25519PrivateKey]:
        """The key in use and its id, generated (and its public half recorded) when there is none."""
        path = self.active_path
        if not path.exists():
            if self.key_file is not None:
                raise SigningKeyError(
                    f"SMOOTHCERT_SIGNING_KEY_FILE names {path}, which does not exist"
                )
            _write_private(path, Ed25519PrivateKey.generate())
        key = read_private_key(path)
        keyid = key_id(key.public_key())
        self._record_public(keyid, key.public_key())
        return keyid, key

    def _record_public(self, keyid: str, public: Ed25519PublicKey) -> None:
        folder = self.root / "public"
        path = folder / f"{keyid}.pem"
        if path.exists():
            return
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = folder / f".{keyid}.{os.getpid()}.tmp"
        tmp.write_text(public_pem(public))
        os.replace(tmp, path)

    def public_keys(self) -> list[PublicKey]:
        """Every key this service has signed with: the active one first, then the retired ones,
        newest retired first."""
        active_id, _ = self.active()
        keys = []
        for path in sorted((self.root / "public").glob("*.pem")):
            keyid = path.stem
            retired = self.root / "retired" / f"{keyid}.json"
            when = json.loads(retired.read_text())["retired_time"] if retired.exists() else None
            keys.append(PublicKey(keyid, path.read_text(), keyid == active_id, when))
        current = [k for k in keys if k.active]
        older = sorted(
            (k for k in keys if not k.active), key=lambda k: k.retired_time or "", reverse=True
        )
        return current + older

    def rotate(self) -> tuple[str, str]:
        """Retire the active key and make a new one; (old key id, new key id). Certificates signed
        with the old key stay verifiable with its public key, which stays listed."""
        if self.key_file is not None:
            raise SigningKeyError(
                "the signing key comes from SMOOTHCERT_SIGNING_KEY_FILE; rotate it by pointing "
                "that setting at a new key file (and keep the old public key listed)"
            )
        old_id, _ = self.active()
        retired = self.root / "retired"
        retired.mkdir(parents=True, exist_ok=True, mode=0o700)
        (retired / f"{old_id}.json").write_text(
            json.dumps({"keyid": old_id, "retired_time": utc_text(time.time())})
        )
        path = self.active_path
        os.replace(path, retired / f"{old_id}.pem")
        new_id, _ = self.active()
        return old_id, new_id
