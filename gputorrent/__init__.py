"""gputorrent: torrent-style volunteer compute for language models.

Peers donate a GPU or CPU (``gputorrent serve``); anyone asks the swarm
(``gputorrent ask``); tokens stream straight from the chosen peer over signed channels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import GputorrentError

__version__ = "0.1.0"

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the API loads on first use
    from .api import (
        Answer,
        AskFailed,
        Attempt,
        BreakerChanged,
        Failover,
        Finished,
        Peer,
        PeerLeft,
        PeerSeen,
        PeerStatus,
        Plan,
        PullFailed,
        Swarm,
        SwarmError,
        SwarmPull,
        Text,
        Weights,
        ask,
    )

__all__ = ["Answer", "AskFailed", "Attempt", "BreakerChanged", "Failover", "Finished", "GputorrentError", "Peer",
           "PeerLeft", "PeerSeen", "PeerStatus", "Plan", "PullFailed", "Swarm", "SwarmError", "SwarmPull", "Text",
           "Weights", "ask"]


def __getattr__(name: str) -> Any:
    """The API loads on first use, so ``gputorrent --help`` and ``gputorrent id`` stay fast."""
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'gputorrent' has no attribute {name!r}")
