"""What an inference engine takes and gives back, independent of llama.cpp or trio.

An engine runs its own thread; it reports through ``Job.emit``, which it calls from that
thread and which must not block (the trio side hands it ``TrioToken.run_sync_soon``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import GputorrentError
from ..wire import Params


class EngineError(GputorrentError):
    """A request the engine cannot run (for example, longer than the context)."""


@dataclass(frozen=True, slots=True)
class Tokens:
    ids: list[int]
    text: str


@dataclass(frozen=True, slots=True)
class Finished:
    reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float  # from taking a slot to the first token (the prompt's prefill)
    decode_ms: float
    queue_ms: float = 0.0  # from submission to taking a slot


@dataclass(frozen=True, slots=True)
class Failed:
    message: str


Event = Tokens | Finished | Failed


@dataclass(eq=False, slots=True)
class Job:
    """One generation: prompt token ids, sampling parameters, and for a failover the tokens
    another peer already produced (``forced``): the engine replays them as if it had sampled
    them itself, one decode step each, and emits only what comes after."""

    prompt_ids: list[int]
    params: Params
    emit: Callable[[Event], None]
    max_new: int  # completion tokens allowed (forced ones included), clipped to the context
    forced: list[int] = field(default_factory=list)
    admitted: bool = False  # holds a slot (set by the engine's thread)
    credit: float = 0.0  # what the requester's identity gave this machine: its place under contention
    created: float = field(default_factory=time.perf_counter)
    _cancel: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Ask the engine to stop this job; it frees the slot at its next step."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()


@dataclass(frozen=True, slots=True)
class Load:
    """Live occupancy, for adverts, pings and admission."""

    active: int
    queued: int
    slots: int
