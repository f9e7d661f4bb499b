"""py-libp2p's Kademlia server, hardened: what a DHT server accepts, keeps and answers.

``dht.node.swarm_node`` installs these on each node. Each replaces a py-libp2p 0.8.1 behaviour
that let one peer silence or poison a node (docs/architecture.md, "py-libp2p 0.8.1
workarounds"): inbound streams budgeted per peer, routing tables holding only peers that serve
the DHT, provider records kept by the hundred with an expiry, adverts served only while valid.
"""

from __future__ import annotations

import contextvars
import logging
import time
from typing import Any

import trio

from ..identity import Identity
from . import records
from .records import PROVIDE_INTERVAL_S, RecordError
from .walk import K

log = logging.getLogger("gputorrent.dht")

PROVIDERS_PER_KEY = 200  # provider records a DHT server keeps per key
PROVIDER_TTL_S = 3 * PROVIDE_INTERVAL_S  # a provider that missed three renewals is gone
INBOUND_PER_PEER = 8  # DHT streams one peer may hold open on us at once
IDENTIFY_S = 2.0  # identifying a peer that sent us a DHT request, before adding it to the table
REIDENTIFY_S = 300.0  # a DHT client is identified again at most this often
INBOUND_TOTAL = 64  # DHT streams open on us at once, all peers together
INBOUND_STREAM_S = 10.0  # one inbound DHT stream's whole life: requests are one round trip


def _guard_inbound(host: Any, dht: Any, *, silent: bool = False) -> None:
    """Replace py-libp2p's inbound Kademlia handler with one that budgets per peer.

    py-libp2p serves at most 12 inbound DHT streams at once, for everyone together, resets
    the rest, and never times out a stream that sends nothing: 12 idle streams from one peer
    made a node refuse every lookup for as long as they were held. Here one peer may hold at
    most ``INBOUND_PER_PEER`` streams, all together ``INBOUND_TOTAL``, and each stream lives at
    most ``INBOUND_STREAM_S`` (every request we send is one round trip on its own stream).
    """
    from libp2p.kad_dht.kad_dht import PROTOCOL_ID

    per_peer: dict[Any, int] = {}
    total = trio.CapacityLimiter(INBOUND_TOTAL)
    dht.gt_inbound = per_peer  # streams held per peer, for tests and status
    identified: dict[Any, float] = {}  # peer -> when we last identified it (_identified_as_server)
    _table_only_servers(host, dht)

    async def never_answer(stream: Any) -> None:  # fault injection: a node that hangs every lookup
        try:
            await stream.read(65536)
        except Exception:  # noqa: BLE001 (the stream ended, however)
            return
        await trio.sleep_forever()

    async def handle(stream: Any) -> None:
        peer = stream.muxed_conn.peer_id
        if per_peer.get(peer, 0) >= INBOUND_PER_PEER or total.borrowed_tokens >= total.total_tokens:
            await _reset_quietly(stream)
            return
        per_peer[peer] = per_peer.get(peer, 0) + 1
        try:
            async with total:
                with trio.move_on_after(INBOUND_STREAM_S) as timer:
                    token = _inbound.set(True)
                    try:
                        await dht._do_handle_stream(stream)
                    finally:
                        _inbound.reset(token)
                if timer.cancelled_caught:
                    await _reset_quietly(stream)
            if not dht.routing_table.peer_in_table(peer) and await _identified_as_server(host, peer, identified):
                await dht.add_peer(peer, skip_server_mode_check=True)
        finally:
            per_peer[peer] -= 1
            if not per_peer[peer]:
                del per_peer[peer]

    host.set_stream_handler(PROTOCOL_ID, never_answer if silent else handle)


_inbound: contextvars.ContextVar[bool] = contextvars.ContextVar("gt_dht_inbound", default=False)


def _speaks_kad(host: Any, peer: Any) -> bool:
    """Whether identify says ``peer`` serves the DHT (a server; clients do not offer it)."""
    from libp2p.kad_dht.kad_dht import PROTOCOL_ID

    try:
        return str(PROTOCOL_ID) in (host.get_peerstore().get_protocols(peer) or ())
    except Exception:  # noqa: BLE001 (py-libp2p raises for a peer it has no record of)
        return False


