"""Ask for an answer from a list of candidate peers, failing over mid-answer.

The requester keeps the token ids it has received. When a peer drops, stalls, is busy or fails
verification, the next candidate (re-ranked from the live view, never one that failed in this
request) gets the same prompt plus those ids; it replays them as its own first samples, one
decode step each, and continues. Once a model id is known only a peer serving that same id may
continue, so greedy output is token for token what one healthy peer would have produced.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import trio

from .. import wire
from ..errors import GputorrentError
from ..identity import short_id
from ..net.host import DialError, connect, dialed_addr, path_of
from ..net.relay import is_relayed, relay_part
from .client import AttemptFailed, AttemptResult, PeerBusy, Stalled, run_attempt


@dataclass(slots=True)
class Attempt:
    peer_id: str
    outcome: str  # "ok", or an AttemptFailed outcome: busy, error, dropped, stalled, integrity
    tokens: int = 0
    error: str = ""
    path: str = ""  # how the peer was reached: direct, relayed, hole-punched ("" if not at all)


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
    chain: list[dict[str, Any]] = field(default_factory=list)  # the hops, when shards computed it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Answer:
        """The answer ``to_dict`` wrote (from the agent, which asked on a client's behalf)."""
        from .verify import SpotCheck

        check = d.get("spot_check")
        return cls(**{**d, "attempts": [Attempt(**a) for a in d.get("attempts") or []],
                      "spot_check": SpotCheck(**check) if isinstance(check, dict) else None})


class AskFailed(GputorrentError):
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


class Candidates(Protocol):
    """Where the next peer to try comes from: re-ranked from a live view for every attempt."""

    async def next(self, tried: set[str], model_id: str) -> list[str] | None:
        """The addresses of the best peer not in ``tried`` (serving ``model_id`` once it is
        known), or ``None`` when there is none left."""
        ...


class FixedCandidates:
    """Peers given up front (``--peer``), tried in order."""

    def __init__(self, candidates: Sequence[str | Sequence[str]]) -> None:
        self._order = [[c] if isinstance(c, str) else list(c) for c in candidates]

    async def next(self, tried: set[str], model_id: str) -> list[str] | None:
        return next((c for c in self._order if peer_id_of(c) not in tried), None)


NO_ADDRESS = ("it advertises no address: it is behind NAT and no relay holds a reservation for it "
              "(a public peer with the relay service on would give it one)")
NO_PATH = "every relay to it failed in this request"
BUSY_WAIT_MAX_S = 2.0
BUSY_ROUNDS = 1  # when everyone was busy: wait once, ask once more, then say the swarm is busy


async def ask(
    host: Any,
    candidates: Candidates | Sequence[str | Sequence[str]],
    *,
    messages: list[wire.ChatMessage] | None = None,
    prompt: str | None = None,
    model: str = "",
    params: wire.Params = wire.Params(),
    on_text: Callable[[str], None] = lambda _t: None,
    max_attempts: int | None = None,
    deadline_s: float = 600.0,
    stall_timeout: float = 10.0,
    accept_timeout: float | Callable[[str], float] = 5.0,
    dial_timeout: float = 3.0,
    before_attempt: Callable[[str], None] = lambda _peer_id: None,
    after_attempt: Callable[[Attempt, AttemptResult], None] = lambda _a, _r: None,
    link: wire.Link | None = None,
) -> Answer:
    """Stream an answer, failing over until a peer completes it.

    ``candidates`` re-ranks for every attempt (or is a fixed list of peers, each a full
    multiaddr or the list of a peer's multiaddrs). A peer that failed in this request is not
    asked again in it, except one that was only busy: once every other peer has been tried, the
    busy ones are asked once more after their retry-after (at most 2 s), and then the request
    fails as ``busy`` (a gateway answers 429) rather than waiting out its deadline.
    Attempts go on until the answer is done, no peer is left, ``deadline_s`` passes, or
    ``max_attempts`` (no cap by default). Raises ``AskFailed`` with every attempt.
    ``accept_timeout`` may be a function of the peer id (``SwarmView.accept_timeout``); ``link``
    (``wire.make_link``) carries this requester's serving identity, for the peers' reciprocity.
    """
    source: Candidates = candidates if hasattr(candidates, "next") else FixedCandidates(candidates)
    base = wire.validate_request(wire.InferRequest(
        request_id=new_request_id(), model=model, messages=messages, prompt=prompt, params=params,
    ))
    attempts: list[Attempt] = []
    ids: list[int] = []
    text_parts: list[str] = []
    model_id = ""
    t0 = time.perf_counter()
    deadline = trio.current_time() + deadline_s
    t_first: float | None = None
    t_last: float | None = None
    tried: set[str] = set()
    lost_relays: dict[str, set[str]] = {}  # peer -> relays whose circuit to it died in this request
    busy_until: dict[str, float] = {}
    busy_rounds = 0
    last: AttemptResult | None = None

    def on_token(new_ids: list[int], text: str) -> None:
        nonlocal t_first, t_last
        t_last = time.perf_counter()
        t_first = t_first or t_last
        ids.extend(new_ids)
        text_parts.append(text)
        on_text(text)

    def answer(res: AttemptResult, finish_reason: str, usage: dict[str, int], receipt: bytes) -> Answer:
        decode_s = (t_last - t_first) if (t_first and t_last and t_last > t_first) else 0.0
        return Answer(
            text="".join(text_parts), peer_id=res.peer_id, model_id=res.model_id or model_id,
            finish_reason=finish_reason, usage=usage,
            ttft_ms=round(((t_first or time.perf_counter()) - t0) * 1000, 2),
            tokens_per_s=round((len(ids) - 1) / decode_s, 2) if decode_s else 0.0,
            receipt_verified=True,  # every frame, and Done's receipt, verified before use
            receipt=receipt.hex(), attempts=attempts,
        )

    while True:
        if last is not None and len(ids) >= params.max_tokens:
            # The last peer sent every token asked for and died before its Done: the answer is
            # complete. Its last token frame signed the transcript, which stands as the receipt.
            return answer(last, "length", {"prompt_tokens": 0, "completion_tokens": len(ids)}, last.transcript)
        left = deadline - trio.current_time()
        if left <= 0 or (max_attempts is not None and len(attempts) >= max_attempts):
            break
        addr = None
        with trio.move_on_after(left):
            addr = await source.next(tried, model_id)
        if addr is None:
            waiting = {p: t for p, t in busy_until.items() if p in tried}
            if not waiting or left <= 0 or busy_rounds >= BUSY_ROUNDS:
                break
            busy_rounds += 1
            # Everyone left was busy: wait for the first to have room (briefly), then ask again.
            await trio.sleep(max(0.0, min(min(waiting.values()) - trio.current_time(), BUSY_WAIT_MAX_S, left)))
            tried -= set(waiting)
            busy_until.clear()
            continue
        request = wire.InferRequest(
            request_id=new_request_id(), model=model_id or model, messages=base.messages,
            prompt=base.prompt, params=params, resume_ids=list(ids),
            deadline_ms=max(1, min(int(left * 1000), 3_600_000)), link=link,
        )
        res = AttemptResult(peer_id_of(addr))
        tried.add(res.peer_id)
        before_attempt(res.peer_id)
        peer_id, error = "", f"no connection within {min(dial_timeout, left):g}s"
        addrs = _paths_left(addr, lost_relays.get(res.peer_id, set()))
        with trio.move_on_after(min(dial_timeout, left)):
            try:
                peer_id = await connect(host, addrs) if addrs else ""
                error = error if addrs else NO_PATH if _paths_left(addr, set()) else NO_ADDRESS
            except DialError as exc:
                error = str(exc)
        if not peer_id:
            attempts.append(Attempt(res.peer_id, "unreachable", error=error))
            after_attempt(attempts[-1], res)
            continue
        path, via = path_of(host, peer_id), dialed_addr(host, peer_id)
        try:
            with trio.fail_after(max(left, 0.001)):
                await run_attempt(host, peer_id, request, on_token, stall_timeout=stall_timeout,
                                  accept_timeout=accept_timeout(peer_id) if callable(accept_timeout)
                                  else accept_timeout, result=res)
        except (AttemptFailed, trio.TooSlowError) as exc:
            failure = exc if isinstance(exc, AttemptFailed) else \
                Stalled(f"the request's deadline passed ({deadline_s:g}s)")
            model_id = model_id or res.model_id
            attempts.append(Attempt(peer_id, failure.outcome, len(res.ids), str(failure), path))
            after_attempt(attempts[-1], res)
            if res.ids:
                last = res
            if path == "relayed" and failure.outcome in ("dropped", "stalled") and is_relayed(via):
                # The circuit died, not necessarily the peer: it may be asked again through
                # another of its relays (then it is the same computation, resumed).
                lost_relays.setdefault(peer_id, set()).add(relay_part(via))
                if _paths_left(addr, lost_relays[peer_id]):
                    tried.discard(peer_id)
            if isinstance(failure, PeerBusy):
                busy_until[peer_id] = trio.current_time() + failure.retry_after_ms / 1000
            if not failure.retry:
                break
            continue
        done = res.done
        assert done is not None
        attempts.append(Attempt(peer_id, "ok", len(res.ids), path=path))
        after_attempt(attempts[-1], res)
        usage = {"prompt_tokens": done.usage.prompt_tokens, "completion_tokens": done.usage.completion_tokens}
        return answer(res, done.finish_reason, usage, done.transcript)
    tried_text = _summary(attempts)
    why = "the deadline passed" if deadline - trio.current_time() <= 0 else (
        "no attempt left" if max_attempts is not None and len(attempts) >= max_attempts else "no peer left to ask")
    raise AskFailed(f"no peer finished the answer ({why}) after {len(attempts)} attempt(s): {tried_text}",
                    attempts, "".join(text_parts))


def _paths_left(addr: str | Sequence[str], lost: set[str]) -> list[str]:
    """A peer's addresses less the circuits through relays that failed it in this request."""
    addrs = [addr] if isinstance(addr, str) else list(addr)
    return [a for a in addrs if not (is_relayed(a) and relay_part(a) in lost)]


def _summary(attempts: list[Attempt]) -> str:
    """What the attempts came to, short: counts by outcome, and the last error of each."""
    if not attempts:
        return "no peer to ask"
    last: dict[str, Attempt] = {}
    counts: dict[str, int] = {}
    for a in attempts:
        counts[a.outcome] = counts.get(a.outcome, 0) + 1
        last[a.outcome] = a
    return "; ".join(f"{n} {outcome} (last: {short_id(last[outcome].peer_id)}: {last[outcome].error[:160]})"
                     for outcome, n in counts.items())


def peer_id_of(addr: str | Sequence[str]) -> str:
    addr = addr if isinstance(addr, str) else (addr[0] if addr else "")
    return addr.rsplit("/p2p/", 1)[-1] if "/p2p/" in addr else addr
