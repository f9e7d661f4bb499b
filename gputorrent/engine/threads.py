"""Decode threads chosen by what they measure, not by the core count.

ggml's CPU backend splits each operation of a decode step across its threads and makes them meet
at a spinning barrier after every operation, hundreds of times a token. On a machine whose cores
other processes also want (a donor's desktop, other peers on the same box) a thread that has
been descheduled keeps the others spinning for the rest of a timeslice at every barrier: measured
here, a serve beside two busy swarms answered 8 tokens in 4.6-7 s with 2 threads and in 0.7-2 s
with 1 (and peers reported "0 tokens/s" answers). On an idle machine 2 threads are ~1.4x one.

So the engine keeps measuring: each option's time per decoded row (an exponential average), the
best one used, the others tried for a few steps now and then, so a change of load is followed
within seconds either way. Row-parallel ops compute every row on one thread whatever the count,
so the answer does not depend on it (with attention set up
as engine/llama.py does; tests/test_engine.py checks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

EXPLORE_EVERY = 48  # decode steps between tries of another thread count, at first
MAX_GAP = 48 * 8  # the longest wait between tries (each try that loses doubles the wait): seconds
PROBE_STEPS = 3  # steps each try lasts (the first after a switch is not counted: caches are cold)
ALPHA = 0.3  # weight of a new measurement in an option's average
SHIFT = 1.3  # the best option's cost moved this much either way: the load changed, try again soon


@dataclass
class ThreadTuner:
    """Which thread count the next decode step uses.

    Tries cost: on 2 cores one thread decodes at ~0.7x two, so a try every 48 steps cost a few
    per cent on a quiet machine (issue #36). A try that loses doubles the wait before the next
    (up to ``max_gap`` steps); a try that wins, or a move of the best option's own cost by
    ``SHIFT`` either way since the last try (other work arrived or left), brings the wait back
    to ``EXPLORE_EVERY``. So a quiet machine tries rarely and a change of load is still
    followed within a few dozen steps. ``max_gap=EXPLORE_EVERY`` is the old fixed rhythm.
    """

    most: int
    options: list[int] = field(default_factory=list)
    cost: dict[int, float] = field(default_factory=dict)  # seconds per decoded row, averaged
    max_gap: int = MAX_GAP
    gap: int = EXPLORE_EVERY  # steps from the end of one try to the next
    _step: int = 0
    _next_try: int = EXPLORE_EVERY
    _probe: int | None = None
    _probe_left: int = 0
    _current: int = 0
    _skip_next: bool = False
    _reference: float | None = None  # the best option's cost when the last try ended
    _stale: bool = False  # the option being tried has no figure from this try yet
    def __post_init__(self) -> None:
        self.most = max(1, self.most)
        self.options = self.options or sorted({1, max(1, self.most // 2), self.most})
        self._current = self.most

    @property
    def best(self) -> int:
        measured = [o for o in self.options if o in self.cost]
        return min(measured, key=lambda o: self.cost[o]) if measured else self.most

    def choose(self) -> int:
        """Threads for the next decode step."""
        self._step += 1
        if self._probe is None:
            unmeasured = [o for o in self.options if o not in self.cost]
            due = self._step >= self._next_try
            if unmeasured or (due and len(self.options) > 1):
                others = unmeasured or [o for o in self.options if o != self.best]
                self._probe = others[(self._step // EXPLORE_EVERY) % len(others)]
                self._probe_left = PROBE_STEPS
                self._stale = True  # its average is from the last try: the first new figure replaces it
        n = self._probe if self._probe is not None else self.best
        self._skip_next = n != self._current
        self._current = n
        return n

    def record(self, threads: int, seconds: float, rows: int) -> None:
        """What the step that ran with ``threads`` took, for ``rows`` decoded rows."""
        ended = False
        if self._probe is not None and threads == self._probe:
            self._probe_left -= 1
            ended = self._probe_left <= 0
        if not self._skip_next:
            per_row = seconds / max(1, rows)
            old = None if self._stale and threads == self._probe else self.cost.get(threads)
            self.cost[threads] = per_row if old is None else old + ALPHA * (per_row - old)
            if threads == self._probe:
                self._stale = False
        if ended:
            won = self.best == self._probe
            self._probe = None
            self.gap = EXPLORE_EVERY if won else min(self.max_gap, self.gap * 2)
            self._next_try = self._step + self.gap
            self._reference = self.cost.get(self.best)
        elif self._probe is None and self._reference and threads == self.best and threads in self.cost:
            ratio = self.cost[threads] / self._reference
            if ratio > SHIFT or ratio < 1 / SHIFT:  # the load changed: look again soon
                self.gap = EXPLORE_EVERY
                self._next_try = min(self._next_try, self._step + EXPLORE_EVERY)
                self._reference = self.cost[threads]
