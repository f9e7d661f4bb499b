"""A ``Swarm`` answered by this machine's agent: what ``Swarm()``, the gateway and the TUI use
when an agent runs, so that one machine is one presence in the swarm.

``RemoteCore`` has the methods of ``swarm._Core`` that ``Swarm`` calls, each one request over
the agent's unix socket (``agent/protocol.py``), its events rebuilt by ``codec`` into the very
objects the in-process core yields and raises. Each request carries this handle's limits
(``attempts``, ``stall_timeout``, ``deadline``, fixed ``peers``) and bootstrap peers, so that
the agent asks as this handle would. An agent that has gone (idle exit, crash) is started
again, as a thin command would; one of another version is replaced.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import trio

from ..agent.client import AgentError, quiet_s, start, start_argv, stop
from ..agent.paths import AgentFiles
from ..agent.protocol import MAX_LINE, VERSION, dump, load
from ..config import Settings
from ..dht.records import Advert
from .codec import decode_error, decode_event, decode_stream
from .pull import Progress, SwarmPull
from .swarm import Answer, PeerStatus, Plan, StreamEvent, SwarmError, SwarmEvent, answer_of, to_messages


class NoAgent(Exception):
    """No agent answers, and this handle may not start one."""


class _Lines:
    """JSON lines from a trio stream, each read bounded by ``quiet`` seconds."""

    def __init__(self, stream: trio.SocketStream, quiet: float) -> None:
        self.stream = stream
        self.quiet = quiet
        self.buf = b""

    async def next(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            with trio.move_on_after(self.quiet) as waited:
                data = await self.stream.receive_some(65536)
            if waited.cancelled_caught:
                raise SwarmError(f"the agent sent nothing for {self.quiet:.0f} s; it may be stuck: "
                                 "gputorrent agent stop, or Swarm(agent=False)")
            if not data:
                raise SwarmError("the agent closed the connection mid-answer (see: gputorrent agent status)")
            self.buf += data
            if len(self.buf) > MAX_LINE:
                raise SwarmError("the agent sent a line too long to be one event")
        line, self.buf = self.buf.split(b"\n", 1)
        return load(line)


class RemoteCore:
    """The agent's swarm, as ``Swarm`` uses its own core."""

    def __init__(self, settings: Settings, *, may_start: bool, direct: Sequence[str] = (),
                 attempts: int | None = None, stall_timeout: float | None = None,
                 deadline: float | None = None) -> None:
        self.settings = settings
        self.files = AgentFiles.of(settings)
        self.may_start = may_start
        self.direct = list(direct)
        self.attempts = attempts
        self.stall_timeout = stall_timeout
        self.deadline = deadline
        self.peer_id = ""

    # --- requests -----------------------------------------------------------------------------

    def _request(self, op: str, **fields: Any) -> dict[str, Any]:
        return {"op": op, "version": VERSION, "bootstrap": list(self.settings.bootstrap),
                "peers": self.direct, "attempts": self.attempts, "stall_timeout": self.stall_timeout,
                "deadline": self.deadline, **fields}

    async def _events(self, op: str, **fields: Any) -> AsyncGenerator[dict[str, Any], None]:
        """The agent's events for one request, up to and with the one that ends it; an error
        event is raised as the exception it stands for."""
        req = self._request(op, **fields)
        quiet = math.inf if op == "events" else quiet_s(req)
        for _ in range(3):
            try:
                stream = await trio.open_unix_socket(str(self.files.socket))
            except (FileNotFoundError, ConnectionRefusedError):
                if not self.may_start:
                    raise NoAgent from None
                await self._start()
                continue
            async with stream:
                await stream.send_all(dump(req))
                lines = _Lines(stream, quiet)
                first = await lines.next()
                if first.get("t") == "mismatch":  # an agent of another version: replace it
                    if not self.may_start:
                        raise NoAgent
                    await trio.to_thread.run_sync(stop, self.files)
                    continue
                ev = first
                while True:
                    if ev.get("t") == "error":
                        raise decode_error(ev)
                    yield ev
                    if ev.get("end"):
                        return
                    ev = await lines.next()
        raise SwarmError(f"no agent answered at {self.files.socket}; see {self.files.log}, or use Swarm(agent=False)")

    async def _one(self, op: str, **fields: Any) -> dict[str, Any]:
        last: dict[str, Any] = {}
        async for ev in self._events(op, **fields):
            last = ev
        return last

    async def _start(self) -> None:
        try:
            await trio.to_thread.run_sync(start, self.files, start_argv(self.settings))
        except AgentError as exc:
            raise SwarmError(str(exc)) from None

    # --- what Swarm calls ---------------------------------------------------------------------

    async def open(self) -> None:
        """Reach the agent (``NoAgent`` when none runs and none may be started). From here on it
        is started again if it goes: this handle has the agent's identity now."""
        hello = await self._one("hello")
        self.peer_id = str(hello["peer_id"])
        self.may_start = True
        if self.settings.bootstrap:
            await self._one("join")

    async def close(self) -> None:
        return None

    async def join(self, addrs: Sequence[str]) -> None:
        new = [a for a in addrs if a not in self.settings.bootstrap]
        if new:
            self.settings = self.settings.with_overrides(bootstrap=[*self.settings.bootstrap, *new])
            await self._one("join")

    async def peers(self, model: str | None = None, ping: bool = False, max_age: float = 0.0) -> list[PeerStatus]:
        rows = (await self._one("peers", model=model, ping=ping, max_age=max_age)).get("rows", [])
        return [PeerStatus.from_dict(row["json"]) for row in rows]

    async def rank(self, model: str | None = None) -> Plan:
        got = await self._one("rank", model=model)
        return Plan(got["model"], msgspec.convert(got["order"], list[Advert]))

    async def stream(self, prompt: Any = None, *, plan: Plan | None = None,
                     **kw: Any) -> AsyncGenerator[StreamEvent, None]:
        """As the in-process core streams; a ``plan`` from ``rank`` names the model (the agent
        ranks again from its own warm view: a plan is not sent across)."""
        if plan is not None and kw.get("model") is None:
            kw["model"] = plan.model
        if prompt is not None and not isinstance(prompt, str):
            prompt = [{"role": m.role, "content": m.content} for m in to_messages(prompt)]
        async for ev in self._events("stream", prompt=prompt, kw=kw):
            yield decode_stream(ev)

    async def generate(self, prompt: Any = None, **kw: Any) -> Answer:
        return await answer_of(self.stream(prompt, **kw))

    async def set_banned(self, peer_id: str, banned: bool) -> str:
        got = await self._one("breakers", **{"ban" if banned else "reset": [peer_id]})
        return str(got.get("states", {}).get(peer_id, ""))

    async def events(self) -> AsyncGenerator[SwarmEvent, None]:
        async for ev in self._events("events"):
            yield decode_event(ev)

    async def pull(self, spec: str, where: Path, progress: Progress | None = None) -> SwarmPull:
        async for ev in self._events("pull", model=spec, models_dir=str(where)):
            if ev.get("t") == "progress" and progress is not None:
                progress(*ev["progress"])
            elif ev.get("t") == "pulled":
                return SwarmPull.from_dict(ev["pull"])
        raise SwarmError("the agent's pull ended without a result")
