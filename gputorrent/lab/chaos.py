"""Requests against a real local swarm while its peers are killed and frozen (chaos runs).

``benchmarks/chaos.py`` and ``tests/test_chaos.py`` drive the same code: a ``Swarm`` (the
API, in this process) keeps ``in_flight`` greedy requests going over a list of prompts while
``faults`` fire after given numbers of completed requests (``SIGKILL`` a peer: a crash;
``SIGSTOP``: a laptop gone to sleep, its sockets open and silent). Every answer is compared
with the uninterrupted reference for its prompt.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from ..api import AskFailed, Swarm
from .localswarm import PeerProcess


@dataclass(frozen=True, slots=True)
class Fault:
    after: int  # fire once this many requests of the round have finished
    peer: PeerProcess
    sig: int = signal.SIGKILL

    def fire(self) -> None:
        if self.peer.proc.poll() is None:
            os.kill(self.peer.proc.pid, self.sig)


@dataclass(slots=True)
class Round:
    requests: int
    completed: int = 0
    identical: int = 0
    failed: list[str] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)  # seconds, completed requests
    failovers: int = 0
    max_tokens_seen: int = 0  # the longest answer, in tokens (never past the request's max_tokens)
    wall_s: float = 0.0


async def reference(swarm: Swarm, prompts: Sequence[str], max_tokens: int) -> dict[str, str]:
    """Each prompt's uninterrupted greedy answer, from the healthy swarm."""
    return {p: (await swarm.generate(p, temperature=0.0, max_tokens=max_tokens)).text for p in prompts}


async def run_round(swarm: Swarm, prompts: Sequence[str], expected: dict[str, str], *, requests: int,
                    in_flight: int, faults: Sequence[Fault] = (), max_tokens: int = 32,
                    deadline: float = 120.0) -> Round:
    """``requests`` asks, ``in_flight`` at a time, firing each fault once enough have finished.
    Every request is bounded by ``deadline``: one that passes it counts as failed ("hung")."""
    result = Round(requests)
    pending = sorted(faults, key=lambda f: f.after)
    limit = trio.Semaphore(in_flight)
    finished = 0

    async def one(i: int) -> None:
        nonlocal finished
        prompt = prompts[i % len(prompts)]
        t0 = time.monotonic()
        try:
            with trio.fail_after(deadline):
                answer = await swarm.generate(prompt, temperature=0.0, max_tokens=max_tokens)
            result.completed += 1
            result.identical += answer.text == expected[prompt]
            result.durations.append(time.monotonic() - t0)
            result.failovers += sum(a.outcome != "ok" for a in answer.attempts)
            result.max_tokens_seen = max(result.max_tokens_seen, sum(a.tokens for a in answer.attempts))
        except AskFailed as exc:
            result.failed.append(str(exc)[:300])
        except trio.TooSlowError:
            result.failed.append(f"hung past its {deadline:g}s deadline")
        finally:
            finished += 1
            while pending and finished >= pending[0].after:
                pending.pop(0).fire()
            limit.release()

    t0 = time.monotonic()
    async with trio.open_nursery() as n:
        for i in range(requests):
            await limit.acquire()
            n.start_soon(one, i)
    result.wall_s = time.monotonic() - t0
    return result


async def time_to_give_up(swarm: Swarm, prompt: str) -> tuple[float, str]:
    """Seconds until an ask with no live peer left fails, and what it said."""
    t0 = time.monotonic()
    try:
        await swarm.generate(prompt, temperature=0.0, max_tokens=8)
    except AskFailed as exc:
        return time.monotonic() - t0, str(exc)
    return math.inf, "answered with no peer alive"
