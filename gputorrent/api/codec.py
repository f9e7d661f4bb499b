"""The API's objects as agent events and back: what lets ``Swarm()``, the gateway and the TUI
use the agent's swarm (``remote.py``) and see what they would see in-process.

Each stream event, swarm event and error has one JSON shape; ``decode_*`` rebuilds the very
types ``Swarm`` yields and raises, so code written against the in-process API runs unchanged.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ..asking.asker import Answer, AskFailed, Attempt
from .pull import PullFailed
from .swarm import (
    BreakerChanged,
    Failover,
    Finished,
    PeerLeft,
    PeerSeen,
    PeerStatus,
    StreamEvent,
    SwarmError,
    SwarmEvent,
    Text,
)


def encode_stream(ev: StreamEvent) -> dict[str, Any]:
    if isinstance(ev, Text):
        return {"t": "text", "text": ev.text, "peer_id": ev.peer_id}
    if isinstance(ev, Failover):
        return {"t": "failover", **asdict(ev)}
    return {"t": "finished", "answer": ev.answer.to_dict()}


def decode_stream(d: dict[str, Any]) -> StreamEvent:
    kind = d.get("t")
    if kind == "text":
        return Text(d["text"], d["peer_id"])
    if kind == "failover":
        return Failover(d["peer_id"], d["outcome"], d["error"], d["tokens_so_far"])
    if kind == "finished":
        return Finished(Answer.from_dict(d["answer"]))
    raise decode_error(d)


def encode_event(ev: SwarmEvent) -> dict[str, Any]:
    if isinstance(ev, PeerSeen):
        return {"t": "seen", "peer": ev.peer.to_dict(), "new": ev.new}
    if isinstance(ev, PeerLeft):
        return {"t": "left", "peer_id": ev.peer_id}
    if isinstance(ev, BreakerChanged):
        return {"t": "breaker", "peer_id": ev.peer_id, "state": ev.state}
    return encode_stream(ev)


def decode_event(d: dict[str, Any]) -> SwarmEvent:
    kind = d.get("t")
    if kind == "seen":
        return PeerSeen(PeerStatus.from_dict(d["peer"]), bool(d["new"]))
    if kind == "left":
        return PeerLeft(d["peer_id"])
    if kind == "breaker":
        return BreakerChanged(d["peer_id"], d["state"])
    ev = decode_stream(d)
    if not isinstance(ev, Failover):
        raise SwarmError(f"the agent sent an event of an unknown kind: {kind!r}")
    return ev


def encode_error(exc: BaseException) -> dict[str, Any]:
    """An error as the last event of a request: its type survives the trip."""
    msg = {"t": "error", "message": str(exc), "end": True}
    if isinstance(exc, AskFailed):
        return {**msg, "kind": "ask", "fail": exc.kind, "partial": exc.partial_text,
                "attempts": [asdict(a) for a in exc.attempts]}
    if isinstance(exc, PullFailed):
        return {**msg, "kind": "pull"}
    if isinstance(exc, (ValueError, TypeError)):
        return {**msg, "kind": "value", "usage": True}
    return {**msg, "kind": "swarm"}


def decode_error(d: dict[str, Any]) -> Exception:
    """The exception an error event stands for (a SwarmError for anything unexpected)."""
    message = str(d.get("message") or f"the agent sent {d.get('t')!r} where an answer was due")
    kind = d.get("kind")
    if kind == "ask":
        return AskFailed(message, [Attempt(**a) for a in d.get("attempts") or []], d.get("partial") or "",
                         d.get("fail") or "")
    if kind == "pull":
        return PullFailed(message)
    if kind == "value":
        return ValueError(message)
    return SwarmError(message)
