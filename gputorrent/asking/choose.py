"""Choose peers for a request: breakers first, then a ping, then the MCDA score.

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
from ..net.host import DialError, connect
from ..scoring import Candidate, Scored, Weights, choose, score
from ..scoring.reputation import ReputationStore
from .client import AttemptFailed, Stalled, ping


@dataclass(frozen=True, slots=True)
class Considered:
    """One candidate as ``--explain`` shows it."""

    advert: Advert
    breaker: str
    reputation: float
    rtt_ms: float | None = None
    scored: Scored | None = None
    skipped: str = ""  # why it was not scored


MAX_SLOTS = 256  # more parallel answers than any one peer plausibly runs


def free_slots(pong: Any) -> int:
    """Free slots a pong claims, bounded: at most ``MAX_SLOTS``, and negative counts of active
    or queued answers (which would add slots) count as 0."""
    return min(pong.slots, MAX_SLOTS) - max(0, pong.active) - max(0, pong.queued)


def _relayed_only(ad: Advert) -> bool:
    return bool(ad.addrs) and all("/p2p-circuit" in a for a in ad.addrs)


def _plausible_memory_mb(ad: Advert) -> int:
    """The most free memory this advert's device can have: its VRAM, else its RAM."""
    d = ad.device
    return max(0, d.vram_total_mb if d.kind == "gpu" else d.ram_mb)


