"""Multi-criteria scoring of candidate peers: pure and deterministic given inputs and a seed.

Each criterion is normalized across the candidates to [0, 1] as a ratio to a reference
candidate (see ``normalize``; RTT inverted), combined with weights that sum to 1, then multiplied
by the peer's reputation.
The choice is random among the top few, weighted by score, so that many requesters with the
same view of the swarm do not all herd onto the one best peer.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Weights:
    vram: float = 0.4
    slots: float = 0.3
    rtt: float = 0.2
    speed: float = 0.1

    def __post_init__(self) -> None:
        values = (self.vram, self.slots, self.rtt, self.speed)
        if any(v < 0 or not math.isfinite(v) for v in values):
            raise ValueError("scoring weights must be finite and non-negative")
        if not math.isclose(sum(values), 1.0, abs_tol=1e-9):
            raise ValueError(f"scoring weights must sum to 1 (they sum to {sum(values):g})")

    @classmethod
    def parse(cls, text: str) -> Weights:
        """``vram=0.4,slots=0.3,rtt=0.2,speed=0.1`` (all four, summing to 1)."""
        try:
            parts = dict(item.split("=", 1) for item in text.split(","))
            return cls(**{k.strip(): float(v) for k, v in parts.items()})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad --weights {text!r}: {exc}; e.g. vram=0.4,slots=0.3,rtt=0.2,speed=0.1") from exc


@dataclass(frozen=True, slots=True)
class Candidate:
    peer_id: str
    free_vram_mb: float  # free VRAM, or free RAM for a CPU peer
    free_slots: float  # slots minus active minus queued (may be negative when queued)
    rtt_ms: float
    tokens_per_s: float
    reputation: float = 1.0  # in [0, 1]


@dataclass(frozen=True, slots=True)
class Scored:
    candidate: Candidate
    criteria: dict[str, float] = field(default_factory=dict)  # normalized, each in [0, 1]
    base: float = 0.0  # weighted sum of criteria
    score: float = 0.0  # base x reputation


OUTLIER_RATIO = 4.0


def normalize(values: Sequence[float], *, higher_is_better: bool = True) -> list[float]:
    """Each value relative to a reference candidate's, in [0, 1].

    Higher is better: the reference is the best value, but at most ``OUTLIER_RATIO`` times the
    median, and anything at or above it gets 1. A plain ratio to the best would let one peer
    that claims absurd figures push every honest peer's score towards 0; this way a claim can
    rescale the others by at most that factor. Lower is better (RTT, which we measure): ratio
    to the best, with a floor against zero. Ratios, not min-max: min-max stretches any
    difference to the full range, so RTTs of 1.1 and 1.3 ms would score 1 and 0. Negative
    values (more queued than slots) count as 0; when none has anything, all get 1.
    """
    vals = [max(0.0, v) for v in values]
    if higher_is_better:
        ordered = sorted(vals)
        ref = min(ordered[-1], OUTLIER_RATIO * ordered[(len(vals) - 1) // 2]) or ordered[-1]
        return [1.0] * len(vals) if ref <= 0 else [min(1.0, v / ref) for v in vals]
    floor = 1e-3
    best = max(min(vals), floor)
    return [min(1.0, best / max(v, floor)) for v in vals]


def score(candidates: Sequence[Candidate], weights: Weights = Weights()) -> list[Scored]:
    """Scores in the order given."""
    if not candidates:
        return []
    cols = {
        "vram": normalize([c.free_vram_mb for c in candidates]),
        "slots": normalize([c.free_slots for c in candidates]),
        "rtt": normalize([c.rtt_ms for c in candidates], higher_is_better=False),
        "speed": normalize([c.tokens_per_s for c in candidates]),
    }
    out = []
    for i, c in enumerate(candidates):
        crit = {k: v[i] for k, v in cols.items()}
        base = sum(getattr(weights, k) * crit[k] for k in crit)
        rep = min(1.0, max(0.0, c.reputation))
        out.append(Scored(c, crit, base, base * rep))
    return out


def rank(scored: Sequence[Scored]) -> list[Scored]:
    """Best first; ties broken by peer id so the order is deterministic."""
    return sorted(scored, key=lambda s: (-s.score, s.candidate.peer_id))


def choose(scored: Sequence[Scored], rng: random.Random, top: int = 3) -> list[Scored]:
    """An order to try candidates in: the first is drawn among the ``top`` best with
    probability proportional to score; the rest follow in rank order (for failover)."""
    ranked = rank(scored)
    if not ranked:
        return []
    pool = ranked[: max(1, top)]
    weights = [max(s.score, 1e-9) for s in pool]
    first = rng.choices(pool, weights=weights, k=1)[0]
    return [first] + [s for s in ranked if s is not first]
