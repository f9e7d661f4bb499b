"""Ask for an answer from a list of candidate peers, failing over mid-answer.

The requester keeps the token ids it has received. When a peer drops, stalls, is busy or fails
verification, the next candidate gets the same prompt plus those ids and continues; once a
model id is known, only a peer serving that same id may continue, so greedy output is token
for token what one healthy peer would have produced.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import msgspec

from .. import wire
from .client import AttemptFailed, AttemptResult, run_attempt
from .host import DialError, connect


@dataclass(slots=True)
class Attempt:
    peer_id: str
    outcome: str  # "ok", or an AttemptFailed outcome: busy, error, dropped, stalled, integrity
    tokens: int = 0
    error: str = ""


@dataclass(slots=True)
class Answer:
    text: str
    peer_id: str
    model_id: str
    finish_reason: str
    usage: dict[str, int]
    ttft_ms: float
    tokens_per_s: float
    receipt_verified: bool
    receipt: str = ""  # the transcript hash the serving peer signed in its Done frame (hex)
    attempts: list[Attempt] = field(default_factory=list)
    spot_check: Any = None  # a verify.SpotCheck when the answer was cross-checked

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AskFailed(Exception):
    """No candidate finished the answer; ``attempts`` says what was tried.

    ``kind`` is for callers that map failures to status codes: ``no_peers`` (nothing serves
    anything), ``unknown_model``, ``unavailable`` (every candidate unreachable or its breaker
    open), ``busy`` (every attempt got Busy), ``failed`` (anything else).
    """

    def __init__(self, message: str, attempts: list[Attempt], partial_text: str = "", kind: str = "") -> None:
        super().__init__(message)
        self.attempts = attempts
        self.partial_text = partial_text
        self.kind = kind or ("busy" if attempts and all(a.outcome == "busy" for a in attempts) else "failed")


def new_request_id() -> bytes:
    return os.urandom(16)


async def ask(
    host: Any,
    candidates: Sequence[str | Sequence[str]],
    *,
    messages: list[wire.ChatMessage] | None = None,
    prompt: str | None = None,
    model: str = "",
    params: wire.Params = wire.Params(),
    on_text: Callable[[str], None] = lambda _t: None,
    max_attempts: int = 3,
    stall_timeout: float = 10.0,
    before_attempt: Callable[[str], None] = lambda _peer_id: None,
    after_attempt: Callable[[Attempt, AttemptResult], None] = lambda _a, _r: None,
) -> Answer:
    """Stream an answer from the first candidate that completes it.

    ``candidates`` are peers, best first: each a full multiaddr, or the list of a peer's
    multiaddrs. Raises ``AskFailed`` when none finishes within ``max_attempts``.
    """
    base = wire.validate_request(wire.InferRequest(
        request_id=new_request_id(), model=model, messages=messages, prompt=prompt, params=params,
    ))
    attempts: list[Attempt] = []
    ids: list[int] = []
    text_parts: list[str] = []
    model_id = ""
    t0 = time.perf_counter()
    t_first: float | None = None
    t_last: float | None = None

    def on_token(new_ids: list[int], text: str) -> None:
        nonlocal t_first, t_last
        t_last = time.perf_counter()
        t_first = t_first or t_last
        ids.extend(new_ids)
        text_parts.append(text)
        on_text(text)

    for addr in list(candidates)[: max(1, max_attempts)]:
        remaining = params.max_tokens - len(ids)
        request = wire.InferRequest(
            request_id=new_request_id(), model=model_id or model, messages=base.messages,
            prompt=base.prompt, params=msgspec.structs.replace(params, max_tokens=max(1, remaining)),
            resume_ids=list(ids),
        )
        res = AttemptResult(peer_id_of(addr))
        before_attempt(res.peer_id)
        try:
            peer_id = await connect(host, addr)
        except DialError as exc:
            attempts.append(Attempt(peer_id=res.peer_id, outcome="unreachable", error=str(exc)))
            after_attempt(attempts[-1], res)
            continue
        try:
            await run_attempt(host, peer_id, request, on_token, stall_timeout=stall_timeout, result=res)
        except AttemptFailed as exc:
            model_id = model_id or res.model_id
            attempts.append(Attempt(peer_id, exc.outcome, len(res.ids), str(exc)))
            after_attempt(attempts[-1], res)
            if not exc.retry:
                break
            continue
        done = res.done
        assert done is not None
        attempts.append(Attempt(peer_id, "ok", len(res.ids)))
        after_attempt(attempts[-1], res)
        completion = len(ids) - len(res.ids) + done.usage.completion_tokens
        decode_s = (t_last - t_first) if (t_first and t_last and t_last > t_first) else 0.0
        return Answer(
            text="".join(text_parts),
            peer_id=peer_id,
            model_id=res.model_id or model_id,
            finish_reason=done.finish_reason,
            usage={"prompt_tokens": done.usage.prompt_tokens - len(request.resume_ids),
                   "completion_tokens": completion},
            ttft_ms=round(((t_first or time.perf_counter()) - t0) * 1000, 2),
            tokens_per_s=round((len(ids) - 1) / decode_s, 2) if decode_s else 0.0,
            receipt_verified=True,  # run_attempt returns only after Done's receipt verified
            receipt=done.transcript.hex(),
            attempts=attempts,
        )
    tried = "; ".join(f"{a.peer_id[:16]}…: {a.outcome} ({a.error})" for a in attempts) or "no candidates"
    raise AskFailed(f"no peer finished the answer after {len(attempts)} attempt(s): {tried}",
                    attempts, "".join(text_parts))


def peer_id_of(addr: str | Sequence[str]) -> str:
    addr = addr if isinstance(addr, str) else (addr[0] if addr else "")
    return addr.rsplit("/p2p/", 1)[-1] if "/p2p/" in addr else addr
