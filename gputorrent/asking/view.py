"""A requester's kept view of the swarm: verified adverts, recent pongs, one lookup at a time.

Every ``ask`` used to redo the DHT lookup and fetch every advert: concurrent asks multiplied
the load on the DHT and starved each other (8 at once: 3 saw too few peers and failed). Here
the adverts found for a model are kept until they expire and refreshed in the background while
the model is in use; concurrent requests for the same lookup share one flight; pongs are kept
for a few seconds. Ranking reads the view, pinging only peers without a fresh pong, and waits
for pings at most ``PING_WAIT_S``: a peer that does not answer (asleep, hung) is ranked last
rather than holding up the choice.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

import msgspec
import trio

from .. import trace, wire
from ..dht.records import Advert, ServedModel, is_model_id
from ..errors import GputorrentError
from ..models.catalog import content_id
from ..net.host import reachable_from
from ..scoring import Weights
from ..scoring.reputation import ReputationStore
from ..tasks import gather
from .chain import Hop, plan_chain
from .choose import Considered, rank_peers


class AmbiguousModel(GputorrentError):
    """A name that peers announce for more than one model id; the message lists them."""


def one_model(spec: str, adverts: list[Advert]) -> list[Advert]:
    """``adverts`` when they all serve one model id under ``spec``, else ``AmbiguousModel``."""
    if is_model_id(spec):
        return adverts
    counts: dict[str, int] = {}
    for ad in adverts:
        if (m := ad.serves(spec)) is not None:
            counts[m.model_id] = counts.get(m.model_id, 0) + 1
    if len(counts) > 1:
        ids = ", ".join(f"{mid[:16]}… ({n} peer{'s' * (n != 1)})" for mid, n in
                        sorted(counts.items(), key=lambda kv: -kv[1]))
        raise AmbiguousModel(f"peers announce {len(counts)} different models under the name {spec!r}: {ids}. A "
                             "name is a claim anyone can make, so none is picked for you: ask for one by its "
                             f"whole id (--model {max(counts, key=counts.__getitem__)}, say), after checking "
                             "where that file comes from")
    return adverts


COMPLETE_BELOW = 32  # an overview this short holds every announcing peer (a lookup keeps 64 providers)
FRESH_S = 15.0  # a lookup younger than this is answered from the view
REFRESH_S = 10.0  # how often models in use are looked up again in the background
IN_USE_S = 300.0  # a model asked for within this long counts as in use
PONG_FRESH_S = 5.0  # a pong younger than this is not asked again
PING_WAIT_S = 1.0  # ranking waits at most this long for pings
ACCEPT_RTTS = 20  # an attempt waits for its stream and first frame this many ping round trips...
ACCEPT_MIN_S, ACCEPT_MAX_S = 1.5, 5.0  # ...at least and at most (5 s: the default for a peer never pinged)
WARM_PING_S = 2.0  # while a model is in use, its peers' pongs are renewed this often...
WARM_PEERS = 16  # ...for this many of them, so a request ranks without waiting for a ping
RETRY_LOOKUP_S = 2.0  # when every known peer has been tried, look again if the view is older
# Chain costs (ms per token) for hops this requester has not measured yet: a whole model step
# on a modest machine, shared by the blocks a hop holds, plus its round trip; a fixed cost per
# hop so that, all else equal, fewer hops win.
UNMEASURED_MODEL_MS = 20.0
UNHEARD_MS = 1000.0
HOP_MS = 2.0


@dataclass(slots=True)
class _Lookup:
    adverts: list[Advert]
    at: float  # trio time


class _Flight:
    """One lookup under way; later callers wait for its result instead of starting another."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class SwarmView:
    """What this requester knows of the swarm (one per ``Swarm``; trio only)."""

    def __init__(self, host: Any, node: Any, store: ReputationStore, *, weights: Weights = Weights(),
                 rng: random.Random | None = None, top: int = 3, scope: str = "loopback") -> None:
        self.host = host
        self.node = node
        self.store = store
        self.weights = weights
        self.rng = rng or random.Random()
        self.top = top
        self.scope = scope  # where we joined from: which advertised addresses we dial (host.reachable_from)
        self._lookups: dict[str, _Lookup] = {}
        self._used: dict[tuple[str, bool], float] = {}  # (spec, whole) -> when last asked
        self._flights: dict[str, _Flight] = {}
        self.pongs: dict[str, tuple[float, float, wire.Pong]] = {}  # peer id -> (at, rtt ms, pong)
        self.lookups_run = 0  # how many DHT lookups a caller of this view waited for (tests, benchmarks)
        self.refreshes_run = 0  # and how many it made in the background
        self._overview_used: float | None = None  # when a caller last wanted every advert

    # --- lookups ----------------------------------------------------------------------------

    async def _single_flight(self, key: str, run: Callable[[], Awaitable[Any]], background: bool = False) -> Any:
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = _Flight()
            try:
                if background:
                    self.refreshes_run += 1
                else:
                    self.lookups_run += 1
                flight.result = await run()
            except BaseException as exc:
                flight.error = exc
                raise
            finally:
                del self._flights[key]
                flight.done.set()
            return flight.result
        await flight.done.wait()
        if flight.error is not None:
            if isinstance(flight.error, Exception):
                raise flight.error
            raise RuntimeError("the shared lookup was cancelled")
        return flight.result

    async def _lookup(self, key: str, run: Callable[[], Awaitable[list[Advert]]], max_age: float,
                      background: bool = False) -> list[Advert]:
        now = trio.current_time()
        kept = self._lookups.get(key)
        if kept is None or now - kept.at > max_age:

            async def fresh() -> list[Advert]:
                with trace.span("lookup", key=key[:20]):
                    adverts = await run()
                self._lookups[key] = _Lookup(adverts, trio.current_time())
                return adverts

            await self._single_flight(key, fresh, background)
            kept = self._lookups[key]
        wall = time.time()
        return [self._reachable(a) for a in kept.adverts if a.live(wall) and not a.leaving]

    def _reachable(self, ad: Advert) -> Advert:
        addrs = [a for a in ad.addrs if reachable_from(a, self.scope)]
        return ad if len(addrs) == len(ad.addrs) else msgspec.structs.replace(ad, addrs=addrs)

    async def find(self, spec: str, max_age: float = FRESH_S, *, whole: bool | None = True,
                   background: bool = False) -> list[Advert]:
        """Live adverts of peers serving ``spec`` (alias or model id) whole, or with
        ``whole=False`` holding shards of it (``None``: both), from the view when it is fresh
        enough, else from one shared lookup of each kind.

        A catalog alias is looked up by the catalog's model id; another name that peers
        announce for different model ids raises ``AmbiguousModel`` rather than picking one by
        counting adverts, which sybils win (docs/architecture.md, "Names"). A ``background``
        refresh does not count as use: a model asked for once is not refreshed forever."""
        spec = content_id(spec)
        if whole is None:
            both = await gather([lambda: self.find(spec, max_age, whole=True, background=background),
                                 lambda: self.find(spec, max_age, whole=False, background=background)])
            return [a for found in both for a in found]
        if not background:
            self._used[(spec, whole)] = trio.current_time()
        key = f"{'model' if whole else 'shards'}:{spec}"
        self._from_overview(key, spec, whole, max_age)
        found = await self._lookup(key, lambda: self.node.find_model(spec, shards=not whole), max_age, background)
        return one_model(spec, found)

    def _from_overview(self, key: str, spec: str, whole: bool, max_age: float) -> None:
        """Seed a model's lookup from an overview fetched within ``max_age``: every peer
        announcing a model also announces the swarm key, so a cold ask that just listed them
        to choose the model need not walk again for it, whole or in shards (traced: 4.7 round
        trips). A short overview is complete (a lookup keeps 64 providers), so finding no peer
        that serves it one way is a fact too. The background refresh replaces the seed with the
        model's own lookup while the model is in use."""
        if key in self._lookups:
            return
        kept = self._lookups.get("overview")
        if kept is not None and trio.current_time() - kept.at <= max_age:
            mine = [a for a in kept.adverts if (m := a.serves(spec)) is not None and m.whole == whole]
            if mine or len(kept.adverts) < COMPLETE_BELOW:
                self._lookups[key] = _Lookup(mine, kept.at)

    async def overview(self, max_age: float = FRESH_S, *, listing: bool = False) -> list[Advert]:
        """Every live advert (a crawl), from the view when it is fresh enough. A ``listing``
        (peers, models list) keeps it refreshed in the background for a while; an ask that only
        chose a model from it does not (that was a crawl every 10 s for 5 minutes per ask)."""
        if listing:
            self._overview_used = trio.current_time()
        return await self._lookup("overview", self.node.overview, max_age)

    async def refresh_forever(self) -> None:
        """Keep the models in use fresh, and the overview while listings use it, so requests
        and listings rarely wait for a lookup."""
        while True:
            await trio.sleep(REFRESH_S)
            now = trio.current_time()
            if self._overview_used is not None and now - self._overview_used < IN_USE_S:
                try:
                    await self._lookup("overview", self.node.overview, REFRESH_S / 2, background=True)
                except Exception:  # noqa: BLE001, S110 (the next round tries again)
                    pass
            for spec, whole in [s for s, t in self._used.items() if now - t < IN_USE_S]:
                try:
                    await self.find(spec, max_age=REFRESH_S / 2, whole=whole, background=True)
                except Exception:  # noqa: BLE001, S110 (the next round tries again; requests look up themselves)
                    pass

    async def ping_forever(self) -> None:
        """Keep pongs of the peers of models in use fresh, in the background: a request then
        ranks from the view alone, without a round trip before its first token (a warm path,
        as a server keeps its connections warm). Only peers already found, and at most
        ``WARM_PEERS`` per model, so an idle requester or a huge swarm costs little."""
        while True:
            await trio.sleep(WARM_PING_S)
            now = trio.current_time()
            for spec, whole in [s for s, t in self._used.items() if now - t < IN_USE_S]:
                kept = self._lookups.get(f"{'model' if whole else 'shards'}:{spec}")
                if kept is None:
                    continue
                wall = time.time()
                adverts = [self._reachable(a) for a in kept.adverts if a.live(wall) and not a.leaving][:WARM_PEERS]
                try:
                    await rank_peers(self.host, [a for a in adverts if a.addrs], self.store, weights=self.weights,
                                     rng=self.rng, top=self.top, pongs=self.pongs,
                                     pong_fresh_s=PONG_FRESH_S - WARM_PING_S, ping_wait_s=PING_WAIT_S)
                except Exception:  # noqa: BLE001, S110 (a failed round is retried; requests ping for themselves)
                    pass

    def accept_timeout(self, peer_id: str) -> float:
        """How long an attempt waits for ``peer_id``'s stream and first frame: a ping is that
        same round trip, so ``ACCEPT_RTTS`` of the last one measured. A fixed 5 s made a peer
        frozen since its last pong cost 5 s per attempt (every peer gone: 30 s to fail)."""
        kept = self.pongs.get(peer_id)
        if kept is None:
            return ACCEPT_MAX_S
        return min(ACCEPT_MAX_S, max(ACCEPT_MIN_S, ACCEPT_RTTS * kept[1] / 1000))

    # --- choosing ---------------------------------------------------------------------------

    async def rank(self, spec: str, *, exclude: AbstractSet[str] = frozenset(), model_id: str = "",
                   max_age: float = FRESH_S, whole: bool = True) -> tuple[list[Advert], list[Considered]]:
        """The peers serving ``spec`` (and ``model_id``, once known) not in ``exclude``, best
        first, and how each was judged: peers serving the whole model, or with ``whole=False``
        the peers holding shards of it."""
        adverts = [a for a in await self.find(spec, max_age, whole=whole) if a.addrs and a.peer_id not in exclude
                   and any((not model_id or m.model_id == model_id) and m.whole == whole and _names(m, spec)
                           for m in a.models)]
        return await rank_peers(self.host, adverts, self.store, weights=self.weights, rng=self.rng, top=self.top,
                                pongs=self.pongs, pong_fresh_s=PONG_FRESH_S, ping_wait_s=PING_WAIT_S)

    def candidates(self, spec: str, first: list[Advert] | None = None) -> Candidates:
        return Candidates(self, spec, first or [])

    def hop_cost(self, considered: list[Considered]) -> Callable[[Advert, ServedModel], float]:
        """A hop's cost in ms per token, for chain planning: what this requester measured of
        the peer as a hop (steps per second of its own time), else its ping's round trip plus
        its share of a whole-model step, divided by reputation. Never what a peer claims."""
        by_id = {c.advert.peer_id: c for c in considered}
        now = time.time()

        def cost(ad: Advert, m: ServedModel) -> float:
            c = by_id.get(ad.peer_id)
            rec = self.store.get(ad.peer_id, now)
            if rec.tokens_per_s:
                ms = 1000.0 / rec.tokens_per_s
            else:
                rtt = c.rtt_ms if c is not None and c.rtt_ms is not None else UNHEARD_MS
                ms = rtt + UNMEASURED_MODEL_MS * (m.end_block - m.first_block) / max(1, m.total_blocks)
            return (HOP_MS + ms) / max(0.05, rec.reputation * rec.busy_factor(now))

        return cost

    async def chain(self, spec: str, *, exclude: AbstractSet[str] = frozenset(), model_id: str = "", first: int = 0,
                    end: int | None = None, max_age: float = FRESH_S) -> tuple[list[Hop] | None, list[Considered]]:
        """The cheapest chain of shard peers computing blocks [first, end) of ``spec`` (of
        ``model_id`` once known; else of the model id for which the chain is cheapest)."""
        order, considered = await self.rank(spec, exclude=exclude, model_id=model_id, max_age=max_age, whole=False)
        cost = self.hop_cost(considered)
        best: list[Hop] | None = None
        for mid in {m.model_id for ad in order for m in ad.models if _names(m, spec)} if not model_id else {model_id}:
            total = next((m.total_blocks for ad in order for m in ad.models if m.model_id == mid), 0)
            hops = plan_chain(order, mid, first, total if end is None else end, cost)
            if hops and (best is None or sum(h.cost_ms for h in hops) < sum(h.cost_ms for h in best)):
                best = hops
        return best, considered

    def chain_source(self, spec: str) -> ChainCandidates:
        return ChainCandidates(self, spec)


