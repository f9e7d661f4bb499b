"""The Kademlia walk, apart from any network.

``dht/node.py`` runs it over py-libp2p's single-peer requests; ``benchmarks/simulate.py`` runs
the same code over a simulated network in virtual time (trio's MockClock), so what the
simulation measures at 10,000 peers is this walk, not a second implementation of it.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import trio

K = 20  # Kademlia's k: records live on the k peers closest to their key
ALPHA = 5  # requests in flight per lookup (py-libp2p uses 3)


@dataclass(slots=True)
class RoundTrips:
    """How long this node's DHT requests take to come back, for deadlines that follow the
    machine: a smoothed round trip and its deviation, as TCP keeps them (RFC 6298), and a
    request's deadline of ``srtt + 4 x rttvar``, never below ``floor`` nor above ``ceiling``.

    On a quiet machine answers come in milliseconds and the floor (1 s) holds; on a loaded one
    (other swarms on the cores, measured: answers at 1-3 s) a fixed 1 s cut off peers that were
    alive, marked them suspect for 30 s and left crawls and lookups incomplete."""

    floor: float
    ceiling: float
    srtt: float | None = None
    rttvar: float = 0.0

    def add(self, seconds: float) -> None:
        if self.srtt is None:
            self.srtt, self.rttvar = seconds, seconds / 2
        else:
            self.rttvar += 0.25 * (abs(self.srtt - seconds) - self.rttvar)
            self.srtt += 0.125 * (seconds - self.srtt)

    @property
    def timeout(self) -> float:
        if self.srtt is None:
            return self.floor
        return min(self.ceiling, max(self.floor, self.srtt + 4 * self.rttvar))


@dataclass(slots=True)
class Walked:
    """What one walk did: the peers that answered (closest first, at most ``K``), how many
    requests it sent, and the hops: how many referrals deep the closest answering peer was
    (1: it was known before the walk)."""

    responded: list[Any] = field(default_factory=list)
    seen: list[Any] = field(default_factory=list)  # every peer known by the end (asked or not)
    asked: int = 0
    hops: int = 0
    timed_out: list[Any] = field(default_factory=list)


async def walk(
    known: list[Any],
    query: Callable[[Any], Awaitable[Any]],
    closest_first: Callable[[list[Any]], list[Any]],
    *,
    me: Hashable = None,
    enough: Callable[[], bool] = lambda: False,
    is_suspect: Callable[[Any], bool] = lambda _p: False,
    query_timeout: float,
    lookup_timeout: float,
    late_timeout: float | Callable[[Any], float] | None = None,
    on_answer: Callable[[float], None] = lambda _seconds: None,
) -> Walked:
    """Keep ``ALPHA`` requests in flight to the closest peers not yet asked, learn closer peers
    from each answer, and stop when the ``K`` closest known have all answered or failed (or
    ``enough()``). ``query(peer)`` returns the closer peers a peer names (and keeps whatever
    else it learns on the side); ``closest_first`` orders peers by distance to the key.

    A sliding window, not rounds: one slow peer never holds up the others. A request past
    ``query_timeout`` gives its place in the window to the next peer but stays open until
    ``late_timeout`` (default: the same; a function of the peer, when peers differ: one not yet
    connected to costs a dial first), and a late answer counts like any other: on a loaded
    machine answers came in at 1-3 s, and cutting them off at the deadline lost the records
    they held and marked live peers suspect (a lookup found 2 of 10 adverts). Only a peer
    silent until ``late_timeout`` is reported timed out. The walk has ``lookup_timeout`` in
    all; whatever answered by then is kept. Peers for which ``is_suspect`` holds are asked
    only when nobody else is known (a requester whose one contact is the bootstrap must ask it).
    """
    known = [p for p in known if p != me]
    depth = {p: 1 for p in known}
    asked: set[Any] = set()
    holding: set[Any] = set()  # requests that hold a place in the window
    late: set[Any] = set()  # requests past query_timeout, still waited for
    out = Walked()
    changed, changes = trio.open_memory_channel[None](math.inf)

    def hard_of(peer: Any) -> float:
        extra = late_timeout(peer) if callable(late_timeout) else late_timeout
        return max(query_timeout, extra or 0.0)

    async def give_up_place(peer: Any) -> None:
        await trio.sleep(query_timeout)
        holding.discard(peer)
        late.add(peer)
        changed.send_nowait(None)

    async def ask(peer: Any) -> None:
        hard = hard_of(peer)
        try:
            async with trio.open_nursery() as inner:
                if hard > query_timeout:
                    inner.start_soon(give_up_place, peer)
                with trio.move_on_after(hard) as timer:
                    t = trio.current_time()
                    closer = await query(peer)
                    on_answer(trio.current_time() - t)
                    out.responded.append(peer)
                    for c in list(closer or ())[:K]:
                        if c != me and c not in depth:
                            depth[c] = depth[peer] + 1
                            known.append(c)
                inner.cancel_scope.cancel()
            if timer.cancelled_caught:
                out.timed_out.append(peer)
        except Exception:  # noqa: BLE001, S110 (refused, unreachable, malformed: the walk goes on without it)
            pass
        finally:
            holding.discard(peer)
            late.discard(peer)
            changed.send_nowait(None)

    avoid = any(not is_suspect(p) for p in known)
    with trio.move_on_after(lookup_timeout):
        async with trio.open_nursery() as nursery:
            while not enough():
                known = closest_first(known)
                fresh = [p for p in known[:K] if p not in asked and not (avoid and is_suspect(p))]
                for peer in fresh[: ALPHA - len(holding)]:
                    asked.add(peer)
                    holding.add(peer)
                    nursery.start_soon(ask, peer)
                if not holding and not late:
                    break
                await changes.receive()
            nursery.cancel_scope.cancel()
    out.responded = closest_first(out.responded)[:K]
    out.seen = list(depth)
    out.asked = len(asked)
    out.hops = depth[out.responded[0]] if out.responded else 0
    return out
