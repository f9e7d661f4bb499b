"""gputorrent: torrent-style volunteer compute for language models.

Peers donate a GPU or CPU (``gputorrent serve``); anyone asks the swarm
(``gputorrent ask``); tokens stream straight from the chosen peer over signed channels.
"""

__version__ = "0.1.0"


_API = {"Swarm", "Peer", "ask", "Answer", "AskFailed", "Attempt", "Text", "Failover", "Finished", "PeerStatus",
        "PeerSeen", "PeerLeft", "BreakerChanged", "Plan", "SwarmError", "Weights"}


def __getattr__(name: str):
    """The API loads on first use, so ``gputorrent --help`` and ``gputorrent id`` stay fast."""
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'gputorrent' has no attribute {name!r}")


__all__ = sorted(_API)
