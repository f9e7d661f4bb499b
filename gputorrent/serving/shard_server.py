"""The serving side of ``/gputorrent/shard/2``: one stream is one session on this shard.

The requester opens a session (``ShardOpen``), then sends steps one at a time and reads each
step's signed output. The session's KV cache lives in its own sequence slot of the shard engine
and is freed when the stream ends, is cancelled or reset, or sits idle for ``IDLE_S``. Admission
is the whole-model server's (allowlist, rate limit per requester, Busy when every slot is taken),
and, as there, nothing a requester sends gets past its own stream.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import trio

from .. import protocol, wire
from ..engine import EngineError, Failed
from ..engine.shard import IDLE_S, ShardEngine, StepJob, StepResult
from ..engine.streaming import EventChannel
from ..net.host import remote_peer_id
from .server import InferServer


@dataclass(slots=True)
class ShardServer(InferServer):
    """A peer holding blocks [engine.first, engine.end) of ``model``."""

    idle_s: float = IDLE_S

    async def handle_shard(self, stream: Any) -> None:
        """libp2p stream handler; never raises."""
        await self.handle(stream)

    async def _serve(self, stream: Any) -> None:
        engine: ShardEngine = self.engine
        reader = wire.FrameReader(stream)
        payload = None
        with trio.move_on_after(self.first_frame_timeout):
            payload = await reader.read_frame()
        if payload is None:
            return
        try:
            req = wire.decode_inbound(payload)
        except wire.ProtocolError as exc:
            await self._refuse_shard(stream, b"", payload, protocol.BAD_REQUEST, str(exc))
            return
        if not isinstance(req, wire.ShardOpen):
            await self._refuse_shard(stream, b"", payload, protocol.BAD_REQUEST, "expected a session to open first")
            return
        signer = wire.ReplySigner(self.identity, protocol.SHARD, req.request_id, wire.request_digest(payload))
        requester = remote_peer_id(stream)
        if await self._turned_away(stream, signer, requester):
            return
        if not self.model.matches(req.model):
            await self._refuse_signed(stream, signer, requester, protocol.UNKNOWN_MODEL,
                                      f"this peer holds blocks of {self.model.alias} ({self.model.short_id}), "
                                      f"not {req.model!r}")
            return
        if (req.first_block, req.end_block) != (engine.first, engine.end):
            await self._refuse_signed(stream, signer, requester, protocol.WRONG_BLOCKS,
                                      f"this peer holds blocks {engine.first}:{engine.end}, "
                                      f"not {req.first_block}:{req.end_block}")
            return
        prompt_ids: list[int] = []
        if engine.is_first and (req.messages is not None or req.prompt is not None):
            try:
                prompt_ids = await trio.to_thread.run_sync(self._prompt_ids, req)
            except ValueError as exc:
                await self._refuse_signed(stream, signer, requester, protocol.BAD_REQUEST, str(exc))
                return
        try:
            session = None if (self.fault and self.fault.kind == "busy") else engine.open(req.params)
        except EngineError as exc:
            await self._refuse_signed(stream, signer, requester, protocol.BAD_REQUEST, str(exc))
            return
        if session is None:
            load = engine.load()
            await self._busy(stream, signer, requester, 1000, f"{load.active} of {load.slots} sessions open")
            return
        self._note("accepted", requester=requester, request_id=req.request_id.hex(),
                   blocks=f"{engine.first}:{engine.end}", prompt_tokens=len(prompt_ids))
        try:
            await stream.write(signer.seal(wire.ShardReady(self.model.model_id, engine.n_ctx, prompt_ids)))
            await self._steps(stream, reader, signer, session, requester)
        finally:
            engine.close_session(session)

    async def _steps(self, stream: Any, reader: wire.FrameReader, signer: wire.ReplySigner, session: Any,
                     requester: str) -> None:
        engine: ShardEngine = self.engine
        events = EventChannel()
        done = 0
        while True:
            step, hidden = await self._read_step(reader, engine)
            if step is None:
                self.stats.served += 1
                return
            fault = self.fault
            if fault and fault.kind == "die-after-steps" and done >= fault.n:
                os._exit(17)  # a hop dying mid-answer, abruptly, as a crash would
            if fault and fault.kind == "stall-after-steps" and done >= fault.n:
                await trio.sleep_forever()
            digest = wire.step_digest(step, hidden)
            try:
                engine.check(session, step.pos, step.n, step.tokens, hidden)
                engine.submit(StepJob(session, step.n, step.tokens, hidden, step.sample, step.forced,
                                      events.emit))  # type: ignore[arg-type]
            except EngineError as exc:
                await self._refuse_signed(stream, signer, requester, protocol.BAD_REQUEST, str(exc))
                return
            out = await events.receive()
            if isinstance(out, Failed):
                self.stats.failed += 1
                await stream.write(signer.seal(wire.Error(protocol.ENGINE, out.message)))
                return
            assert isinstance(out, StepResult)
            done += 1
            if out.token >= 0:
                self.stats.count_tokens(1, trio.current_time())
            if fault and fault.kind == "wrong-hidden" and out.hidden:
                out = _perturbed(out)  # a lying hop: wrong states, validly signed
            await self._reply(stream, signer, digest, out, step.replay)

    async def _read_step(self, reader: wire.FrameReader, engine: ShardEngine) -> tuple[wire.ShardStep | None, bytes]:
        """The next step with its hidden parts joined; (None, b"") when the requester ends the
        session (end of stream, Cancel, or nothing for ``idle_s``)."""
        parts: list[bytes] = []
        first: wire.ShardStep | None = None
        while True:
            payload = None
            with trio.move_on_after(self.idle_s):
                payload = await reader.read_frame()
            if payload is None:
                return None, b""
            msg = wire.decode_inbound(payload)  # a ProtocolError ends the stream (handle resets it)
            if isinstance(msg, wire.Cancel):
                return None, b""
            if not isinstance(msg, wire.ShardStep):
                raise wire.ProtocolError("expected a step")
            first = first or msg
            parts.append(msg.hidden)
            if sum(map(len, parts)) > first.n * engine.row_bytes:
                raise wire.ProtocolError(f"more hidden bytes than {first.n} positions hold")
            if not msg.more:
                return first, b"".join(parts)

    async def _reply(self, stream: Any, signer: wire.ReplySigner, digest: bytes, out: StepResult, replay: bool) -> None:
        us = round(out.compute_s * 1e6)
        if replay:  # catching up: the requester has this output already
            await stream.write(signer.seal(signer.step(digest, token=out.token, finish=out.finish, compute_us=us)))
            return
        if not out.hidden:
            await stream.write(signer.seal(signer.step(digest, token=out.token, text=out.text, finish=out.finish,
                                                       compute_us=us)))
            return
        view = memoryview(out.hidden)
        for at in range(0, len(view), wire.HIDDEN_PART):
            part = bytes(view[at:at + wire.HIDDEN_PART])
            more = at + wire.HIDDEN_PART < len(view)
            await stream.write(signer.seal(signer.step(digest, part, more=more, compute_us=0 if more else us)))

    async def _refuse_shard(self, stream: Any, request_id: bytes, payload: bytes, code: str, message: str) -> None:
        self.stats.refused += 1
        self._note("refused", requester=remote_peer_id(stream), code=code, reason=message)
        signer = wire.ReplySigner(self.identity, protocol.SHARD, request_id, wire.request_digest(payload))
        await stream.write(signer.seal(wire.Error(code, message)))


def _perturbed(out: StepResult) -> StepResult:
    """``out`` with every other hidden dimension negated (fault ``wrong-hidden``): a scale alone
    would mostly vanish in the next block's norm."""
    from array import array

    states = array("f", out.hidden)
    for i in range(0, len(states), 2):
        states[i] = -states[i]
    return replace(out, hidden=states.tobytes())
