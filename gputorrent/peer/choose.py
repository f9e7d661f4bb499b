"""Choose peers for a request: breakers first, then a fresh ping, then the MCDA score.

Only the requester decides; nothing here is shared with or trusted from other requesters,
except what peers sign about themselves (adverts, pongs).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import trio

from ..dht.records import Advert
from ..identity import short_id
from ..scoring import Candidate, Scored, Weights, choose, score
from ..scoring.reputation import ReputationStore
from .client import AttemptFailed, ping
from .host import DialError, connect


@dataclass(frozen=True, slots=True)
class Considered:
    """One candidate as ``--explain`` shows it."""

    advert: Advert
    breaker: str
    reputation: float
    rtt_ms: float | None = None
    scored: Scored | None = None
    skipped: str = ""  # why it was not scored


async def rank_peers(
    host: Any,
    adverts: list[Advert],
    store: ReputationStore,
    *,
    weights: Weights = Weights(),
    rng: random.Random | None = None,
    top: int = 3,
    ping_timeout: float = 2.0,
) -> tuple[list[Advert], list[Considered]]:
    """The adverts in the order to try them, and how each one was considered."""
    rng = rng or random.Random()
    now = time.time()
    considered: dict[str, Considered] = {}
    pongs: dict[str, tuple[float, Any]] = {}

    async def probe(ad: Advert) -> None:
        try:
            await connect(host, ad.addrs)
            pongs[ad.peer_id] = await ping(host, ad.peer_id, ping_timeout)
        except (DialError, AttemptFailed) as exc:
            rec = store.get(ad.peer_id, now)
            considered[ad.peer_id] = Considered(ad, rec.breaker.current(now), rec.reputation, skipped=f"no ping: {exc}")

    async with trio.open_nursery() as n:
        for ad in adverts:
            rec = store.get(ad.peer_id, now)
            if not rec.breaker.allows(now):
                considered[ad.peer_id] = Considered(ad, rec.breaker.current(now), rec.reputation,
                                                    skipped="breaker open")
                continue
            n.start_soon(probe, ad)

    candidates = []
    for ad in adverts:
        if ad.peer_id not in pongs:
            continue
        rtt, pong = pongs[ad.peer_id]
        rec = store.get(ad.peer_id, now)
        # Advertised speed, capped by what we saw ourselves: a peer cannot talk itself up.
        speed = pong.tokens_per_s if rec.tokens_per_s is None else min(pong.tokens_per_s, rec.tokens_per_s)
        candidates.append(Candidate(ad.peer_id, free_vram_mb=pong.free_memory_mb,
                                    free_slots=pong.slots - pong.active - pong.queued, rtt_ms=rtt,
                                    tokens_per_s=speed, reputation=rec.reputation))
    scored = score(candidates, weights)
    by_id = {ad.peer_id: ad for ad in adverts}
    for s in scored:
        rec = store.get(s.candidate.peer_id, now)
        considered[s.candidate.peer_id] = Considered(by_id[s.candidate.peer_id], rec.breaker.current(now),
                                                     rec.reputation, s.candidate.rtt_ms, s)
    order = [by_id[s.candidate.peer_id] for s in choose(scored, rng, top)]
    return order, [considered[ad.peer_id] for ad in adverts if ad.peer_id in considered]


def explain(considered: list[Considered], chosen: str | None, weights: Weights, top: int = 3) -> str:
    """A table of every candidate's criteria, score, reputation and breaker, and the choice."""
    w = weights
    lines = [f"weights: vram {w.vram:g}, slots {w.slots:g}, rtt {w.rtt:g}, speed {w.speed:g}; "
             "criteria relative to the best candidate (1 = best); score = weighted sum x reputation",
             f"{'peer':12} {'name':10} {'vram':>5} {'slots':>5} {'rtt':>5} {'speed':>5} {'base':>5} "
             f"{'rep':>5} {'score':>6} {'rtt ms':>7}  breaker"]
    for c in sorted(considered, key=lambda c: -(c.scored.score if c.scored else -1)):
        head = f"{short_id(c.advert.peer_id):12} {c.advert.name[:10]:10}"
        if c.scored is None:
            lines.append(f"{head} {'':>44} {c.reputation:5.2f} {'-':>6} {'-':>7}  {c.breaker} ({c.skipped})")
            continue
        k = c.scored.criteria
        lines.append(f"{head} {k['vram']:5.2f} {k['slots']:5.2f} {k['rtt']:5.2f} {k['speed']:5.2f} "
                     f"{c.scored.base:5.2f} {c.reputation:5.2f} {c.scored.score:6.3f} {c.rtt_ms:7.1f}  {c.breaker}")
    if chosen:
        how = ("the best score" if top == 1 else
               f"drawn among the top {top} with probability proportional to score (so requesters do not "
               "all herd onto one peer)")
        lines.append(f"chose {short_id(chosen)}: {how}; the rest are failover in score order")
    return "\n".join(lines)
