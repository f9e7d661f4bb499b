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
from ..net import relay
from ..net.host import DialError, connect, full_addrs, running_host

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
    reachability: str = "auto"  # "auto" (dial-back), "public", "private" (behind NAT: relays)
    relay_service: bool = True  # relay for peers behind NAT when this node is public
    relay_policy: relay.RelayPolicy = field(default_factory=relay.RelayPolicy)  # what that relay gives whom


@dataclass(slots=True)
class Reach:
    """How this node can be reached: "public" (its own addresses), "private" (behind NAT: through
    the relays it holds reservations on), "unknown" (nobody could tell: acts as public)."""

    status: str = "unknown"
    relays: dict[str, float] = field(default_factory=dict)  # relay's full address -> reservation expiry

    def addrs(self, host: Any) -> list[str]:
        """What to advertise. A private node never advertises its own addresses (nobody outside
        its LAN can dial them): only circuits through its relays, none while it holds none."""
        if self.status != "private":
            return full_addrs(host)
        me = host.get_id().to_base58()
        return [f"{r}{relay.CIRCUIT}/p2p/{me}" for r in self.relays]


async def _reachability(host: Any, opts: NodeOptions) -> str:
    """``--reachability``, or with "auto" what bootstrap peers see when they dial us back."""
    if opts.reachability != "auto":
        return opts.reachability
    if not opts.bootstrap:
        return "unknown"
    peers: list[Any] = []

    async def one(addr: str) -> None:
        from libp2p.peer.id import ID

        with trio.move_on_after(relay.DIALBACK_S):
            try:
                peers.append(ID.from_base58(await connect(host, addr)))
            except DialError as exc:
                log.debug("reachability: %s", exc)

    async with trio.open_nursery() as n:
        for addr in opts.bootstrap[:relay.DIALBACK_PEERS]:
            n.start_soon(one, addr)
    return await relay.probe_reachability(host, peers)


def _relay_candidates(node: SwarmNode, bootstrap: list[str]) -> list[str]:
    """Relays to try: the bootstrap peers, then peers this node knows that run the relay service
    (their identify says so)."""
    from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP

    out = [a for a in bootstrap if not relay.is_relayed(a)]
    store = node.host.get_peerstore()
    for pid in node.dht.routing_table.get_peer_ids():
        try:
            if HOP not in store.get_protocols(pid):
                continue
            tcp = [str(a) for a in store.addrs(pid) if "/tcp/" in str(a) and not relay.is_relayed(str(a))]
        except Exception:  # noqa: BLE001 (a peer the peerstore forgot: not a candidate)
            continue
        if tcp:
            out.append(relay_address(tcp[0], pid.to_base58()))
    return one_per_relay(out)


def relay_address(addr: str, peer_id: str) -> str:
    """``addr`` as a full address of ``peer_id``, whether or not it already ends in its id (the
    peerstore has both: naming the relay twice made an advertised circuit address undialable)."""
    return f"{addr.split('/p2p/')[0]}/p2p/{peer_id}"


def one_per_relay(addrs: list[str]) -> list[str]:
    """The first address of each relay: two spellings of one relay are one relay, not two."""
    seen: dict[str, str] = {}
    for a in addrs:
        seen.setdefault(a.rsplit("/p2p/", 1)[-1], a)
    return list(seen.values())


async def keep_reservations(node: SwarmNode, bootstrap: list[str],
                            make_advert: Callable[[SwarmNode, bool], records.Advert] | None,
                            task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Hold reservations on ``relay.RELAYS_WANTED`` relays: a relay whose connection is gone is
    replaced, one close to expiry renewed, and the advert re-published at once when the set
    changes (requesters dial what the advert says). Reports started after the first round, so
    the first advert already carries relayed addresses."""
    import time

    reach: Reach = node.reach
    started = False
    while True:
        network = node.host.get_network()
        changed = False
        for addr, expires in list(reach.relays.items()):
            rid = _peer_of(addr)
            if rid is None or not network.connections.get(rid) or expires - time.time() < relay.RESERVATION_RENEW_S:
                del reach.relays[addr]
                changed = True
        for addr in _relay_candidates(node, bootstrap):
            if len(reach.relays) >= relay.RELAYS_WANTED:
                break
            if addr in reach.relays:
                continue
            try:
                reach.relays[addr] = await relay.reserve(node.host, addr)
                changed = True
                log.info("reserved a slot on relay %s", addr)
            except relay.RelayError as exc:
                log.debug("%s", exc)
        if not reach.relays and not started:
            log.warning("behind NAT and no relay took a reservation: requesters cannot reach this node")
        if changed and started and make_advert is not None:
            await node._publish_logged(make_advert(node, False), provide=False)
        if not started:
            started = True
            task_status.started()
        await trio.sleep(relay.RELAY_CHECK_S)


def _peer_of(addr: str) -> Any:
    from libp2p.peer.id import ID

    try:
        return ID.from_base58(addr.rsplit("/p2p/", 1)[1])
    except (IndexError, ValueError):
        return None


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
            host.set_stream_handler(relay.DIALBACK, relay.handle_dialback)
            reach = Reach(await _reachability(host, opts))
            if reach.status == "private":
                log.warning("this node is not reachable from the internet (behind NAT); serving through relays")
            public = reach.status != "private"
            async with (relay.circuit_relay(host, hop=public and opts.relay_service,
                                            policy=opts.relay_policy) as relay_service, relay.hole_punching(host),
                        swarm_node(host, identity, server=public, fault=opts.dht_fault) as node):
                relay_service.served = node.holds_advert  # the share of reservations kept for serving peers
                node.reach = reach
                if opts.on_timing is not None:
                    node.on_timing = opts.on_timing
                if opts.bootstrap:
                    joined = await node.join(opts.bootstrap)
                    if not joined:
                        log.warning("no bootstrap peer answered; waiting for peers to find us")
                async with trio.open_nursery() as nursery:
                    if not public:
                        await nursery.start(keep_reservations, node, opts.bootstrap, make_advert)
                    if make_advert is not None:
                        await nursery.start(node.announce_forever, lambda: make_advert(node, False),
                                            opts.announce_interval)
                    info = {"peer_id": identity.peer_id, "addrs": reach.addrs(host), "reachability": reach.status}
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
