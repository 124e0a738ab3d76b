"""``openapi/openapi.json``: the API's OpenAPI document, generated from the app and checked in.

``python -m smoothcert.service.devstack.openapi_doc`` (or ``make openapi``) rewrites the file from
``create_app(...).openapi()``; ``--check`` only compares and exits 1 when the file is stale, which
a test does too. The app is built with throwaway settings: creating it opens no connection, so
neither Redis nor a worker is needed. The text is deterministic (sorted keys, indent 2, a final
newline) so that a diff shows exactly what changed in the API.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import tempfile
from pathlib import Path

from smoothcert.service.api.app import create_app
from smoothcert.service.core.settings import Settings

DEFAULT_PATH = Path("openapi/openapi.json")


def openapi_document() -> dict:
    """The OpenAPI document the app serves at ``/openapi.json``."""
    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings(
            env="development",
            api_key="openapi-document-key",
            data_dir=data_dir,
            redis_url="redis://127.0.0.1:1/0",
        )
        return create_app(settings, configure_logs=False).openapi()


def openapi_text() -> str:
    """The document as the checked-in file holds it."""
    return json.dumps(openapi_document(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def stale_diff(path: Path, limit: int = 40) -> str | None:
    """None when ``path`` holds the current document; else the start of a unified diff."""
    fresh = openapi_text()
    try:
        current = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return f"{path} does not exist"
    if current == fresh:
        return None
    lines = list(
        difflib.unified_diff(
            current.splitlines(),
            fresh.splitlines(),
            f"{path} (checked in)",
            f"{path} (from the app)",
            lineterm="",
        )
    )
    more = f"\n... {len(lines) - limit} more diff lines" if len(lines) > limit else ""
    return "\n".join(lines[:limit]) + more


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m smoothcert.service.devstack.openapi_doc",
        description="Write (or --check) the API's OpenAPI document.",
    )
    parser.add_argument("--path", type=Path, default=DEFAULT_PATH, help=f"default {DEFAULT_PATH}")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the file differs from the app's document"
    )
    args = parser.parse_args(argv)
    if args.check:
        diff = stale_diff(args.path)
        if diff is None:
            print(f"{args.path} is up to date")
            return 0
        print(
            f"{args.path} is out of date with the app; run `make openapi`\n{diff}", file=sys.stderr
        )
        return 1
    args.path.parent.mkdir(parents=True, exist_ok=True)
    args.path.write_text(openapi_text(), encoding="utf-8")
    print(f"wrote {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
