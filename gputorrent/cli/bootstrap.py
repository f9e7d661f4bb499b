"""``gputorrent bootstrap``: a DHT-only node for others to join by."""

from __future__ import annotations

import argparse
from typing import Any

from .common import Parents, identity_of, listening, node_options, note, print_addrs, settings_of


def register(sub: Any, parents: Parents) -> None:
    s = sub.add_parser("bootstrap", parents=[parents.swarm], help="run a DHT-only node for others to join by",
                       description="Run a node that serves no model and only takes part in the DHT, to give a "
                                   "swarm a stable address to join by. It holds no authority: any peer can do this.")
    listening(s)
    s.set_defaults(func=run, announce_interval=None, advert_ttl=None)


def run(args: argparse.Namespace) -> int:
    import trio

    from ..serving.node import run_node

    opts = node_options(args, settings_of(args))

    def on_ready(info: dict) -> None:
        note(f"bootstrap node {info['peer_id']} (DHT only, serves no model)")
        print_addrs(info)
        note("give one of these to other peers with --bootstrap; press Ctrl-C to stop")

    trio.run(lambda: run_node(identity_of(args), opts, on_ready=on_ready))
    return 0
