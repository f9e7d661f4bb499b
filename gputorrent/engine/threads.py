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
class _Arms:
    """What the tuner knows for one batch size (``bucket``): per-row costs differ by batch size,
    and so may the best thread count."""

    cost: dict[int, float] = field(default_factory=dict)  # seconds per decoded row, averaged
    gap: int = EXPLORE_EVERY  # steps from the end of one try to the next
    step: int = 0
    next_try: int = EXPLORE_EVERY
    probe: int | None = None
    probe_left: int = 0
    reference: float | None = None  # the best option's cost when the last try ended
    stale: bool = False  # the option being tried has no figure from this try yet


def bucket(rows: int) -> int:
    """Batch sizes grouped by powers of two: 1, 2, 4, 8 and more."""
    return min(8, 1 << (max(1, rows).bit_length() - 1))


@dataclass
class ThreadTuner:
    """Which thread count the next decode step uses.

    Tries cost: on 2 cores one thread decodes at ~0.7x two, so a try every 48 steps cost a few
    per cent on a quiet machine (issue #36, benchmarks/tuner.py). A try that loses doubles the
    wait before the next (up to ``max_gap`` steps); a try that wins, or a move of the best
    option's own cost by ``SHIFT`` either way since the last try (other work arrived or left),
    brings the wait back to ``EXPLORE_EVERY``. When the best option's cost passes another's
    last figure, the other is used at the next step. Costs are kept per batch size (``bucket``):
    a step of 8 rows costs less per row than a step of one, which must not read as a change of
    load. So a quiet machine tries rarely and a change of load is still followed within a few
    dozen steps. ``max_gap=EXPLORE_EVERY`` is the old fixed rhythm.
    """

    most: int
    options: list[int] = field(default_factory=list)
    max_gap: int = MAX_GAP
    arms: dict[int, _Arms] = field(default_factory=dict)
    _arm: _Arms = field(default_factory=_Arms)  # the batch size of the step in progress
    _current: int = 0
    _skip_next: bool = False

    def __post_init__(self) -> None:
        self.most = max(1, self.most)
        self.options = self.options or sorted({1, max(1, self.most // 2), self.most})
        self._current = self.most

    @property
    def cost(self) -> dict[int, float]:
        return self._arm.cost

    @property
    def gap(self) -> int:
        return self._arm.gap

    @property
    def best(self) -> int:
        return self._best(self._arm)

    def _best(self, arm: _Arms) -> int:
        measured = [o for o in self.options if o in arm.cost]
        return min(measured, key=lambda o: arm.cost[o]) if measured else self.most

    def best_for(self, rows: int = 1) -> int:
        """The best measured count for steps of ``rows`` rows, without a step: what a prompt's
        chunks use. They meet at the same spinning barriers, so when other work has made one
        thread the faster for decoding, a prompt is computed on one thread too (measured: a
        first token's p95 on a busy machine was 1.2 s with the prompt on every core)."""
        arm = self.arms.get(bucket(rows))
        return self._best(arm) if arm is not None else self.most

    def choose(self, rows: int = 1) -> int:
        """Threads for the next decode step, of ``rows`` rows."""
        arm = self._arm = self.arms.setdefault(bucket(rows), _Arms())
        arm.step += 1
        if arm.probe is None:
            unmeasured = [o for o in self.options if o not in arm.cost]
            due = arm.step >= arm.next_try
            if unmeasured or (due and len(self.options) > 1):
                others = unmeasured or [o for o in self.options if o != self._best(arm)]
                arm.probe = others[(arm.step // EXPLORE_EVERY) % len(others)]
                arm.probe_left = PROBE_STEPS
                arm.stale = True  # its average is from the last try: the first new figure replaces it
        n = arm.probe if arm.probe is not None else self._best(arm)
        self._skip_next = n != self._current
        self._current = n
        return n

    def record(self, threads: int, seconds: float, rows: int) -> None:
        """What the step that ran with ``threads`` took, for ``rows`` decoded rows."""
        arm = self._arm
        ended = False
        if arm.probe is not None and threads == arm.probe:
            arm.probe_left -= 1
            ended = arm.probe_left <= 0
        if not self._skip_next:
            per_row = seconds / max(1, rows)
            old = None if arm.stale and threads == arm.probe else arm.cost.get(threads)
            arm.cost[threads] = per_row if old is None else old + ALPHA * (per_row - old)
            if threads == arm.probe:
                arm.stale = False
        best = self._best(arm)
        if ended:
            won = best == arm.probe
            arm.probe = None
            arm.gap = EXPLORE_EVERY if won else min(self.max_gap, arm.gap * 2)
            arm.next_try = arm.step + arm.gap
            arm.reference = arm.cost.get(best)
        elif arm.probe is None and arm.reference and threads == best and threads in arm.cost:
            ratio = arm.cost[threads] / arm.reference
            if ratio > SHIFT or ratio < 1 / SHIFT:  # the load changed: look again soon
                arm.gap = EXPLORE_EVERY
                arm.next_try = min(arm.next_try, arm.step + EXPLORE_EVERY)
                arm.reference = arm.cost[threads]
