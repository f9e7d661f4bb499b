"""Run a swarm node until SIGINT/SIGTERM: host, DHT, bootstrap, announcements, ready file.

``serve`` runs one with a model and the infer protocol; ``bootstrap`` runs one with neither,
to give a swarm a stable address to join by (it holds no authority: any peer can do this).
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ..dht import records
from ..dht.node import SwarmNode, swarm_node
from ..identity import Identity
from ..net.host import full_addrs, running_host

log = logging.getLogger(__name__)


@dataclass(slots=True)
class NodeOptions:
    listen: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    bootstrap: list[str] = field(default_factory=list)
    mdns: bool = True
    ready_file: Path | None = None
    announce_interval: float = records.ANNOUNCE_INTERVAL_S
    advert_ttl: float = records.ADVERT_TTL_S
    psk: str | None = None
    dht_fault: str = ""  # fault injection: "silent" (never answer DHT requests), "fake-providers"
    on_timing: Callable[[str, float], None] | None = None  # DHT timings ("announce", "lookup"), for metrics


def write_ready_file(path: Path, info: dict[str, Any]) -> None:
    """Atomically: a watcher never reads half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


async def run_node(
    identity: Identity,
    opts: NodeOptions,
    *,
    handlers: dict[str, Callable] | None = None,
    make_advert: Callable[[SwarmNode, bool], records.Advert] | None = None,
    ready_info: Callable[[SwarmNode], dict[str, Any]] | None = None,
    on_ready: Callable[[dict[str, Any]], None] = lambda info: None,
    stop: trio.Event | None = None,
) -> None:
    """Join the swarm, announce (when ``make_advert`` is given), and run until a signal, or
    until ``stop`` is set when one is given (embedded use leaves signals to the program).

    On stopping, a node that announced publishes a final "leaving" advert, so requesters stop
    choosing it at once instead of after the advert expires.
    """
    with (trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) if stop is None else nullcontext()) as signals:
        async with running_host(identity, opts.listen, mdns=opts.mdns, psk=opts.psk) as host:
            for proto, handler in (handlers or {}).items():
                host.set_stream_handler(proto, handler)
            async with swarm_node(host, identity, server=True, fault=opts.dht_fault) as node:
                if opts.on_timing is not None:
                    node.on_timing = opts.on_timing
                if opts.bootstrap:
                    joined = await node.join(opts.bootstrap)
                    if not joined:
                        log.warning("no bootstrap peer answered; waiting for peers to find us")
                async with trio.open_nursery() as nursery:
                    if make_advert is not None:
                        await nursery.start(node.announce_forever, lambda: make_advert(node, False),
                                            opts.announce_interval)
                    info = {"peer_id": identity.peer_id, "addrs": full_addrs(host)}
                    info |= ready_info(node) if ready_info else {}
                    if opts.ready_file:
                        write_ready_file(opts.ready_file, info)
                    on_ready(info)
                    if stop is not None:
                        await stop.wait()
                    else:
                        assert signals is not None
                        async for _ in signals:
                            break
                    nursery.cancel_scope.cancel()
                if make_advert is not None:
                    with trio.move_on_after(5):
                        await node.publish(make_advert(node, True))
    if opts.ready_file:
        Path(opts.ready_file).unlink(missing_ok=True)
