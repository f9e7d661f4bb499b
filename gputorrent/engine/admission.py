"""Which waiting request gets the next free slot: reciprocity, the torrent way.

Without contention nothing changes: a lone waiter, or waiters with equal credit, go first come
first served. Under contention the waiter whose identity gave this machine the most (tokens it
received from that identity, decayed: ``scoring/ledger.py``) goes first, BitTorrent's
tit-for-tat; and one admission in ``OPTIMISTIC_EVERY`` goes to the longest-waiting requester
with no credit at all, BitTorrent's optimistic unchoke, so newcomers and pure askers never
starve. Credit is only what this peer received itself: no claim, ledger or vote of another
peer counts. Pure: the engine calls ``pick`` under its lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

OPTIMISTIC_EVERY = 4  # under contention, 1 admission in 4 goes to a requester with no credit


@dataclass(slots=True)
class Admission:
    """The policy and its counts (for status and metrics)."""

    contended: int = 0  # admissions made with a choice to make
    by_credit: int = 0  # ...given to a waiter with credit, ahead of others
    optimistic: int = 0  # ...given to a waiter with none, by the optimistic share

    def pick(self, credits: Sequence[float]) -> int:
        """Index of the waiter to admit; ``credits`` in arrival order."""
        if len(credits) <= 1 or max(credits) == min(credits):
            return 0
        self.contended += 1
        guests = [i for i, c in enumerate(credits) if c <= 0]
        if guests and self.contended % OPTIMISTIC_EVERY == 0:
            self.optimistic += 1
            return guests[0]
        best = max(range(len(credits)), key=lambda i: (credits[i], -i))
        self.by_credit += 1
        return best
