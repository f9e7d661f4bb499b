"""``gputorrent id``: this node's peer id."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import Parents, identity_of, out, settings_of


def register(sub: Any, parents: Parents) -> None:
    s = sub.add_parser("id", parents=[parents.identity], help="print this node's peer id",
                       description="Print this node's peer id (creating its key on first run).")
    s.add_argument("--json", action="store_true",
                   help="print peer id, public key, key file and what this llama.cpp build can offload as JSON")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    ident = identity_of(args)
    if args.json:
        from ..engine.native import build_info

        out({"peer_id": ident.peer_id, "public_key": ident.public_key.hex(),
             "identity_file": str(settings.identity_path), "build": build_info()})
    else:
        print(ident.peer_id)
        print(f"public key  {ident.public_key.hex()}", file=sys.stderr)
        print(f"key file    {settings.identity_path}", file=sys.stderr)
    return 0
