"""The asking side of ``/gputorrent/infer/3``: one attempt against one peer.

Every frame is verified (signature, sequence, transcript) before its text is used, so what
reaches the caller is exactly what the peer signed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from .. import protocol, trace, wire
from ..errors import GputorrentError
from ..net.host import finish_stream, new_stream


class AttemptFailed(GputorrentError):
    """One peer did not finish the answer. ``retry`` says whether another peer may."""

    outcome = "failed"
    retry = True


class PeerBusy(AttemptFailed):
    outcome = "busy"

    def __init__(self, msg: str, retry_after_ms: int) -> None:
        super().__init__(msg)
        self.retry_after_ms = retry_after_ms


class RemoteError(AttemptFailed):
    outcome = "error"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.retry = code in protocol.RETRY_ELSEWHERE


class StreamBroken(AttemptFailed):
    outcome = "dropped"


class Stalled(AttemptFailed):
    outcome = "stalled"


class IntegrityFailure(AttemptFailed):
    outcome = "integrity"


@dataclass(slots=True)
class AttemptResult:
    peer_id: str
    model_id: str = ""
    ids: list[int] = field(default_factory=list)
    text: str = ""
    done: wire.Done | None = None
    transcript: bytes = b""  # the transcript hash of the last verified frame (signed by the peer)
    t_start: float = 0.0
    t_first: float | None = None
    t_last: float | None = None


OnToken = Callable[[list[int], str], None]


async def run_attempt(
    host: Any,
    peer_id: str,
    request: wire.InferRequest,
    on_token: OnToken,
    *,
    stall_timeout: float = 10.0,
    accept_timeout: float = 5.0,
    result: AttemptResult | None = None,
) -> AttemptResult:
    """Stream one request from ``peer_id``; tokens go to ``on_token`` as they are verified.

    Returns with ``result.done`` set, or raises an ``AttemptFailed`` with the tokens received
    so far left in ``result`` (pass one in to keep them). Until the peer's first frame (it
    answers at once: accepted, busy or refused) the wait is ``accept_timeout``; after it, any
    gap between frames over ``stall_timeout`` is a stall (a queued request gets a frame
    every second, so waiting for a slot is not one).
    """

    res = result or AttemptResult(peer_id)
    res.t_start = time.perf_counter()
    payload = wire.encode(request)
    verifier = wire.ReplyVerifier(peer_id, protocol.INFER, request.request_id, wire.request_digest(payload))
    try:
        with trio.fail_after(accept_timeout), trace.span("infer stream", peer=peer_id[-8:]):
            stream = await new_stream(host, peer_id, [protocol.INFER], first=wire.frame(payload))
    except trio.TooSlowError as exc:
        raise Stalled(f"no stream to {peer_id} within {accept_timeout:g}s") from exc
    except Exception as exc:
        raise StreamBroken(f"cannot open a stream to {peer_id}: {_describe(exc)}") from exc
    reader = wire.FrameReader(stream)
    finished = False
    wait = accept_timeout
    try:
        while True:
            try:
                with trio.fail_after(wait):
                    raw = await reader.read_frame()
            except trio.TooSlowError as exc:
                raise Stalled(f"nothing from {peer_id} for {wait:g}s") from exc
            except wire.ProtocolError as exc:
                raise IntegrityFailure(f"{peer_id} broke the framing: {exc}") from exc
            except Exception as exc:
                raise StreamBroken(f"stream from {peer_id} broke: {exc or type(exc).__name__}") from exc
            wait = stall_timeout
            if raw is None:
                raise StreamBroken(f"{peer_id} closed the stream before finishing")
            try:
                msg = verifier.open(raw)
            except wire.IntegrityError as exc:
                raise IntegrityFailure(f"{peer_id}: {exc}") from exc
            if isinstance(msg, wire.Token):
                now = time.perf_counter()
                if not res.t_first:
                    trace.mark("first token", peer=peer_id[-8:])
                res.t_first = res.t_first or now
                res.t_last = now
                res.ids.extend(msg.ids)
                res.text += msg.text
                res.transcript = msg.transcript
                on_token(msg.ids, msg.text)
            elif isinstance(msg, wire.Queued):
                continue  # alive, waiting for a slot or computing the prompt
            elif isinstance(msg, wire.Accepted):
                res.model_id = msg.model_id
            elif isinstance(msg, wire.Done):
                res.done = msg
                finished = True
                return res
            elif isinstance(msg, wire.Busy):
                finished = True
                raise PeerBusy(f"{peer_id} is busy ({msg.reason})", msg.retry_after_ms)
            elif isinstance(msg, wire.Error):
                finished = True
                raise RemoteError(msg.code, msg.message)
    finally:
        await finish_stream(stream, reset=not finished)


async def ping(host: Any, peer_id: str, timeout: float = 2.0) -> tuple[float, wire.Pong]:
    """Round-trip time (ms) and the signed live load of ``peer_id``."""
    import os

    nonce = os.urandom(16)
    payload = wire.encode(wire.Ping(nonce))
    t0 = time.perf_counter()
    try:
        with trio.fail_after(timeout), trace.span("ping", peer=peer_id[-8:]):
            stream = await new_stream(host, peer_id, [protocol.PING], first=wire.frame(payload))
            raw = await wire.FrameReader(stream).read_frame()
    except trio.TooSlowError as exc:
        raise Stalled(f"no pong from {peer_id} within {timeout:g}s") from exc
    except Exception as exc:
        raise StreamBroken(f"cannot ping {peer_id}: {_describe(exc)}") from exc
    rtt_ms = (time.perf_counter() - t0) * 1000
    await finish_stream(stream)
    if raw is None:
        raise StreamBroken(f"{peer_id} closed the ping stream")
    try:
        msg = wire.ReplyVerifier(peer_id, protocol.PING, nonce, wire.request_digest(payload)).open(raw)
    except wire.IntegrityError as exc:
        raise IntegrityFailure(f"{peer_id}: {exc}") from exc
    if not isinstance(msg, wire.Pong):
        raise IntegrityFailure(f"{peer_id} answered a ping with {type(msg).__name__}")
    return rtt_ms, msg


def _describe(exc: BaseException) -> str:
    """An exception and what caused it (py-libp2p wraps the useful part as the cause)."""
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__
    return f"{text} ({cause or type(cause).__name__})" if cause is not None else text
