"""The serving side of ``/gputorrent/infer/3``: one handler per libp2p stream.

Every reply is signed (``wire.ReplySigner``). Nothing a requester sends can take the process
down: a malformed, oversized or invalid frame gets a signed ``Error`` and the stream closes,
and the handler's failures stay inside that stream. The stream's reader keeps running while
the model computes (yamux resets a stream whose reader stalls past 5 s), and it is also how
the server learns that a requester left, which frees the slot at once.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from .. import protocol, wire
from ..engine import EngineError, Failed, Finished, Tokens
from ..engine.streaming import EventChannel
from ..identity import Identity
from ..models import ModelInfo
from ..net.host import is_relayed_stream, remote_peer_id
from .device import free_memory_mb
from .faults import Fault

log = logging.getLogger("gputorrent.server")

FIRST_FRAME_TIMEOUT = 10.0
# Token frames are coalesced: the first goes out at once, later tokens wait to share a frame,
# for 20 ms per active stream (so a busy peer sends ~50 frames/s in all, not 50 per stream),
# at most 250 ms. Each frame costs the requester ~1 ms of CPU in py-libp2p; at GPU speeds
# (1,000+ tokens/s) one frame per token would cost more than the decode.
COALESCE_S = 0.020
COALESCE_MAX_S = 0.250
# Through a relay every frame costs three processes (the relay decrypts and re-encrypts it, and
# both ends run Noise twice, inside and outside the circuit): frames wait up to 100 ms there.
# Measured in the NAT lab on 2 cores: 20 ms windows gave 0.72x direct decode (docs/benchmarks.md).
RELAYED_COALESCE_S = 0.100
# The announced tokens/s follows real answers: an exponential average over answers of at
# least MIN_MEASURED tokens (shorter ones time mostly the first token, not decoding).
SPEED_ALPHA = 0.3
MIN_MEASURED = 8
RATE_WINDOW_S = 10.0
# While a request waits for a slot or its prompt computes, a signed Queued frame goes out
# this often: the requester's stall timer counts from the last frame of any kind.
HEARTBEAT_S = 1.0
# Requesters the rate limiter remembers (least recently heard from forgotten first): memory
# stays bounded however many peer ids an attacker makes up, and each request costs O(1).
MAX_REQUESTERS = 10_000


@dataclass(slots=True)
class ServerStats:
    served: int = 0
    failed: int = 0
    cancelled: int = 0  # the requester went away (Ctrl-C, failover elsewhere): not our failure
    refused: int = 0
    tokens: int = 0
    _sent: deque[tuple[float, int]] = field(default_factory=deque)

    def count_tokens(self, n: int, now: float) -> None:
        self.tokens += n
        self._sent.append((now, n))
        while self._sent and now - self._sent[0][0] > RATE_WINDOW_S:
            self._sent.popleft()

    def recent_tokens_per_s(self, now: float) -> float:
        """Tokens sent per second over the last few seconds, all streams together."""
        n = sum(k for t, k in self._sent if now - t <= RATE_WINDOW_S)
        return round(n / RATE_WINDOW_S, 1)


def _ignore(_event: dict[str, Any]) -> None:
    pass


@dataclass(slots=True)
class InferServer:
    identity: Identity
    engine: Any  # LlamaEngine, or anything with its interface
    model: ModelInfo
    queue_limit: int = 8
    fault: Fault | None = None
    tokens_per_s: float = 0.0
    allow: frozenset[str] | None = None  # requester peer ids served; None serves everyone
    rate_limit: int = 0  # requests per minute per requester; 0 is no limit
    first_frame_timeout: float = FIRST_FRAME_TIMEOUT
    free_memory: Callable[[], int] = free_memory_mb
    on_event: Callable[[dict[str, Any]], None] = _ignore  # structured events, for logs and views
    ledger: Any = None  # scoring.ledger.Ledger: whom this machine received from (reciprocity); None: FIFO
    stats: ServerStats = field(default_factory=ServerStats)
    _recent: OrderedDict[str, deque[float]] = field(default_factory=OrderedDict)  # least recent first
    _memory: tuple[float, int] = (-math.inf, 0)  # (trio time, MB) of the last free-memory reading
    _memory_reading: bool = False

    async def free_memory_now(self) -> int:
        """Free memory for pongs, read at most once a second in a worker thread (NVML, or
        ``nvidia-smi`` with its own 10 s timeout, must never block the event loop). A ping
        waits 0.2 s at most for a reading; past that it gets the last one."""
        now = trio.current_time()
        if now - self._memory[0] >= 1.0 and not self._memory_reading:
            self._memory_reading = True
            try:
                with trio.move_on_after(0.2):
                    self._memory = (now, await trio.to_thread.run_sync(self.free_memory,  # type: ignore[call-arg]
                                                                               abandon_on_cancel=True))
            finally:
                self._memory_reading = False
        return self._memory[1]

    def _note(self, event: str, **fields: Any) -> None:
        try:
            self.on_event({"ts": round(time.time(), 3), "event": event} | fields)
        except Exception:  # a broken log sink must not break serving
            log.exception("event sink failed")

    def _learn_speed(self, completion_tokens: int, decode_ms: float) -> float:
        """Fold one answer's decode speed into the announced tokens/s; returns the answer's."""
        if completion_tokens < MIN_MEASURED or decode_ms <= 0:
            return 0.0
        rate = (completion_tokens - 1) / (decode_ms / 1000)
        old = self.tokens_per_s
        self.tokens_per_s = round(rate if old <= 0 else (1 - SPEED_ALPHA) * old + SPEED_ALPHA * rate, 1)
        return round(rate, 1)

    def _rate_limited(self, requester: str) -> float:
        """Seconds until ``requester`` may ask again (0: now); counts this request if allowed."""
        if self.rate_limit <= 0:
            return 0.0
        now = trio.current_time()
        recent = self._recent.get(requester)
        if recent is None:
            recent = self._recent[requester] = deque()
            if len(self._recent) > MAX_REQUESTERS:  # forget the one heard from longest ago: O(1)
                self._recent.popitem(last=False)
        else:
            self._recent.move_to_end(requester)
        while recent and now - recent[0] >= 60.0:
            recent.popleft()
        if len(recent) >= self.rate_limit:
            return 60.0 - (now - recent[0])
        recent.append(now)
        return 0.0

    async def handle(self, stream: Any) -> None:
        """libp2p stream handler; never raises."""
        try:
            await self._serve(stream)
        except Exception as exc:  # noqa: BLE001 (the other side vanished mid-write, or a bug: keep serving others)
            gone = _went_away(exc)
            if gone:
                self.stats.cancelled += 1
            else:
                self.stats.failed += 1
            log.log(logging.DEBUG if gone else logging.WARNING, "infer stream ended with %r", exc)
            await _reset(stream)
            return
        await _close(stream)

    async def _serve(self, stream: Any) -> None:
        reader = wire.FrameReader(stream)
        payload = None
        # Only the wait for the request is bounded here; generation has its own deadline.
        with trio.move_on_after(self.first_frame_timeout):
            try:
                payload = await reader.read_frame()
            except wire.ProtocolError as exc:
                await self._refuse(stream, b"", b"", protocol.BAD_REQUEST, str(exc), malformed=True)
                return
        if payload is None:
            return
        try:
            req = wire.decode_inbound(payload)
        except wire.ProtocolError as exc:
            await self._refuse(stream, b"", payload, protocol.BAD_REQUEST, str(exc), malformed=True)
            return
        if not isinstance(req, wire.InferRequest):
            await self._refuse(stream, b"", payload, protocol.BAD_REQUEST, "expected a request frame first")
            return
        await self._generate(stream, reader, req, payload)

    async def handle_ping(self, stream: Any) -> None:
        """``/gputorrent/ping/1``: one signed ``Pong`` with live load; never raises."""
        try:
            with trio.move_on_after(self.first_frame_timeout):
                payload = await wire.FrameReader(stream).read_frame()
                ping = wire.decode_inbound(payload) if payload else None
                if not isinstance(ping, wire.Ping):
                    await self._refuse(stream, b"", payload or b"", protocol.BAD_REQUEST, "expected a ping")
                else:
                    load = self.engine.load()
                    signer = wire.ReplySigner(self.identity, protocol.PING, ping.nonce,
                                              wire.request_digest(payload or b""))
                    pong = wire.Pong(load.active, load.queued, load.slots, await self.free_memory_now(),
                                     self.tokens_per_s)
                    if self.fault and self.fault.kind == "sybil":  # claims the world, then answers Busy
                        pong = wire.Pong(0, 0, 1 << 20, 1 << 30, 1e6)
                    await stream.write(signer.seal(pong))
        except Exception as exc:  # noqa: BLE001 (a ping stream that fails ends that stream only)
            log.debug("ping stream ended with %r", exc)
            await _reset(stream)
            return
        await _close(stream)

    async def _turned_away(self, stream: Any, signer: wire.ReplySigner, requester: str) -> bool:
        """Refuse (signed) a requester outside the allowlist or past its rate; True if refused."""
        if self.allow is not None and requester not in self.allow:
            await self._refuse_signed(stream, signer, requester, protocol.NOT_ALLOWED,
                                      f"this peer serves only its allowlist; ask its operator to add {requester}")
            return True
        wait_s = self._rate_limited(requester)
        if wait_s > 0:
            await self._busy(stream, signer, requester, int(wait_s * 1000) + 1,
                             f"rate limit: {self.rate_limit} requests/minute")
            return True
        return False

    async def _refuse(self, stream: Any, request_id: bytes, payload: bytes, code: str, message: str,
                      malformed: bool = False) -> None:
        self.stats.refused += 1
        self._note("refused", requester=remote_peer_id(stream), code=code, reason=message,
                   **({"malformed": True} if malformed else {}))
        signer = wire.ReplySigner(self.identity, protocol.INFER, request_id, wire.request_digest(payload))
        await stream.write(signer.seal(wire.Error(code, message)))

    def _prompt_ids(self, req: wire.InferRequest) -> list[int]:
        """Templating and tokenizing: run in a worker thread (a big prompt takes seconds)."""
        if (req.messages is None) == (req.prompt is None):
            raise ValueError("give exactly one of messages or prompt")
        if req.messages is not None:
            return self.engine.encode_chat(req.messages)
        return self.engine.encode_prompt(req.prompt)

    async def _generate(self, stream: Any, reader: wire.FrameReader, req: wire.InferRequest, payload: bytes) -> None:
        signer = wire.ReplySigner(self.identity, protocol.INFER, req.request_id, wire.request_digest(payload))
        fault = self.fault
        requester = remote_peer_id(stream)
        rid = req.request_id.hex()
        if await self._turned_away(stream, signer, requester):
            return
        if not self.model.matches(req.model):
            await self._refuse_signed(stream, signer, requester, protocol.UNKNOWN_MODEL,
                                      f"this peer serves {self.model.alias} ({self.model.short_id}), not "
                                      f"{req.model!r}; ask for that model or use another peer")
            return
        load = self.engine.load()
        if (fault and fault.kind in ("busy", "sybil")) or load.active + load.queued >= load.slots + self.queue_limit:
            await self._busy(stream, signer, requester, 1000, f"{load.active} active, {load.queued} queued")
            return
        owner = requester  # whose credit the request carries: its linked serving identity, else itself
        if req.link is not None:
            try:
                owner = wire.check_link(req.link, requester)
            except wire.LinkError as exc:
                await self._refuse_signed(stream, signer, requester, protocol.BAD_REQUEST,
                                          f"{exc}; ask without a link (as a guest), or link this key again")
                return
        try:
            prompt_ids = await trio.to_thread.run_sync(self._prompt_ids, req)
        except ValueError as exc:
            await self._refuse_signed(stream, signer, requester, protocol.BAD_REQUEST, str(exc))
            return
        credit = await trio.to_thread.run_sync(self.ledger.credit, owner) if self.ledger is not None else 0.0
        events = EventChannel()
        try:
            job = self.engine.make_job(prompt_ids, req.params, events.emit, forced=req.resume_ids)
        except EngineError as exc:
            code = protocol.CONTEXT_EXCEEDED if len(prompt_ids) >= self.engine.n_ctx else protocol.BAD_REQUEST
            await self._refuse_signed(stream, signer, requester, code, str(exc))
            return
        job.credit = credit
        self.engine.submit(job)
        self._note("accepted", requester=requester, request_id=rid, prompt_tokens=len(prompt_ids),
                   resumed_tokens=len(req.resume_ids), max_tokens=req.params.max_tokens,
                   **({"owner": owner} if owner != requester else {}), credit=round(credit, 1))
        try:
            await stream.write(signer.seal(wire.Accepted(self.model.model_id, len(prompt_ids), self.engine.n_ctx)))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_requester, reader, job, nursery.cancel_scope)
                with trio.move_on_after(req.deadline_ms / 1000) as deadline:
                    await self._pump(stream, signer, events, requester, rid, job, owner)
                if deadline.cancelled_caught:
                    job.cancel()
                    usage = wire.Usage(len(prompt_ids), 0)
                    await stream.write(signer.seal(wire.Done("deadline", usage, 0.0, 0.0, signer.transcript)))
                    self._note("done", requester=requester, request_id=rid, finish_reason="deadline")
                nursery.cancel_scope.cancel()
        finally:
            job.cancel()  # a no-op once finished; frees the slot if we left early

    async def _refuse_signed(self, stream: Any, signer: wire.ReplySigner, requester: str, code: str,
                             message: str) -> None:
        self.stats.refused += 1
        self._note("refused", requester=requester, code=code, reason=message)
        await stream.write(signer.seal(wire.Error(code, message)))

    async def _busy(self, stream: Any, signer: wire.ReplySigner, requester: str, retry_after_ms: int,
                    reason: str) -> None:
        self.stats.refused += 1
        self._note("busy", requester=requester, retry_after_ms=retry_after_ms, reason=reason)
        await stream.write(signer.seal(wire.Busy(retry_after_ms=retry_after_ms, reason=reason)))

    async def _pump(self, stream: Any, signer: wire.ReplySigner, events: EventChannel, requester: str,
                    rid: str, job: Any, owner: str = "") -> None:
        fault = self.fault
        ids: list[int] = []
        text: list[str] = []
        sent = 0
        last_write = -1.0  # last token frame: the coalescing window counts from it
        last_frame = trio.current_time()  # last frame of any kind: the heartbeat counts from it

        async def flush() -> None:
            nonlocal sent, last_write, last_frame
            if not ids:
                return
            out_ids, out_text = list(ids), "".join(text)
            ids.clear()
            text.clear()
            if fault and fault.kind == "wrong-tokens":
                out_ids, out_text = [(i + 1) % 49152 for i in out_ids], out_text[::-1] + "~"
            data = signer.seal(signer.token(out_ids, out_text))
            if fault and fault.kind == "corrupt-signature":
                data = data[:-1] + bytes([data[-1] ^ 0x01])  # the signature is the last field
            await stream.write(data)
            last_write = last_frame = trio.current_time()
            sent += len(out_ids)
            self.stats.count_tokens(len(out_ids), last_write)
            if fault and fault.kind == "die-after-tokens" and sent >= fault.n:
                os._exit(17)  # a peer dying mid-answer, abruptly, as a crash would
            if fault and fault.kind == "stall-after-tokens" and sent >= fault.n:
                await trio.sleep_forever()

        base = RELAYED_COALESCE_S if is_relayed_stream(stream) else COALESCE_S
        window = base
        while True:
            ev = None
            # Only the wait sits under the coalescing deadline: a write cut short would leave
            # a sequence number signed but never sent.
            with trio.move_on_at(last_write + window if ids else last_frame + HEARTBEAT_S):
                ev = await events.receive()
            if ev is None and not ids:
                # Nothing to send for a while: still queued, or still computing the prompt.
                # Writing also finds out at once when the requester has gone (a reset).
                await stream.write(signer.seal(wire.Queued(self.engine.queue_position(job))))
                last_frame = trio.current_time()
                continue
            if isinstance(ev, Tokens):
                ids.extend(ev.ids)
                text.append(ev.text)
                if trio.current_time() < last_write + window:
                    continue
                window = min(COALESCE_MAX_S, base * max(1, self.engine.load().active))
            await flush()  # a token after a quiet spell, the window closing, or the end
            if isinstance(ev, Finished):
                self.stats.served += 1
                if self.ledger is not None and ev.completion_tokens:
                    await trio.to_thread.run_sync(functools.partial(self.ledger.add, owner or requester,
                                                                    served=ev.completion_tokens))
                rate = self._learn_speed(ev.completion_tokens, ev.decode_ms)
                await stream.write(signer.seal(wire.Done(
                    ev.reason, wire.Usage(ev.prompt_tokens, ev.completion_tokens),  # type: ignore[arg-type]
                    round(ev.ttft_ms, 3), round(ev.decode_ms, 3), signer.transcript,
                )))
                self._note("done", requester=requester, request_id=rid, finish_reason=ev.reason,
                           prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens,
                           ttft_ms=round(ev.ttft_ms, 1), decode_ms=round(ev.decode_ms, 1),
                           queue_ms=round(ev.queue_ms, 1), tokens_per_s=rate)
                return
            if isinstance(ev, Failed):
                self.stats.failed += 1
                self._note("failed", requester=requester, request_id=rid, reason=ev.message)
                await stream.write(signer.seal(wire.Error(protocol.ENGINE, ev.message)))
                return


async def _watch_requester(reader: wire.FrameReader, job, scope: trio.CancelScope) -> None:
    """Keep reading while the model computes. A ``Cancel`` or a broken stream stops the job
    at once; a clean end of stream is a half-close (the requester still reads), so it does not."""
    try:
        while (payload := await reader.read_frame()) is not None:
            if isinstance(wire.decode_inbound(payload), wire.Cancel):
                break
        else:
            return
    except Exception as exc:  # noqa: BLE001 (usually a reset: how a requester that cancels or quits leaves)
        log.log(logging.DEBUG if _went_away(exc) else logging.WARNING,
                "requester stream ended while generating (%r); cancelling its job", exc)
    job.cancel()
    scope.cancel()


def _went_away(exc: BaseException) -> bool:
    """The other side reset or closed the stream: routine, not worth an operator's attention
    (also when it comes wrapped in a nursery's exception group)."""
    from libp2p.exceptions import BaseLibp2pError

    if isinstance(exc, BaseExceptionGroup):
        return all(_went_away(e) for e in exc.exceptions)
    return isinstance(exc, (BaseLibp2pError, EOFError, ConnectionError, trio.BrokenResourceError))


async def _close(stream: Any) -> None:
    with trio.move_on_after(2):
        try:
            await stream.close()
        except Exception:  # noqa: BLE001, S110 (closing a stream the other side may have reset is best effort)
            pass


async def _reset(stream: Any) -> None:
    with trio.move_on_after(2):
        try:
            await stream.reset()
        except Exception:  # noqa: BLE001, S110 (resetting a dead stream is best effort)
            pass
