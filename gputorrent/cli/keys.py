"""``gputorrent keys``: keys for private swarms."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import Parents, note, settings_of


def register(sub: Any, parents: Parents) -> None:
    k = sub.add_parser("keys", help="make keys for private swarms", description="Make keys for private swarms.")
    ksub = k.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    s = ksub.add_parser("new-swarm-key", help="create a new swarm key file (mode 0600)",
                        description="Create a random swarm key (libp2p pre-shared key, swarm.key format). Peers "
                                    "started with --swarm-key FILE connect only to peers holding the same key.")
    s.add_argument("path", nargs="?", type=Path, help="where to write it [default: swarm.key in the user data dir]")
    s.set_defaults(func=new_swarm_key)


def new_swarm_key(args: argparse.Namespace) -> int:
    from ..swarmkey import write_new

    path = args.path or settings_of(args).data_dir / "swarm.key"
    write_new(path)
    print(path)
    note("give this file (privately) to every peer of the swarm and start them with --swarm-key FILE")
    return 0
