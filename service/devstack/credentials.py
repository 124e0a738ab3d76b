"""The keys of ``smoothcert up`` in development, kept across restarts in ``DATA_DIR/credentials.env``.

Three secrets: ``SMOOTHCERT_ADMIN_KEY`` (account ``admin``, every scope), ``SMOOTHCERT_API_KEY``
(account ``default``, scope ``certify``) and ``SMOOTHCERT_KEY_PEPPER`` (the server secret under
which the keys made with ``POST /v1/keys`` are stored). The first start on a data dir generates
the three (distinct, random) and writes them to the file, mode 0600, created at once or not at
all; every later start reads them back, so an open web page, an exported key and the keys made
with ``POST /v1/keys`` keep working. A value set (non-empty) in the environment wins over the
file's and is never written to it. The file is ``NAME=VALUE`` lines, ``#`` comments and blank
lines allowed, the three names each once; anything else is an error that names the file.
Deleting the file gives new keys on the next start (and, with a new pepper, ends every key made
with ``POST /v1/keys``). Production never comes here: its keys must be given
(:class:`~smoothcert.service.core.settings.Settings`).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from smoothcert.service.core.settings import derived_key_pepper

FILE_NAME = "credentials.env"
ADMIN_KEY, API_KEY, KEY_PEPPER = (
    "SMOOTHCERT_ADMIN_KEY",
    "SMOOTHCERT_API_KEY",
    "SMOOTHCERT_KEY_PEPPER",
)
NAMES = (ADMIN_KEY, API_KEY, KEY_PEPPER)
# What each printed key is for, the same words in the banners of `smoothcert up` and `make deploy-up`.
USER_KEY_USE = (
    "account default, scope certify: certify and predict jobs, datasets; for the web page, "
    "the curl examples below and your scripts"
)
ADMIN_KEY_USE = (
    "account admin, every scope: upload and delete models, train, make and revoke keys with "
    "POST /v1/keys; keep it to yourself"
)

_HEADER = """\
# The keys of `smoothcert up` on this data dir, generated on its first start and reused on every
# later one. A SMOOTHCERT_* variable set in the environment wins over its line here.
# SMOOTHCERT_ADMIN_KEY: account admin, every scope. SMOOTHCERT_API_KEY: account default, scope
# certify. SMOOTHCERT_KEY_PEPPER: the secret under which keys made with POST /v1/keys are stored
# (a new one ends them all). Delete this file to get new keys on the next start.
"""
_REMEDY = (
    "fix it, or delete it to get new keys on the next start (keys made with POST /v1/keys then "
    "stop working)"
)


class CredentialsError(ValueError):
    """The credentials file cannot be used; the message names it and says what is wrong."""


@dataclass(frozen=True)
class Credentials:
    """The keys a development ``smoothcert up`` runs with, and where each came from."""

    path: Path
    admin_key: str
    api_key: str
    key_pepper: str
    from_env: frozenset[str]  # the NAMES whose value the environment gave
    created: bool  # this start wrote the file


def load(data_dir: Path, environ: Mapping[str, str]) -> Credentials:
    """The keys for ``data_dir``: the environment's where set, else the file's; the file is
    written first when missing. CredentialsError for a file that cannot be used."""
    path = Path(data_dir) / FILE_NAME
    created = False
    if not path.exists():
        created = write_new(path, generate(environ))
    stored = read(path)
    given = {name: environ[name] for name in NAMES if environ.get(name)}
    values = {**stored, **given}
    return Credentials(
        path=path,
        admin_key=values[ADMIN_KEY],
        api_key=values[API_KEY],
        key_pepper=values[KEY_PEPPER],
        from_env=frozenset(given),
        created=created,
    )


def generate(environ: Mapping[str, str]) -> dict[str, str]:
    """Three fresh secrets for a new file. The pepper is the one a development process used
    before this file existed when the environment gives a key it was derived from (the admin
    key, else the API key, which was then the admin key too): keys made with POST /v1/keys
    under such a fixed key keep working."""
    values = {name: secrets.token_urlsafe(32) for name in NAMES}
    legacy = environ.get(ADMIN_KEY) or environ.get(API_KEY)
    if legacy and not environ.get(KEY_PEPPER):
        values[KEY_PEPPER] = derived_key_pepper(legacy)
    return values


def write_new(path: Path, values: Mapping[str, str]) -> bool:
    """Create ``path`` (mode 0600, its folder 0700 when it is made here) holding ``values``,
    complete or not at all; False when the file already exists (another start made it first)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    text = _HEADER + "".join(f"{name}={values[name]}\n" for name in NAMES)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails, rather than replaces, when the file appeared meanwhile
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def read(path: Path) -> dict[str, str]:
    """The three values of the file at ``path``; CredentialsError naming it when it is unreadable
    or malformed. A file that others may read is narrowed to mode 0600 first."""
    try:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialsError(f"cannot read the credentials file {path}: {exc}") from None
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = (part.strip() for part in line.partition("="))
        problem = _problem(name, sep, value, values)
        if problem:
            raise CredentialsError(
                f"the credentials file {path} is malformed: line {number} {problem}; {_REMEDY}"
            )
        values[name] = value
    missing = [name for name in NAMES if name not in values]
    if missing:
        raise CredentialsError(
            f"the credentials file {path} is malformed: it has no {', '.join(missing)}; {_REMEDY}"
        )
    return values


def _problem(name: str, sep: str, value: str, seen: Mapping[str, str]) -> str:
    """What is wrong with one NAME=VALUE line ("" when nothing is)."""
    if not sep:
        return "is not NAME=VALUE"
    if name not in NAMES:
        return f"names {name!r}, not one of {', '.join(NAMES)}"
    if name in seen:
        return f"repeats {name}"
    if not value:
        return f"gives {name} no value"
    if any(c.isspace() or c in "'\"" for c in value):
        return f"gives {name} a value with spaces or quotes (write it bare)"
    return ""


def key_lines(
    api_key: str, admin_key: str, from_env: Collection[str], kept_in: str, restarts: str
) -> list[str]:
    """The banner's lines for the two bootstrap keys: each key and what it is for, which came from
    the environment (names in ``from_env``), and where the others are kept (``kept_in``) and that
    they survive ``restarts``."""

    def note(name: str) -> str:
        return f"  (from {name} in the environment)" if name in from_env else ""

    lines = [
        f"API key: {api_key}{note(API_KEY)}",
        f"  {USER_KEY_USE}",
        f"admin key: {admin_key}{note(ADMIN_KEY)}",
        f"  {ADMIN_KEY_USE}",
    ]
    kept = [name for name in (API_KEY, ADMIN_KEY) if name not in from_env]
    if kept:
        which = (
            "both keys are"
            if len(kept) == 2
            else f"the {'API' if kept == [API_KEY] else 'admin'} key is"
        )
        lines.append(
            f"{which} kept in {kept_in} and survive{'' if len(kept) == 2 else 's'} restarts "
            f"({restarts}), as do the keys made with POST /v1/keys"
        )
    return lines
