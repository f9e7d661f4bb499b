"""The embeddable API: ``Swarm`` to ask, ``Peer`` to serve, ``ask()`` for one answer.

Importing this package does not import libp2p or llama.cpp; they load when a ``Swarm`` or
``Peer`` is entered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..asking.asker import Answer, AskFailed, Attempt
from ..scoring import Weights
from .peer import Peer
from .pull import PullFailed, SwarmPull
from .swarm import (
    BreakerChanged,
    Failover,
    Finished,
    PeerLeft,
    PeerSeen,
    PeerStatus,
    Plan,
    StreamEvent,
    Swarm,
    SwarmError,
    SwarmEvent,
    Text,
)


def ask(prompt: str | Sequence[Any], *, model: str | None = None, bootstrap: Sequence[str] | None = None,
        **kw: Any) -> str:
    """One answer, synchronously: ``gputorrent.ask("…", model="smollm2", bootstrap=[…])``.

    Runs its own event loop, so call it from plain code, not from inside async code (use
    ``Swarm.generate`` there). Swarm keywords (``mdns``, ``identity``, ``peers``, ...) and
    generation keywords (``max_tokens``, ``temperature``, ...) are both accepted.
    """
    import inspect

    import trio

    swarm_keys = set(inspect.signature(Swarm).parameters)
    swarm_kw = {k: v for k, v in kw.items() if k in swarm_keys}
    gen_kw = {k: v for k, v in kw.items() if k not in swarm_keys}

    async def run() -> str:
        async with Swarm(bootstrap, **swarm_kw) as swarm:
            return (await swarm.generate(prompt, model=model, **gen_kw)).text

    return trio.run(run)


__all__ = ["Answer", "AskFailed", "Attempt", "BreakerChanged", "Failover", "Finished", "Peer", "PeerLeft",
           "PeerSeen", "PeerStatus", "Plan", "PullFailed", "StreamEvent", "Swarm", "SwarmError", "SwarmEvent",
           "SwarmPull", "Text", "Weights", "ask"]