async def _identified_as_server(host: Any, peer: Any, asked: dict[Any, float]) -> bool:
    """``_speaks_kad``, after identifying ``peer`` again when what we know does not say so (at
    most once per ``REIDENTIFY_S``; ``asked`` holds when). What identify said can be stale: a
    serving peer connects to its bootstrap peers (reachability probes) before its DHT runs, so
    they knew it without the protocol and never added it to their tables."""
    if _speaks_kad(host, peer):
        return True
    now = trio.current_time()
    if now - asked.get(peer, -REIDENTIFY_S) < REIDENTIFY_S:
        return False
    asked[peer] = now
    if len(asked) > 4 * INBOUND_TOTAL:  # forget the oldest: this is a rate limit, not a record
        for old in sorted(asked, key=asked.__getitem__)[: len(asked) // 2]:
            del asked[old]
    with trio.move_on_after(IDENTIFY_S):
        try:
            await host._identify_peer(peer, reason="gputorrent-dht-inbound")
        except Exception as exc:  # noqa: BLE001 (a peer that cannot be identified is not added)
            log.debug("identify of %s failed: %s", peer, exc)
    return _speaks_kad(host, peer)


def _table_only_servers(host: Any, dht: Any) -> None:
    """Keep DHT clients out of the routing table.

    py-libp2p adds every peer that sends it a DHT request ("they MUST support KAD server mode"),
    but requesters (``ask``, ``peers``, the gateway) run the DHT as clients and come and go: each
    one that asked stayed in the tables of the peers it asked, dead once it left, so walks and
    crawls spent requests and advert fetches on a growing list of gone askers. A sender is added
    here once identify shows it serves the protocol (the inbound handler checks after each
    stream, when identify has had the time to run)."""
    original = dht.add_peer

    async def add_peer(peer: Any, *, skip_server_mode_check: bool = False) -> bool:
        if _inbound.get() and not _speaks_kad(host, getattr(peer, "peer_id", peer)):
            return False
        return await original(peer, skip_server_mode_check=skip_server_mode_check)

    dht.add_peer = add_peer


def _guard_providers(dht: Any) -> None:
    """Replace py-libp2p's provider bookkeeping on a DHT server.

    py-libp2p keeps the first 20 providers of a key and refuses the rest, for 48 h: 20 sybil
    ADD_PROVIDERs for a model's key, sent first, left a new honest provider stored nowhere, and
    a dead peer stayed listed for two days. Here a key keeps up to ``PROVIDERS_PER_KEY``
    records (a random one makes room when full), each for ``PROVIDER_TTL_S`` after its last
    renewal, and GET_PROVIDERS answers with a random sample of ``K``: to crowd out an honest
    provider an attacker must now outnumber it ten to one at every node, and keep doing so.
    """
    import random as _random

    from libp2p.kad_dht.provider_store import ProviderRecord
    from libp2p.peer.peerinfo import PeerInfo

    store = dht.provider_store
    rng = _random.Random()

    def add_provider(key: bytes, provider: Any) -> None:
        if not provider or not provider.peer_id:
            return
        records_ = store.providers.setdefault(key, {})
        pid = str(provider.peer_id)
        if pid not in records_ and len(records_) >= PROVIDERS_PER_KEY:
            del records_[rng.choice(list(records_))]
        records_[pid] = ProviderRecord(provider_info=provider, timestamp=time.time())

    def get_providers(key: bytes) -> list[Any]:
        records_ = store.providers.get(key)
        if not records_:
            return []
        now = time.time()
        for pid in [p for p, r in records_.items() if now - r.timestamp > PROVIDER_TTL_S]:
            del records_[pid]
        if not records_:
            del store.providers[key]
            return []
        live = list(records_.values())
        chosen = live if len(live) <= K else rng.sample(live, K)
        return [PeerInfo(r.peer_id, r.addresses) for r in chosen]

    store.add_provider = add_provider
    store.get_providers = get_providers


def _guard_values(dht: Any) -> None:
    """Serve an advert only while it is valid. py-libp2p keeps a stored value for its own time
    to live (hours), whatever the record says, so a node that missed a peer's renewals (it
    joined after the peer's last walk) went on answering with that peer's expired advert:
    requesters threw it away, but paid a round trip and an answer slot for dead data."""
    store = dht.value_store
    original = store.get
    prefix = f"/{records.NAMESPACE}/".encode()

    def get(key: bytes) -> Any:
        rec = original(key)
        if rec is not None and key.startswith(prefix):
            try:
                records.open_advert(key.decode(), rec.value)
            except (RecordError, UnicodeDecodeError):
                store.remove(key)
                return None
        return rec

    store.get = get


def _fake_providers(dht: Any, n: int = 2000) -> None:
    """Fault injection: every GET_PROVIDERS answer from this node also names ``n`` made-up
    providers (ids of keys nobody holds, at a closed port)."""
    import multiaddr
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import PeerInfo

    fakes = [PeerInfo(ID.from_base58(Identity.generate().peer_id), [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/9")])
             for _ in range(n)]
    real = dht.provider_store.get_providers
    dht.provider_store.get_providers = lambda key: fakes + real(key)


async def _reset_quietly(stream: Any) -> None:
    from ..net.host import finish_stream

    await finish_stream(stream, reset=True)
