"""A circuit breaker per peer, as a pure state machine (time is passed in).

closed --5 failures within 60 s, or any integrity failure--> open
open --cooldown elapsed--> half-open, which admits exactly one trial request
half-open --trial succeeds--> closed (cooldown back to its first value)
half-open --trial fails--> open again, with the cooldown doubled (15 s, 30 s, ... capped at 10 min)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

State = Literal["closed", "open", "half-open"]

FAILURES_TO_OPEN = 5
WINDOW_S = 60.0
FIRST_COOLDOWN_S = 15.0
MAX_COOLDOWN_S = 600.0


@dataclass(frozen=True, slots=True)
class Breaker:
    state: State = "closed"
    failures: tuple[float, ...] = ()  # times of recent failures while closed
    opened_at: float = 0.0
    cooldown_s: float = FIRST_COOLDOWN_S
    trial_out: bool = False  # half-open: the one trial request is under way
    banned: bool = False

    def current(self, now: float) -> State:
        """The state at ``now`` (an open breaker whose cooldown has elapsed is half-open)."""
        if self.banned:
            return "open"
        if self.state == "open" and now - self.opened_at >= self.cooldown_s:
            return "half-open"
        return self.state

    def allows(self, now: float) -> bool:
        """Whether a request may go to this peer now (without taking the half-open trial)."""
        state = self.current(now)
        return state == "closed" or (state == "half-open" and not self.trial_out)

    def start_trial(self, now: float) -> Breaker:
        """Record that a request was sent; in half-open that request is the one trial."""
        if self.current(now) == "half-open":
            return replace(self, state="half-open", trial_out=True)
        return self

    def success(self, now: float) -> Breaker:
        if self.banned:
            return self
        if self.current(now) == "half-open":
            return Breaker()
        return replace(self, failures=tuple(t for t in self.failures if now - t < WINDOW_S))

    def failure(self, now: float, *, integrity: bool = False) -> Breaker:
        state = self.current(now)
        if state == "half-open":
            return self._open(now, min(self.cooldown_s * 2, MAX_COOLDOWN_S))
        if state == "open":
            return self
        recent = tuple(t for t in self.failures if now - t < WINDOW_S) + (now,)
        if integrity or len(recent) >= FAILURES_TO_OPEN:
            return self._open(now, self.cooldown_s)
        return replace(self, failures=recent)

    def _open(self, now: float, cooldown: float) -> Breaker:
        return replace(self, state="open", failures=(), opened_at=now, cooldown_s=cooldown, trial_out=False)

    def ban(self) -> Breaker:
        return replace(self, banned=True)

    def reset(self) -> Breaker:
        return Breaker()

