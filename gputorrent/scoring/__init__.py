"""Choosing peers: MCDA scores (mcda.py) and circuit breakers (breaker.py). Pure functions
and data, deterministic given their inputs, a seed and the time passed in."""

from .breaker import Breaker
from .mcda import Candidate, Scored, Weights, choose, normalize, rank, score

__all__ = ["Breaker", "Candidate", "Scored", "Weights", "choose", "normalize", "rank", "score"]
