"""Swarm membership over py-libp2p's Kademlia DHT: join, announce, look up.

Workarounds for py-libp2p 0.8.1, each tested in tests/test_dht_workarounds.py:
- ``find_providers`` answers from the local store alone whenever it holds any record for the
  key (a serving peer would find only itself; a watcher only what it saw first), and otherwise
  walks the whole swarm when a key has fewer providers than it asked for. Ours is a Kademlia
  walk on GET_PROVIDERS (``ALPHA`` in flight, done when the ``K`` closest known have answered),
  merged with local records and deduplicated by peer id.
- ``get_value`` likewise returns a local copy without asking the network; advert lookups go to
  the network and keep the local copy only if nothing newer is found.
- Adverts live under hashed keys (FIND_NODE rejects plain keys over 50 bytes) in a namespace
  whose validator checks signature, owner, expiry and sequence on local and remote puts.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from ..identity import Identity
from . import records
from .records import Advert, RecordError

log = logging.getLogger("gputorrent.dht")

LOOKUP_TIMEOUT_S = 5.0
FETCH_CONCURRENCY = 16
K = 20  # Kademlia's k: records live on the k peers closest to their key
ALPHA = 5  # requests in flight per lookup (py-libp2p uses 3)
PROVIDE_INTERVAL_S = 600.0


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

    def __init__(self, host: Any, identity: Identity, dht: Any) -> None:
        self.host = host
        self.identity = identity
        self.dht = dht

    # --- joining ---------------------------------------------------------------------------

    async def join(self, bootstrap: Sequence[str]) -> int:
        """Dial bootstrap peers and add them to the routing table; returns how many answered."""
        from ..peer.host import DialError, connect

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
        if joined and self.dht.get_routing_table_size() < 20:
            # Learn our neighbourhood: a lookup of our own id fills the routing table.
            with trio.move_on_after(LOOKUP_TIMEOUT_S):
                await self.dht.peer_routing.find_closest_peers_network(self.host.get_id().to_bytes())
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
                    except Exception:
                        pass

    # --- announcing ------------------------------------------------------------------------

    async def publish(self, advert: Advert, *, provide: bool = True) -> None:
        """Store our signed advert and (with ``provide``) provide each served model and the
        swarm key."""
        key = records.advert_key(advert.peer_id)
        value = records.sign_advert(self.identity, advert)
        if advert.leaving:
            await self._say_goodbye(key, value)
            return
        await self.dht.put_value(key, value)
        # py-libp2p's maintenance loop (every 600 s) republishes every value and provider key
        # it has no republish time for, and put/provide never set one: all of them, all at
        # once. Our announce loop renews on its own schedule, so mark them as just done.
        now = time.time()
        self.dht.value_store._last_republish[key.encode()] = now
        if advert.leaving or not provide:
            return
        keys = [records.provider_key("swarm", "all")]
        for m in advert.models:
            keys += records.model_keys(m)
        async with trio.open_nursery() as n:
            for pkey in keys:
                n.start_soon(self.dht.provide, pkey)
                self.dht.provider_store._last_republish[bytes.fromhex(pkey)] = now

    async def _say_goodbye(self, key: str, value: bytes) -> None:
        """A leaving advert must land while the process is stopping: store it at once at the
        closest peers we already know (no lookup first), alongside the usual put."""
        key_bytes = key.encode()
        known = self.dht.routing_table.find_local_closest_peers(key_bytes, K)

        async def store_at(peer: Any) -> None:
            try:
                await self.dht.value_store._store_at_peer(peer, key_bytes, value)
            except Exception as exc:
                log.debug("goodbye to %s failed: %s", peer, exc)

        async with trio.open_nursery() as n:
            n.start_soon(self.dht.put_value, key, value)
            for peer in known:
                n.start_soon(store_at, peer)

    async def announce_forever(self, make_advert: Callable[[], Advert], interval: float,
                               task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Publish now (then report started), and again every ``interval`` seconds.

        The advert (liveness, load) goes out every interval; provider records live 48 h in
        py-libp2p, so they are renewed every ``PROVIDE_INTERVAL_S``, which also keeps us under
        its limit of 10 ADD_PROVIDER messages per peer per 10 s with short test intervals.
        """
        await self._publish_logged(make_advert(), provide=True)
        provided = trio.current_time()
        task_status.started()
        while True:
            await trio.sleep(interval)
            await self.adopt_known_peers()
            renew = trio.current_time() - provided >= PROVIDE_INTERVAL_S
            await self._publish_logged(make_advert(), provide=renew)
            provided = trio.current_time() if renew else provided

    async def _publish_logged(self, advert: Advert, *, provide: bool) -> None:
        try:
            with trio.move_on_after(LOOKUP_TIMEOUT_S * 2):
                await self.publish(advert, provide=provide)
        except Exception as exc:  # an unreachable neighbour must not stop the announcer
            log.warning("announce failed: %s", exc)

    # --- looking up ------------------------------------------------------------------------

    async def find_providers(self, key: str) -> list[str]:
        """Peer ids (base58) providing ``key``, deduplicated, ours and local records included.

        A Kademlia lookup on GET_PROVIDERS itself: keep ``ALPHA`` requests in flight to the
        closest peers not yet asked, learn closer peers from the answers, and stop when the
        ``K`` closest peers known have all answered (that is where ``provide`` stores records). py-libp2p's own
        ``find_providers`` answers from the local store alone whenever it holds anything, and
        otherwise walks until it has ``count`` providers, i.e. the whole swarm for a model with
        fewer providers than that.
        """
        from libp2p.kad_dht.utils import sort_peer_ids_by_distance

        store = self.dht.provider_store
        key_bytes = bytes.fromhex(key)
        me = self.host.get_id()
        found: list[str] = []
        known = [p for p in self.dht.routing_table.find_local_closest_peers(key_bytes, K) if p != me]
        if not known:
            known = [p for p in self.host.get_connected_peers() if p != me]
        asked: set[Any] = set()
        answered, answers = trio.open_memory_channel[None](math.inf)

        async def ask(peer: Any) -> None:
            try:
                with trio.move_on_after(LOOKUP_TIMEOUT_S / 2):
                    providers, closer = await store._get_providers_from_peer_with_closers(peer, key_bytes)
                    found.extend(p.peer_id.to_base58() for p in providers)
                    known.extend(c for c in closer if c != me and c not in known)
            except Exception as exc:
                log.debug("GET_PROVIDERS to %s failed: %s", peer, exc)
            finally:
                answered.send_nowait(None)

        # A sliding window, not rounds: the moment one answer arrives, the closest peer not
        # yet asked gets the next request, so one slow peer never holds up the others.
        with trio.move_on_after(LOOKUP_TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                in_flight = 0
                while True:
                    known = sort_peer_ids_by_distance(key_bytes, known)
                    for peer in [p for p in known[:K] if p not in asked][: ALPHA - in_flight]:
                        asked.add(peer)
                        in_flight += 1
                        nursery.start_soon(ask, peer)
                    if in_flight == 0:
                        break
                    await answers.receive()
                    in_flight -= 1
        found += [p.peer_id.to_base58() for p in store.get_providers(key_bytes)]
        if key_bytes in store.providing_keys:
            found.append(self.identity.peer_id)
        return list(dict.fromkeys(found))

    async def get_advert_value(self, peer_id: str) -> bytes | None:
        """The newest valid signed advert of ``peer_id`` as stored: asked of the network
        (a local copy is kept only if the network has nothing newer)."""
        key = records.advert_key(peer_id)
        key_bytes = key.encode()
        vs = self.dht.value_store
        local = vs.store.pop(key_bytes, None)
        value = None
        try:
            with trio.move_on_after(LOOKUP_TIMEOUT_S):
                value = await self.dht.get_value(key)
        except Exception as exc:
            log.debug("advert lookup for %s failed: %s", peer_id, exc)
        finally:
            if local is not None and key_bytes not in vs.store:
                vs.store[key_bytes] = local
        now = time.time()
        best: tuple[int, bytes] | None = None
        for v in (value, local[0].value if local else None):
            if not v:
                continue
            try:
                seq = records.open_advert(key, v, now).seq
            except RecordError:
                continue
            if best is None or seq > best[0]:
                best = (seq, v)
        return best[1] if best else None

    async def get_advert(self, peer_id: str) -> Advert | None:
        value = await self.get_advert_value(peer_id)
        return records.open_advert(records.advert_key(peer_id), value) if value else None

    async def get_adverts(self, peer_ids: Sequence[str]) -> list[Advert]:
        out: list[Advert] = []
        limit = trio.Semaphore(FETCH_CONCURRENCY)

        async def one(pid: str) -> None:
            async with limit:
                ad = await self.get_advert(pid)
            if ad is not None:
                out.append(ad)

        async with trio.open_nursery() as n:
            for pid in dict.fromkeys(peer_ids):
                n.start_soon(one, pid)
        return out

    async def find_model(self, spec: str) -> list[Advert]:
        """Live adverts of peers serving ``spec`` (alias or model id)."""
        kind = "alias" if not _looks_like_id(spec) else "model"
        ids = await self.find_providers(records.provider_key(kind, spec.lower()))
        now = time.time()
        return [a for a in await self.get_adverts(ids) if a.live(now) and a.serves(spec)]

    async def crawl(self, rounds: int = 3) -> list[str]:
        """Peer ids reachable through the DHT: the routing table, then lookups of random keys."""
        seen = {p.to_base58() for p in self.dht.routing_table.get_peer_ids()}
        for _ in range(rounds):
            with trio.move_on_after(LOOKUP_TIMEOUT_S):
                for p in await self.dht.peer_routing.find_closest_peers_network(os.urandom(32)):
                    seen.add(p.to_base58())
        seen.discard(self.identity.peer_id)
        return sorted(seen)

    async def overview(self) -> list[Advert]:
        """Every live advert this node can find: providers of the swarm key plus a crawl."""
        ids = await self.find_providers(records.provider_key("swarm", "all"))
        ids += await self.crawl()
        now = time.time()
        return sorted((a for a in await self.get_adverts(ids) if a.live(now)), key=lambda a: a.peer_id)


def _looks_like_id(spec: str) -> bool:
    return len(spec) >= 8 and all(c in "0123456789abcdef" for c in spec.lower())


@asynccontextmanager
async def swarm_node(host: Any, identity: Identity, *, server: bool) -> AsyncIterator[SwarmNode]:
    """Run a Kademlia DHT on ``host``: server mode stores records for others, client mode
    only asks (requesters, watchers)."""
    from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
    from libp2p.tools.anyio_service.context import background_trio_service

    dht = KadDHT(host, DHTMode.SERVER if server else DHTMode.CLIENT, enable_random_walk=False)
    dht.register_validator(records.NAMESPACE, _validator())
    async with background_trio_service(dht):
        yield SwarmNode(host, identity, dht)

