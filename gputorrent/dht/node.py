"""Swarm membership over py-libp2p's Kademlia DHT: join, announce, look up.

Every network wait here has its own short deadline and keeps what it already has: one DHT
request waits ``QUERY_TIMEOUT_S`` (more when this node measures slower answers: walk.RoundTrips),
one lookup ``LOOKUP_TIMEOUT_S``, one store ``STORE_TIMEOUT_S``.
py-libp2p's own lookups wait up to 10 s for each peer and throw away what they had received
when cut short, so one hung peer (a laptop gone to sleep) hid the whole swarm: every lookup,
put and provide here is our own walk (``_walk``) over py-libp2p's single-peer requests.

Workarounds for py-libp2p 0.8.1, each tested in tests/test_dht_workarounds.py:
- ``find_providers`` answers from the local store alone whenever it holds any record for the
  key (a serving peer would find only itself; a watcher only what it saw first), and otherwise
  walks the whole swarm when a key has fewer providers than it asked for. Ours is a Kademlia
  walk on GET_PROVIDERS (``ALPHA`` in flight, done when the ``K`` closest known have answered),
  merged with local records and deduplicated by peer id.
- ``get_value`` likewise returns a local copy without asking the network; advert lookups go to
  the network and keep the local copy only if nothing newer is found.
- Inbound DHT streams: py-libp2p serves 12 at once for everyone and never times one out, so
  12 idle streams silenced a node; ours budget per peer and bound each stream's life. It also
  adds every sender to the routing table, DHT clients included (askers that come and go);
  ours add only peers that identify shows serving the protocol.
- Provider records: py-libp2p keeps the first 20 per key for 48 h (sybils sent first keep an
  honest provider out; the dead linger two days); ours keep 200, expire after 30 min without
  renewal, and answer with a random sample of 20.
- Adverts live under hashed keys (FIND_NODE rejects plain keys over 50 bytes) in a namespace
  whose validator checks signature, owner, expiry and sequence on local and remote puts.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from .. import trace
from ..identity import Identity
from ..tasks import gather
from . import records
from .guards import (
    _fake_providers,
    _guard_inbound,
    _guard_providers,
    _guard_values,
)
from .records import PROVIDE_INTERVAL_S, Advert, RecordError
from .walk import K, RoundTrips, Walked, walk

log = logging.getLogger("gputorrent.dht")

QUERY_TIMEOUT_S = 1.0  # one peer's answer to one request, at least (loopback: ~5 ms; a continent: ~300 ms)
QUERY_TIMEOUT_MAX_S = 5.0  # at most, however slow the measured round trips (walk.RoundTrips)
SLOW_QUERY_TIMEOUT_S = 3.0  # the same, once more, when no peer at all answered within the first
DIAL_TIMEOUT_S = 5.0  # a request that must connect first: dial, Noise, yamux, then the request
LATE_FACTOR = 2.0  # a request past its deadline frees its place in the walk, and is waited for this many times as long
LOOKUP_TIMEOUT_S = 4.0  # one whole walk; what it found by then is kept
STORE_TIMEOUT_S = 2.0  # one PUT_VALUE or ADD_PROVIDER to one peer
FETCH_TIMEOUT_S = 6.0  # fetching all the adverts of one lookup
FETCH_CONCURRENCY = 16
MAX_PROVIDERS = 64  # provider ids kept per lookup: one node answering thousands costs nothing
ENOUGH_ADVERTS = 3  # an advert lookup ends once this many peers returned a valid copy
OUTBOUND_PER_PEER = 4  # our DHT requests open at one peer at once: within its INBOUND_PER_PEER, with room to spare
# Adverts are renewed every announce interval, so 10 fresh copies outlive churn between
# renewals (a reader stops at 3); renewals store where the last walk found the closest peers
# and walk again only every REWALK_S (simulated at 10,000 peers: docs/benchmarks.md).
ADVERT_REPLICAS = 10
REWALK_S = 600.0
SUSPECT_S = 30.0  # a peer that let requests time out (STRIKES in a row) is left out of walks this long
ADDR_TTL_S = 600  # how long a peer's address stays in the peerstore
STRIKES = 2


@functools.cache
def _validator():
    from libp2p.records.validator import Validator

    class AdvertValidator(Validator):
        """Runs on every put, local or remote, and on every value a lookup returns."""

        def validate(self, key: str, value: bytes) -> None:
            records.open_advert(key, value)

        def select(self, key: str, values: list[bytes]) -> int:
            return records.best_index(key, values)

    return AdvertValidator()


class SwarmNode:
    """One node's view of the swarm: a DHT (server or client mode) on a running host."""

    def __init__(self, host: Any, identity: Identity, dht: Any, *, server: bool = True) -> None:
        self.host = host
        self.identity = identity
        self.dht = dht
        self.server = server
        self._suspect: dict[Any, float] = {}  # peer -> trio time until which walks skip it
        # How far this node's network reaches ("public", "private", "loopback": net.host.scope_of
        # of the addresses it joined through). A requester that joined through a public address
        # never dials another network's private address: behind a home router its SYNs vanish
        # and the dial waits out its 5 s timeout (a home-to-home ask lost 10 s, twice 5, that way).
        self.scope = "loopback"
        self._strikes: dict[Any, int] = {}  # peer -> requests it let time out since it last answered
        self._closest: dict[bytes, tuple[float, list[Any]]] = {}  # key -> (when walked, closest peers)
        self.last_walk: Walked | None = None  # what the latest walk did (benchmarks read its hops)
        self.on_timing: Callable[[str, float], None] = lambda what, seconds: None  # "announce"/"lookup" (metrics)
        self.reach: Any = None  # serving.node.Reach of a listening node: what its adverts may say
        self.round_trips = RoundTrips(QUERY_TIMEOUT_S, QUERY_TIMEOUT_MAX_S)  # request deadlines follow them
        self._to_peer: dict[Any, trio.Semaphore] = {}  # our requests open at each peer (OUTBOUND_PER_PEER)

    def _known_addrs(self, peer: Any) -> list[Any]:
        """The addresses of ``peer`` this node would dial: what it heard, within its scope."""
        from ..net.host import reachable_from

        try:
            heard = list(self.host.get_peerstore().addrs(peer))
        except Exception:  # noqa: BLE001 (py-libp2p raises for a peer it never heard of)
            return []
        return [a for a in heard if reachable_from(str(a), self.scope)]

    def _dial_only(self, peer: Any, addrs: list[Any]) -> None:
        """Leave only ``addrs`` in the peerstore for ``peer``: py-libp2p dials every address it
        holds, one after another, each until its 5 s timeout."""
        store = self.host.get_peerstore()
        try:
            store.clear_addrs(peer)
            store.add_addrs(peer, addrs, ADDR_TTL_S)
        except Exception as exc:  # noqa: BLE001 (a peerstore that refuses: the dial just has more to try)
            log.debug("could not narrow the addresses of %s: %s", peer, exc)

    def _is_suspect(self, peer: Any) -> bool:
        until = self._suspect.get(peer)
        if until is None:
            return False
        if trio.current_time() >= until:
            del self._suspect[peer]
            return False
        return True

    @asynccontextmanager
    async def _request_slot(self, peer: Any) -> AsyncIterator[None]:
        """Hold one of our ``OUTBOUND_PER_PEER`` places at ``peer`` for one request. A DHT server
        serves ``INBOUND_PER_PEER`` streams per peer and resets the rest, and py-libp2p turns a
        reset into an empty answer: fetching a lookup's adverts (16 at once, each asking 5 peers)
        sent one peer 14 requests at once, and half came back "no copy" in 60 ms."""
        slot = self._to_peer.get(peer)
        if slot is None:
            slot = self._to_peer[peer] = trio.Semaphore(OUTBOUND_PER_PEER)
        async with slot:
            yield
        if slot.value == OUTBOUND_PER_PEER and self._to_peer.get(peer) is slot:
            del self._to_peer[peer]

    def _late_for(self, query_timeout: float, peer: Any) -> float:
        """How long a request to ``peer`` is waited for in all: past its deadline, and longer when
        the request must dial first. On a loaded machine a fresh requester's first connections
        took 2-3 s to set up, and its first walk marked every peer of the swarm suspect."""
        try:
            connected = bool(self.host.get_network().get_connections(peer))
        except Exception:  # noqa: BLE001 (py-libp2p raises for a peer it has no record of)
            connected = False
        return _late(query_timeout) if connected else max(_late(query_timeout), DIAL_TIMEOUT_S)

    async def _ask(self, peer: Any, request: Callable[[Any], Awaitable[Any]]) -> Any:
        async with self._request_slot(peer):
            return await request(peer)

    def _strike(self, peer: Any) -> None:
        """A request to ``peer`` timed out; the second in a row, with no answer between, makes
        it a suspect for ``SUSPECT_S``. One strike is not enough: a fresh requester on a loaded
        machine waited 2-3 s for its first answers (new connections), and its first walk made
        every peer of the swarm a suspect, left out of walks for 30 s."""
        self._strikes[peer] = self._strikes.get(peer, 0) + 1
        if self._strikes[peer] >= STRIKES:
            self._suspect[peer] = trio.current_time() + SUSPECT_S
            del self._strikes[peer]
        if len(self._strikes) > 4 * K * K:  # a rate limit, not a record: forget the oldest half
            for old in list(self._strikes)[: len(self._strikes) // 2]:
                del self._strikes[old]

    # --- joining ---------------------------------------------------------------------------

    async def join(self, bootstrap: Sequence[str]) -> int:
        """Dial bootstrap peers and add them to the routing table; returns how many answered."""
        from ..net.host import DialError, connect

        joined = 0

        async def one(addr: str) -> None:
            nonlocal joined
            try:
                with trio.fail_after(LOOKUP_TIMEOUT_S):
                    peer_id = await connect(self.host, addr)
                    await self._add(peer_id)
                joined += 1
            except (DialError, trio.TooSlowError) as exc:
                log.warning("bootstrap peer %s did not answer: %s", addr, exc)

        async with trio.open_nursery() as n:
            for addr in bootstrap:
                n.start_soon(one, addr)
        if joined and self.server and self.dht.get_routing_table_size() < 20:
            # Learn our neighbourhood: a lookup of our own id fills the routing table.
            for peer in await self.closest_peers(self.host.get_id().to_bytes()):
                await self.dht.add_peer(peer, skip_server_mode_check=True)
        return joined

    async def _add(self, peer_id_b58: str) -> None:
        from libp2p.peer.id import ID

        await self.dht.add_peer(ID.from_base58(peer_id_b58), skip_server_mode_check=True)

    async def adopt_known_peers(self) -> None:
        """Add peers found by mDNS (they land in the peerstore) to the routing table."""
        me = self.host.get_id()
        for pid in list(self.host.get_peerstore().peers_with_addrs()):
            if pid != me and not self.dht.routing_table.peer_in_table(pid):
                with trio.move_on_after(2):
                    try:
                        await self.host.connect(self.host.get_peerstore().peer_info(pid))
                        await self.dht.add_peer(pid)
                    except Exception:  # noqa: BLE001, S110 (a known peer that cannot be dialled now is simply not adopted)
                        pass

    # --- announcing ------------------------------------------------------------------------

    async def publish(self, advert: Advert, *, provide: bool = True) -> bool:
        """Store our signed advert and (with ``provide``) provide each served model and the
        swarm key; returns whether every provider record reached at least one other peer."""
        key = records.advert_key(advert.peer_id)
        value = records.sign_advert(self.identity, advert)
        if advert.leaving:
            await self._say_goodbye(key, value)
            return False
        keys = [records.provider_key("swarm", "all")]
        for m in advert.models if provide else ():
            keys += records.model_keys(m)
        stored: list[int] = []

        async def provide_one(pkey: str) -> None:
            stored.append(await self.provide(pkey))

        async with trio.open_nursery() as n:
            n.start_soon(self.put_value, key, value)
            for pkey in keys if provide else ():
                n.start_soon(provide_one, pkey)
        return provide and len(stored) == len(keys) and all(stored)

    async def put_value(self, key: str, value: bytes) -> int:
        """Store a signed value here and at the closest peers that answer; returns how many did.
        (py-libp2p's ``put_value`` waits 10 s on each hung peer of its lookup.)"""
        key_bytes = key.encode()
        _validator().validate(key, value)
        self.dht.value_store.put(key_bytes, value)
        # py-libp2p's maintenance loop (every 600 s) republishes every value and provider key
        # it has no republish time for: all of them, all at once. Our announce loop renews on
        # its own schedule, so mark them as just done.
        self.dht.value_store._last_republish[key_bytes] = time.time()
        return await self._store_near(key_bytes, ADVERT_REPLICAS,
                                      lambda peer: self.dht.value_store._store_at_peer(peer, key_bytes, value))

    async def provide(self, key: str) -> int:
        """Provide ``key`` (a hex multihash) here and at the closest peers that answer."""
        from libp2p.peer.peerinfo import PeerInfo

        store = self.dht.provider_store
        key_bytes = bytes.fromhex(key)
        store.providing_keys.add(key_bytes)
        store.add_provider(key_bytes, PeerInfo(self.host.get_id(), list(self.host.get_addrs())))
        store._last_republish[key_bytes] = time.time()
        return await self._store_near(key_bytes, K, lambda peer: store._send_add_provider(peer, key_bytes))

    async def _store_near(self, key_bytes: bytes, replicas: int, store_one: Callable[[Any], Any]) -> int:
        """Store at the ``replicas`` closest peers. Renewals reuse the peers the last walk found
        for the key (with closer ones our routing table has learned since), for ``REWALK_S``,
        while at least half of them still take the record: the
        walk was most of an announce's traffic (benchmarks/simulate.py: at 10,000 peers a walk
        per put made adverts alone ~4 KB/s per peer)."""
        cached = self._closest.get(key_bytes)
        if cached is not None and trio.current_time() - cached[0] < REWALK_S:
            # Follow the closest set as it changes: peers that joined near the key since the
            # walk (they are in our table once they spoke to us) take the place of farther ones,
            # or a node that joined after the walk held no copy, or an old one, for 10 minutes.
            from libp2p.kad_dht.utils import sort_peer_ids_by_distance

            me = self.host.get_id()
            near = [p for p in self.dht.routing_table.find_local_closest_peers(key_bytes, replicas) if p != me]
            targets = sort_peer_ids_by_distance(key_bytes, list(dict.fromkeys([*cached[1], *near])))[:replicas]
            stored = await self._store_at(targets, store_one)
            if 2 * stored >= len(targets):
                self._closest[key_bytes] = (cached[0], targets)
                return stored
        peers = (await self.closest_peers(key_bytes))[:replicas]
        self._closest[key_bytes] = (trio.current_time(), peers)
        return await self._store_at(peers, store_one)

    async def _store_at(self, peers: Sequence[Any], store_one: Callable[[Any], Any]) -> int:
        stored = 0

        async def one(peer: Any) -> None:
            nonlocal stored
            with trio.move_on_after(STORE_TIMEOUT_S):
                try:
                    stored += bool(await self._ask(peer, store_one))
                except Exception as exc:  # noqa: BLE001 (py-libp2p raises any type for a failed store; one peer failing must not stop the rest)
                    log.debug("store at %s failed: %s", peer, exc)

        async with trio.open_nursery() as n:
            for peer in peers:
                n.start_soon(one, peer)
        return stored

    async def _say_goodbye(self, key: str, value: bytes) -> None:
        """A leaving advert must land while the process is stopping: store it at once at the
        closest peers we already know (no lookup first), alongside the usual put."""
        key_bytes = key.encode()
        known = self.dht.routing_table.find_local_closest_peers(key_bytes, K)

        async def store_at(peer: Any) -> None:
            with trio.move_on_after(STORE_TIMEOUT_S):
                try:
                    await self._ask(peer, lambda p: self.dht.value_store._store_at_peer(p, key_bytes, value))
                except Exception as exc:  # noqa: BLE001 (best effort on the way out)
                    log.debug("goodbye to %s failed: %s", peer, exc)

        async with trio.open_nursery() as n:
            n.start_soon(self.put_value, key, value)
            for peer in known:
                n.start_soon(store_at, peer)

    async def announce_forever(self, make_advert: Callable[[], Advert], interval: float,
                               task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Publish now (then report started), and again every ``interval`` seconds.

        The advert (liveness, load) goes out every interval; provider records are renewed every
        ``PROVIDE_INTERVAL_S`` (which also keeps us under py-libp2p's limit of 10 ADD_PROVIDER
        messages per peer per 10 s with short test intervals), and at the next interval when the
        last provide did not reach anyone or was cut off: counting a cut-off provide as done
        left a peer's records nowhere but at itself for ten minutes, found only by walks that
        happened to ask it.
        """
        provided = trio.current_time() if await self._publish_logged(make_advert(), provide=True) else None
        task_status.started()
        while True:
            await trio.sleep(interval)
            await self.adopt_known_peers()
            renew = provided is None or trio.current_time() - provided >= PROVIDE_INTERVAL_S
            done = await self._publish_logged(make_advert(), provide=renew)
            if renew:
                provided = trio.current_time() if done else None

    async def _publish_logged(self, advert: Advert, *, provide: bool) -> bool:
        """``publish`` within its deadline; whether every provider record reached a peer."""
        t = trio.current_time()
        provided = False
        try:
            with trio.move_on_after(LOOKUP_TIMEOUT_S * 2):
                provided = await self.publish(advert, provide=provide)
        except Exception as exc:  # noqa: BLE001 (an unreachable neighbour must not stop the announcer)
            log.warning("announce failed: %s", exc)
        self.on_timing("announce", trio.current_time() - t)
        return provided

    # --- looking up ------------------------------------------------------------------------

    async def _walk(self, key_bytes: bytes, query: Callable[[Any], Any],
                    enough: Callable[[], bool] = lambda: False) -> Walked:
        """``_walk_once``; when nobody at all answered in time (a loaded machine, not a hung
        peer: one of those still leaves the others), once more, with a longer deadline."""
        t = trio.current_time()
        timed_out: list[Any] = []
        first = self.round_trips.timeout
        walked = await self._walk_once(key_bytes, query, enough, first, timed_out)
        if not walked.responded and timed_out:
            for peer in timed_out:
                self._suspect.pop(peer, None)
            walked = await self._walk_once(key_bytes, query, enough, max(first, SLOW_QUERY_TIMEOUT_S), [])
        self.on_timing("lookup", trio.current_time() - t)
        return walked

    async def _walk_once(self, key_bytes: bytes, query: Callable[[Any], Any], enough: Callable[[], bool],
                         query_timeout: float, timed_out: list[Any]) -> Walked:
        """One walk (``dht/walk.py``) from this node's routing table; returns the closest peers
        that answered, closest first. A peer silent until its requests' late deadline twice in a
        row (asleep, hung) is left out of walks for ``SUSPECT_S``."""
        from libp2p.kad_dht.utils import sort_peer_ids_by_distance

        me = self.host.get_id()
        known = [p for p in self.dht.routing_table.find_local_closest_peers(key_bytes, K) if p != me]
        if not known:
            known = [p for p in self.host.get_connected_peers() if p != me]
        by_distance = functools.partial(sort_peer_ids_by_distance, key_bytes)
        walked = await walk(known, functools.partial(self._ask, request=query), by_distance, me=me,
                            enough=enough, is_suspect=self._is_suspect, query_timeout=query_timeout,
                            late_timeout=functools.partial(self._late_for, query_timeout),
                            lookup_timeout=LOOKUP_TIMEOUT_S * query_timeout / QUERY_TIMEOUT_S,
                            on_answer=self.round_trips.add)
        for peer in walked.timed_out:
            self._strike(peer)
        for peer in walked.responded:
            self._strikes.pop(peer, None)
        timed_out.extend(walked.timed_out)
        self.last_walk = walked
        return walked

    async def closest_peers(self, key_bytes: bytes) -> list[Any]:
        """The ``K`` peers closest to a key that answered (FIND_NODE walk)."""
        return (await self._walk_to(key_bytes)).responded

    async def _walk_to(self, key_bytes: bytes) -> Walked:
        return await self._walk(key_bytes, self._find_node(key_bytes))

    def _find_node(self, key_bytes: bytes) -> Callable[[Any], Awaitable[Any]]:
        return lambda peer: self.dht.peer_routing._query_peer_for_closest(peer, key_bytes)

    async def find_providers(self, key: str) -> list[str]:
        """Peer ids (base58) providing ``key``, deduplicated, ours and local records included,
        at most ``MAX_PROVIDERS``.

        A walk on GET_PROVIDERS, done when the ``K`` closest peers known have answered (that
        is where ``provide`` stores records). py-libp2p's own ``find_providers`` answers from
        the local store alone whenever it holds anything, and otherwise walks until it has
        ``count`` providers, i.e. the whole swarm for a model with fewer providers than that.
        """
        store = self.dht.provider_store
        key_bytes = bytes.fromhex(key)
        found: list[str] = []

        async def query(peer: Any) -> list[Any]:
            providers, closer = await store._get_providers_from_peer_with_closers(peer, key_bytes)
            found.extend(p.peer_id.to_base58() for p in providers[:K])
            return closer

        with trace.span("providers walk", key=key[:8]):
            await self._walk(key_bytes, query)
        found += [p.peer_id.to_base58() for p in store.get_providers(key_bytes)]
        if key_bytes in store.providing_keys:
            found.append(self.identity.peer_id)
        named = {p: found.count(p) for p in dict.fromkeys(found)}  # real providers are named by many nodes
        return sorted(named, key=lambda p: -named[p])[:MAX_PROVIDERS]

    async def get_advert_value(self, peer_id: str) -> bytes | None:
        """The newest valid signed advert of ``peer_id``: asked of its owner when we know its
        address, else (or when it does not answer) of the peers closest to its key (a walk on
        GET_VALUE that ends once ``ENOUGH_ADVERTS`` of them returned a valid copy); the local
        copy counts too, and the highest sequence number wins."""
        key = records.advert_key(peer_id)
        key_bytes = key.encode()
        now = time.time()
        best: list[tuple[int, bytes]] = []
        copies = 0

        def consider(value: bytes | None) -> bool:
            if not value:
                return False
            try:
                seq = records.open_advert(key, value, now).seq
            except RecordError:
                return False
            if not best or seq > best[0][0]:
                best[:] = [(seq, value)]
            return True

        async def query(peer: Any) -> list[Any]:
            nonlocal copies
            value, closer = await self.dht.value_store._get_from_peer(peer, key_bytes, return_closer_peers=True)
            copies += consider(value)
            return closer

        owner = _id(peer_id)
        local = self.dht.value_store.store.get(key_bytes)
        consider(local[0].value if local else None)
        direct = [a for a in self._known_addrs(owner) if "/p2p-circuit" not in str(a)]
        if peer_id != self.identity.peer_id and direct and not self._is_suspect(owner):
            # The owner holds its own newest advert: one request instead of a walk. Fetching
            # the adverts of a lookup walked for each (5 requests at once, 16 adverts at once)
            # flooded a loaded machine's swarm, and answers slowed past every deadline. Only at
            # its own addresses within our scope: py-libp2p dials every address it holds for a
            # peer, and one behind NAT (only circuits in scope) is left to the replicas.
            self._dial_only(owner, direct)
            with trio.move_on_after(self._late_for(self.round_trips.timeout, owner)) as timer:
                try:
                    value = await self._ask(owner, lambda p: _get_value(self.host, p, key_bytes))
                except Exception as exc:  # noqa: BLE001 (any failure to answer: the replicas have copies)
                    log.debug("advert from its owner %s failed: %s", peer_id, exc)
                    self._suspect[owner] = trio.current_time() + SUSPECT_S  # not again for a while
                else:
                    # The owner answered: that is final. It stores its newest advert before sending
                    # copies anywhere, and a replica holds only what the owner signed; an owner with
                    # none is not serving (a made-up provider, or a peer that has not started yet).
                    # A walk per such provider cost a requester 0.5-7 s each (20 made up: 14 s).
                    consider(value)
                    return best[0][1] if value and best else None
            if timer.cancelled_caught:
                self._strike(owner)
        await self._walk(key_bytes, query, enough=lambda: copies >= ENOUGH_ADVERTS)
        return best[0][1] if best else None

    def holds_advert(self, peer_id: str) -> bool:
        """Whether this node stores a live, validly signed advert of ``peer_id`` that serves a
        model: local state only, no network wait (the relay asks it per reservation)."""
        key = records.advert_key(peer_id)
        local = self.dht.value_store.store.get(key.encode())
        if not local:
            return False
        try:
            advert = records.open_advert(key, local[0].value, time.time())
        except RecordError:
            return False
        return advert.live() and bool(advert.models)

    async def get_advert(self, peer_id: str) -> Advert | None:
        value = await self.get_advert_value(peer_id)
        return records.open_advert(records.advert_key(peer_id), value) if value else None

    async def get_adverts(self, peer_ids: Sequence[str]) -> list[Advert]:
        """The adverts of ``peer_ids`` found within ``FETCH_TIMEOUT_S`` (the rest are left out).

        Peers this host is connected to now go first: a live connection is evidence this node
        checked itself, where a provider record is only what someone claimed. 20 made-up
        providers named before an honest one held every fetch slot with walks for adverts that
        do not exist, and on a loaded machine the honest peer's turn came after the deadline.
        Those the first pass missed (their holders slow, on a loaded machine) are asked for
        once more, in the same order: a second chance costs nothing when all came.
        """
        connected = self._connected()
        order = sorted(dict.fromkeys(peer_ids), key=lambda p: p not in connected)
        with trace.span("adverts", n=len(order), connected=sum(p in connected for p in order)):
            found = await self._fetch_adverts(order)
        have = {a.peer_id for a in found}
        missing = [p for p in order if p not in have]
        if missing:
            found += await self._fetch_adverts(missing[: ENOUGH_ADVERTS * 4])
        return found

    def _connected(self) -> set[str]:
        try:
            return {str(p) for p in self.host.get_network().connections}
        except Exception:  # noqa: BLE001 (a host being closed: no order is as good as any)
            return set()

    async def _fetch_adverts(self, peer_ids: Sequence[str]) -> list[Advert]:
        out: list[Advert] = []
        limit = trio.Semaphore(FETCH_CONCURRENCY)

        async def one(pid: str) -> None:
            async with limit:
                try:
                    ad = await self.get_advert(pid)
                except RecordError:
                    ad = None
            if ad is not None:
                out.append(ad)

        with trio.move_on_after(FETCH_TIMEOUT_S * self.round_trips.timeout / QUERY_TIMEOUT_S):
            async with trio.open_nursery() as n:
                for pid in peer_ids:
                    n.start_soon(one, pid)
        return list(out)

    async def find_model(self, spec: str, *, shards: bool = False) -> list[Advert]:
        """Live adverts of peers serving ``spec`` (alias or model id) whole, or with ``shards``
        of peers holding blocks of it (records.model_keys: each kind has its own keys)."""
        ids = await self.find_providers(records.lookup_key(spec, shards=shards))
        now = time.time()
        return [a for a in await self.get_adverts(ids)
                if a.live(now) and (m := a.serves(spec)) is not None and m.whole != shards]

    async def crawl(self, rounds: int = 3) -> list[str]:
        """Peer ids reachable through the DHT: the routing table, then lookups of random keys
        (every peer they named, asked or not: the advert fetch that follows checks each)."""
        seen = {p.to_base58() for p in self.dht.routing_table.get_peer_ids()}
        with trace.span("crawl", rounds=rounds):
            found = await gather([functools.partial(self._walk_to, os.urandom(32)) for _ in range(rounds)])
        seen.update(p.to_base58() for walked in found for p in walked.seen)
        seen.discard(self.identity.peer_id)
        return sorted(seen)

    async def overview(self) -> list[Advert]:
        """Every live advert this node can find: providers of the swarm key plus a crawl."""
        providers, crawled = await gather([lambda: self.find_providers(records.provider_key("swarm", "all")),
                                            self.crawl])
        ids = providers + crawled
        now = time.time()
        return sorted((a for a in await self.get_adverts(ids) if a.live(now)), key=lambda a: a.peer_id)


async def _get_value(host: Any, peer: Any, key: bytes) -> bytes | None:
    """One GET_VALUE to ``peer``: its value for ``key``, or None when it has none. Unlike
    py-libp2p's ``_get_from_peer``, which returns None for any failure too, a peer that did
    not answer raises, so "it has none" can be told from "it could not say"."""
    import varint
    from libp2p.kad_dht.common import MAX_DHT_MESSAGE_SIZE
    from libp2p.kad_dht.kad_dht import PROTOCOL_ID
    from libp2p.kad_dht.pb.kademlia_pb2 import Message
    from libp2p.peer.peerstore import env_to_send_in_RPC
    from libp2p.utils.varint import read_varint_prefixed_bytes_limited

    stream = await host.new_stream(peer, [PROTOCOL_ID])
    try:
        request = Message(type=Message.MessageType.GET_VALUE, key=key)
        request.senderRecord = env_to_send_in_RPC(host)[0]
        body = request.SerializeToString()
        await stream.write(varint.encode(len(body)) + body)
        answer = Message()
        answer.ParseFromString(await read_varint_prefixed_bytes_limited(stream, MAX_DHT_MESSAGE_SIZE))
    finally:
        await stream.close()
    if answer.type != Message.MessageType.GET_VALUE:
        raise ValueError(f"a GET_VALUE answered with message type {answer.type}")
    return answer.record.value if answer.HasField("record") and answer.record.value else None


def _late(query_timeout: float) -> float:
    """How long a request past its deadline is still waited for (``walk``'s ``late_timeout``)."""
    return max(query_timeout, min(LATE_FACTOR * query_timeout, QUERY_TIMEOUT_MAX_S))


def _id(peer_id: str) -> Any:
    from libp2p.peer.id import ID

    return ID.from_base58(peer_id)


@asynccontextmanager
async def swarm_node(host: Any, identity: Identity, *, server: bool, fault: str = "") -> AsyncIterator[SwarmNode]:
    """Run a Kademlia DHT on ``host``: server mode stores records for others, client mode
    only asks (requesters, watchers)."""
    from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
    from libp2p.tools.anyio_service.context import background_trio_service

    dht = KadDHT(host, DHTMode.SERVER if server else DHTMode.CLIENT, enable_random_walk=False)
    dht.register_validator(records.NAMESPACE, _validator())
    _guard_providers(dht)
    _guard_values(dht)
    if fault == "fake-providers":
        _fake_providers(dht)
    if server:
        _guard_inbound(host, dht, silent=fault == "silent")
    async with background_trio_service(dht):
        yield SwarmNode(host, identity, dht, server=server)

