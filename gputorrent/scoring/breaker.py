"""A circuit breaker per peer, as a pure state machine (time is passed in).

closed --5 failures within 60 s, or any integrity failure--> open
open --cooldown elapsed--> half-open, which admits one trial request at a time
half-open --trial succeeds--> closed (cooldown back to its first value)
half-open --trial fails or times out--> open again, cooldown doubled (15 s, 30 s, ... 10 min)
half-open --trial busy, or its requester gave up--> half-open, the trial slot free again

A trial always resolves: besides those outcomes, a trial whose requester was killed before it
said anything lapses after ``TRIAL_LAPSE_S``, so no peer is ever locked out by a lost trial.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Literal

State = Literal["closed", "open", "half-open"]

FAILURES_TO_OPEN = 5
WINDOW_S = 60.0
FIRST_COOLDOWN_S = 15.0
MAX_COOLDOWN_S = 600.0
TRIAL_LAPSE_S = 120.0  # longer than any attempt waits without a frame (stall timeouts are ~10 s)


@dataclass(frozen=True, slots=True)
class Breaker:
    state: State = "closed"
    failures: tuple[float, ...] = ()  # times of recent failures while closed
    opened_at: float = 0.0
    cooldown_s: float = FIRST_COOLDOWN_S
    trial_at: float | None = None  # half-open: when the one trial request was sent
    banned: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Breaker:
        """From its stored form; fields of older versions (``trial_out``) are dropped."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["failures"] = tuple(kw.get("failures", ()))
        return cls(**kw)

    def current(self, now: float) -> State:
        """The state at ``now`` (an open breaker whose cooldown has elapsed is half-open)."""
        if self.banned:
            return "open"
        if self.state == "open" and now - self.opened_at >= self.cooldown_s:
            return "half-open"
        return self.state

    def trial_pending(self, now: float) -> bool:
        return self.trial_at is not None and now - self.trial_at < TRIAL_LAPSE_S

    def allows(self, now: float) -> bool:
        """Whether a request may go to this peer now (without taking the half-open trial)."""
        state = self.current(now)
        return state == "closed" or (state == "half-open" and not self.trial_pending(now))

    def start_trial(self, now: float) -> Breaker:
        """Record that a request was sent; in half-open that request is the one trial."""
        if self.current(now) == "half-open":
            return replace(self, state="half-open", trial_at=now)
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

    def release(self, now: float) -> Breaker:
        """The trial told us nothing about the peer's health (it was busy, or the requester
        gave up): free the trial slot for the next request."""
        if self.current(now) == "half-open":
            return replace(self, trial_at=None)
        return self

    def _open(self, now: float, cooldown: float) -> Breaker:
        return replace(self, state="open", failures=(), opened_at=now, cooldown_s=cooldown, trial_at=None)

    def ban(self) -> Breaker:
        return replace(self, banned=True)

    def reset(self) -> Breaker:
        return Breaker()