async def rank_peers(
    host: Any,
    adverts: list[Advert],
    store: ReputationStore,
    *,
    weights: Weights = Weights(),
    rng: random.Random | None = None,
    top: int = 3,
    pongs: dict[str, tuple[float, float, Any]] | None = None,
    pong_fresh_s: float = 0.0,
    ping_wait_s: float = 1.0,
    ping_timeout: float = 3.0,
) -> tuple[list[Advert], list[Considered]]:
    """The adverts in the order to try them, and how each one was considered.

    Peers whose breaker is open are left out. The others are pinged (unless ``pongs`` holds
    one younger than ``pong_fresh_s``), all at once; once the first pong is in, the rest get
    three times its round trip more, at least 0.3 s and at most ``ping_wait_s`` (and
    ``ping_timeout`` in all). Those that answered are scored, and those that were only slower
    follow them, by reputation: still there for failover, never chosen ahead of a peer that
    answered. Peers whose dial or stream failed, and all of them when none answered within
    ``ping_timeout``, are left out: with every peer gone an ask fails in seconds.
    A frozen peer so costs one ``ping_wait_s`` at most, while a slow, loaded machine whose
    pongs all come late (within ``ping_timeout``) is still heard.

    What a pong claims is bounded by what can be checked: free memory by the advert's device,
    slots by ``MAX_SLOTS``; speed counts only as this requester measured it (a peer never
    measured gets the median of those that were), and a recent Busy lowers the score.
    """
    rng = rng or random.Random()
    pongs = {} if pongs is None else pongs
    now = time.time()
    considered: dict[str, Considered] = {}
    fresh: dict[str, tuple[float, Any]] = {}
    unanswered: dict[str, str] = {}
    refused: set[str] = set()  # the dial or the stream failed outright: dead, not slow

    first_pong = trio.Event()
    first_rtt_ms = [ping_wait_s * 1000]
    outstanding = 0

    async def probe(ad: Advert) -> None:
        nonlocal outstanding
        try:
            await connect(host, ad.addrs)
            rtt, pong = await ping(host, ad.peer_id, ping_timeout)
            fresh[ad.peer_id] = (rtt, pong)
            pongs[ad.peer_id] = (trio.current_time(), rtt, pong)
            if not first_pong.is_set():
                first_rtt_ms[0] = rtt
                first_pong.set()
        except Stalled as exc:
            unanswered[ad.peer_id] = f"no ping: {exc}"
        except (DialError, AttemptFailed) as exc:
            unanswered[ad.peer_id] = f"no ping: {exc}"
            refused.add(ad.peer_id)
        finally:
            outstanding -= 1
            if outstanding == 0:
                scope.cancel()  # everyone answered (or failed): no reason to wait

    async def cut_off(scope: trio.CancelScope) -> None:
        await first_pong.wait()
        await trio.sleep(min(ping_wait_s, max(0.3, 3 * first_rtt_ms[0] / 1000)))
        scope.cancel()

    allowed = []
    with trio.move_on_after(ping_timeout) as scope:
        async with trio.open_nursery() as n:
            n.start_soon(cut_off, scope)
            for ad in adverts:
                rec = store.get(ad.peer_id, now)
                if not rec.breaker.allows(now):
                    considered[ad.peer_id] = Considered(ad, rec.breaker.current(now), rec.reputation,
                                                        skipped="breaker open")
                    continue
                allowed.append(ad)
                kept = pongs.get(ad.peer_id)
                if kept is not None and trio.current_time() - kept[0] < pong_fresh_s:
                    fresh[ad.peer_id] = (kept[1], kept[2])
                    first_pong.set()
                else:
                    outstanding += 1
                    n.start_soon(probe, ad)
            if outstanding == 0:
                scope.cancel()  # nothing to ping

    measured = sorted(r for r in (store.get(ad.peer_id, now).tokens_per_s for ad in allowed) if r)
    typical_speed = measured[len(measured) // 2] if measured else 1.0
    candidates = []
    for ad in allowed:
        if ad.peer_id not in fresh:
            continue
        rtt, pong = fresh[ad.peer_id]
        rec = store.get(ad.peer_id, now)
        candidates.append(Candidate(
            ad.peer_id, free_vram_mb=min(max(0, pong.free_memory_mb), _plausible_memory_mb(ad)),
            free_slots=free_slots(pong), rtt_ms=rtt,
            tokens_per_s=rec.tokens_per_s or typical_speed,
            reputation=rec.reputation * rec.busy_factor(now)))
    scored = score(candidates, weights)
    by_id = {ad.peer_id: ad for ad in adverts}
    for s in scored:
        rec = store.get(s.candidate.peer_id, now)
        considered[s.candidate.peer_id] = Considered(by_id[s.candidate.peer_id], rec.breaker.current(now),
                                                     s.candidate.reputation, s.candidate.rtt_ms, s)
    silent = [ad for ad in allowed if ad.peer_id not in fresh]
    for ad in silent:
        rec = store.get(ad.peer_id, now)
        considered[ad.peer_id] = Considered(ad, rec.breaker.current(now), rec.reputation,
                                            skipped=unanswered.get(ad.peer_id, f"no pong within {ping_wait_s:g}s"))
    # Kept for failover: only peers that were merely slower than the first pong. A peer whose
    # dial or stream failed is dead, and when nobody answered at all each had the whole
    # ping_timeout: trying them one by one cost 5 s each (30 s to fail with every peer gone).
    # A peer reached only through a relay, not refused but silent when time ran out, is far,
    # not dead: a circuit between two homes 150 ms from the internet (300 ms apart) takes longer
    # to open and ping through than ``ping_timeout`` allows, and leaving it out failed every
    # such ask (benchmarks/wan.py). A dead one is refused by its relay at once; its own dial
    # deadline (net/host.RELAYED_DIAL_S) bounds the rest.
    silent = [ad for ad in silent if ad.peer_id not in refused and (first_pong.is_set() or _relayed_only(ad))]
    silent.sort(key=lambda ad: -store.get(ad.peer_id, now).reputation)
    order = [by_id[s.candidate.peer_id] for s in choose(scored, rng, top)] + silent
    return order, [considered[ad.peer_id] for ad in adverts if ad.peer_id in considered]


def explain(considered: list[Considered], chosen: str | None, weights: Weights, top: int = 3) -> str:
    """A table of every candidate's criteria, score, reputation and breaker, and the choice."""
    w = weights
    lines = [f"weights: vram {w.vram:g}, slots {w.slots:g}, rtt {w.rtt:g}, speed {w.speed:g}; "
             "criteria relative to the best candidate, but at most 4x the median (1 = as good); "
             "score = weighted sum x reputation (x a recent-Busy penalty)",
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
