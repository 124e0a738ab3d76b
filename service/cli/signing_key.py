"""``smoothcert signing-key show|rotate``: the service's certificate signing key, on the host of
its API (it reads ``SMOOTHCERT_DATA_DIR`` and ``SMOOTHCERT_SIGNING_KEY_FILE`` as the API does).

``rotate`` retires the active key (its public half stays listed by ``GET /v1/signing-keys``, so
certificates it signed stay verifiable) and makes a new one, which every API process uses from
its next signature on.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_commands(commands: argparse._SubParsersAction) -> None:
    key = commands.add_parser(
        "signing-key", help="show or rotate the key with which the service signs certificates"
    )
    actions = key.add_subparsers(dest="signing_key_command", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="print the public keys as GET /v1/signing-keys does")
    show.set_defaults(handler=_show)
    rotate = actions.add_parser(
        "rotate", help="retire the active signing key and make a new one (on the API's host)"
    )
    rotate.set_defaults(handler=_rotate)


def _keys():
    from smoothcert.service.core.settings import Settings
    from smoothcert.service.core.signing import SigningKeys

    settings = Settings()
    return SigningKeys(settings.signing_dir, settings.signing_key_file)


def _show(args: argparse.Namespace) -> int:
    print(json.dumps({"keys": [k.to_dict() for k in _keys().public_keys()]}, indent=2))
    return 0


def _rotate(args: argparse.Namespace) -> int:
    old, new = _keys().rotate()
    print(new)
    print(
        f"retired signing key {old}; certificates are signed with {new} from now on "
        "(both stay listed by GET /v1/signing-keys)",
        file=sys.stderr,
    )
    return 0
