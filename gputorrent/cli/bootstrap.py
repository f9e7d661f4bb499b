"""``gputorrent bootstrap``: a DHT-only node for others to join by."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import Parents, UsageError, check_listen, listening, node_options, note, print_addrs, settings_of


def register(sub: Any, parents: Parents) -> None:
    s = sub.add_parser("bootstrap", parents=[parents.swarm], help="run a DHT-only node for others to join by",
                       description="Run a node that serves no model and only takes part in the DHT, to give a "
                                   "swarm a stable address to join by. It holds no authority: any peer can do this.")
    listening(s)
    s.set_defaults(func=run, announce_interval=None, advert_ttl=None)


def run(args: argparse.Namespace) -> int:
    import trio

    from ..identity import Identity, KeyHold, key_in_use
    from ..serving.node import run_node

    settings = settings_of(args)
    saved = settings.data_dir / "bootstrap.listen"
    _same_port_as_last_time(args, settings.listen, saved)
    opts = node_options(args, settings)
    identity = Identity.load_or_create(settings.bootstrap_identity_path)
    hold = KeyHold.take(settings.bootstrap_identity_path)  # kept until this process ends
    if hold is None:
        raise UsageError(key_in_use(settings.bootstrap_identity_path))

    def on_ready(info: dict) -> None:
        note(f"bootstrap node {info['peer_id']} (DHT only, serves no model)")
        print_addrs(info)
        note("give one of these to other peers with --bootstrap; press Ctrl-C to stop")
        if info.get("addrs") and not args.listen_given:
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(info["addrs"][0].split("/p2p/")[0] + "\n")

    trio.run(lambda: run_node(identity, opts, on_ready=on_ready))
    return 0


def _same_port_as_last_time(args: argparse.Namespace, listen: str, saved: Path) -> None:
    """A bootstrap node's address is what others write down: with no --listen (and no listen
    address in the config), it listens where it did last time, when that port is free."""
    args.listen_given = bool(args.listen) or not listen.endswith("/tcp/0")
    if args.listen_given:
        return
    try:
        addr = saved.read_text().strip()
    except OSError:
        return
    try:
        check_listen([addr])
    except UsageError:
        note(f"the address of last time ({addr}) is taken; listening on a new port")
        return
    args.listen = [addr]