def _names(m: ServedModel, spec: str) -> bool:
    spec = spec.strip().lower()
    return spec in ("", m.alias, m.model_id) or (len(spec) >= 8 and m.model_id.startswith(spec))


class ChainCandidates:
    """Where a chain's hops come from: planned again from the view at every replacement."""

    def __init__(self, view: SwarmView, spec: str) -> None:
        self.view = view
        self.spec = spec

    async def plan(self, tried: set[str], model_id: str, first: int, end: int) -> list[Hop] | None:
        hops, _ = await self.view.chain(self.spec, exclude=tried, model_id=model_id, first=first, end=end)
        if not hops:  # everyone known was tried: peers may have joined since the last lookup
            hops, _ = await self.view.chain(self.spec, exclude=tried, model_id=model_id, first=first, end=end,
                                            max_age=RETRY_LOOKUP_S)
        return hops


class Candidates:
    """The next peer to try for one request, re-ranked from the view at every attempt."""

    def __init__(self, view: SwarmView, spec: str, first: list[Advert]) -> None:
        self.view = view
        self.spec = spec
        self._first = first  # the plan's order, used for the first attempt only

    async def next(self, tried: set[str], model_id: str) -> list[str] | None:
        if self._first:
            ad, self._first = self._first[0], []
            if ad.peer_id not in tried:
                return list(ad.addrs)
        order, _ = await self.view.rank(self.spec, exclude=tried, model_id=model_id)
        if not order:  # everyone known was tried: peers may have joined since the last lookup
            order, _ = await self.view.rank(self.spec, exclude=tried, model_id=model_id, max_age=RETRY_LOOKUP_S)
        return list(order[0].addrs) if order else None

