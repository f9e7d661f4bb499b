"""The agent process: one open ``Swarm`` served to this user's commands over a unix socket.

Started by ``client.start`` (or ``gputorrent agent run``), it joins the swarm once, then answers
requests (``protocol``) until ``stop``, SIGTERM or SIGINT, or ``idle_s`` without a request. Each
ask gets its own limits on the shared swarm (``Swarm.using``); a client that hangs up cancels
its request, as Ctrl-C does in-process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import trio

from ..api import Finished, Swarm
from ..api.codec import encode_error, encode_event, encode_stream
from ..config import Settings
from .ops import ask_events, listing
from .paths import AgentFiles
from .protocol import MAX_LINE, VERSION, dump, load

READ_S = 10.0  # a client has this long to send its request line


class Agent:
    def __init__(self, swarm: Swarm, files: AgentFiles, idle_s: float) -> None:
        self.swarm = swarm
        self.files = files
        self.idle_s = idle_s
        self.started = time.time()
        self.last = trio.current_time()
        self.in_flight = 0
        self.served = 0
        self.refused = 0
        self.stopping = trio.Event()

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "version": VERSION, "peer_id": self.swarm.peer_id,
                "socket": str(self.files.socket), "uptime_s": round(time.time() - self.started, 1),
                "requests": self.served, "in_flight": self.in_flight, "refused": self.refused,
                "idle_exit_s": self.idle_s, "lookups": self.swarm.lookups[0], "refreshes": self.swarm.lookups[1],
                "credited_to": self.swarm.credited_to}

    async def serve(self, listener: trio.SocketListener) -> None:
        async with trio.open_nursery() as n:
            n.start_soon(trio.serve_listeners, self.handle, [listener])
            n.start_soon(self._idle)
            await self.stopping.wait()
            n.cancel_scope.cancel()

    def stop(self, why: str) -> None:
        if not self.stopping.is_set():
            print(f"agent {os.getpid()} stops: {why}", file=sys.stderr, flush=True)
        self.stopping.set()

    async def _idle(self) -> None:
        while True:
            await trio.sleep(1.0)
            if self.in_flight == 0 and trio.current_time() - self.last > self.idle_s:
                self.stop(f"{self.idle_s:g} s without a request")

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            pid, uid = _peer_cred(stream.socket)
            if uid != os.getuid():
                self.refused += 1
                await _send(stream, {"t": "error", "message": "this agent serves its own user only", "end": True})
                return
            try:
                with trio.fail_after(READ_S):
                    req = load(await _read_line(stream))
            except (trio.TooSlowError, ValueError, trio.BrokenResourceError, trio.ClosedResourceError):
                return
            working = req.get("op") not in ("hello", "stop", "breakers")  # not use: they keep no agent alive
            self.in_flight += working
            try:
                await self._answer(stream, req, pid)
            except* (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client left: its request is cancelled with this task
            except* Exception as group:  # noqa: BLE001 (a bug of ours: this client's request ends, not the agent)
                print(f"agent: request {req.get('op')!r} of pid {pid} failed: {group.exceptions!r}", file=sys.stderr,
                      flush=True)
            finally:
                self.in_flight -= working
                self.served += working
                if working:
                    self.last = trio.current_time()

    async def _answer(self, stream: trio.SocketStream, req: dict[str, Any], pid: int) -> None:
        op = req.get("op")
        if op == "stop":  # any version's client may stop any agent: that is how one is replaced
            await _send(stream, {"t": "stopping", "end": True})
            self.stop(f"asked to by pid {pid}")
        elif req.get("version") != VERSION:
            await _send(stream, {"t": "mismatch", "version": VERSION, "end": True})
        elif op == "hello":
            await _send(stream, {"t": "hello", **self.info(), "end": True})
        elif op == "ask":
            await self._ask(stream, req)
        elif op in ("peers", "models"):
            await self._listing(stream, req)
        elif op in ("stream", "events", "rank", "pull", "join"):
            await _until_hang_up(stream, partial(self._api, stream, req))
        elif op == "breakers":  # peers --reset/--ban: into the agent's store, which caches records
            states = {pid: await self.swarm.unban(pid) for pid in req.get("reset") or []}
            states |= {pid: await self.swarm.ban(pid) for pid in req.get("ban") or []}
            await _send(stream, {"t": "breakers", "states": states, "end": True})
        else:
            await _send(stream, {"t": "error", "message": f"unknown op {op!r}", "end": True})

    async def _scoped(self, req: dict[str, Any]) -> Swarm:
        """The agent's swarm, joined by the client's bootstrap peers, with the client's limits."""
        await self.swarm.join(req.get("bootstrap") or [])
        return self.swarm.using(peers=req.get("peers") or None, attempts=req.get("attempts"),
                                stall_timeout=req.get("stall_timeout"), deadline=req.get("deadline"))

    async def _ask(self, stream: trio.SocketStream, req: dict[str, Any]) -> None:
        async def answer() -> None:
            try:
                swarm = await self._scoped(req)
            except Exception as exc:  # noqa: BLE001 (a SwarmError or a bad limit: the client prints it)
                await _send(stream, {"t": "error", "message": str(exc), "usage": isinstance(exc, ValueError),
                                     "end": True})
                return
            events = ask_events(swarm, req)
            try:
                async for ev in events:
                    await _send(stream, {**ev, "end": ev["t"] in ("done", "error")})
            finally:
                await events.aclose()

        await _until_hang_up(stream, answer)

    async def _api(self, stream: trio.SocketStream, req: dict[str, Any]) -> None:
        """The API's own calls, for ``Swarm()``, the gateway and the TUI through this agent
        (``remote.py``): their events, then an end, or the error that ``codec`` rebuilds."""
        op = req["op"]
        try:
            swarm = await self._scoped(req)
            if op == "stream":
                events = swarm.stream(req.get("prompt"), **req.get("kw", {}))
                try:
                    async for ev in events:
                        await _send(stream, {**encode_stream(ev), "end": isinstance(ev, Finished)})
                finally:
                    await events.aclose()
            elif op == "events":
                async for event in swarm.events():  # until the client hangs up
                    await _send(stream, encode_event(event))
            elif op == "rank":
                plan = await swarm.rank(req.get("model"))
                await _send(stream, {"t": "plan", "model": plan.model, "order": msgspec.to_builtins(plan.order),
                                     "end": True})
            elif op == "pull":
                await self._pull(stream, swarm, req)
            else:
                await _send(stream, {"t": "joined", "end": True})
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise
        except Exception as exc:  # noqa: BLE001 (sent to the client, which raises it as its own)
            await _send(stream, encode_error(exc))

    async def _pull(self, stream: trio.SocketStream, swarm: Swarm, req: dict[str, Any]) -> None:
        """A pull into the client's models dir (the same user's), its progress sent at most
        ten times a second."""
        latest: list[int] = []
        moved = trio.Event()

        def progress(done: int, total: int, peers: int) -> None:
            latest[:] = [done, total, peers]
            moved.set()

        async def report() -> None:
            nonlocal moved
            while True:
                await moved.wait()
                moved = trio.Event()
                await _send(stream, {"t": "progress", "progress": list(latest)})
                await trio.sleep(0.1)

        failed: Exception | None = None
        async with trio.open_nursery() as n:
            n.start_soon(report)
            try:
                got = await swarm.pull(req["model"], req.get("models_dir"), progress=progress)
            except Exception as exc:  # noqa: BLE001 (raised below, outside the nursery: not in a group)
                failed = exc
            n.cancel_scope.cancel()
        if failed is not None:
            raise failed
        await _send(stream, {"t": "pulled", "pull": got.to_dict(), "end": True})


    async def _listing(self, stream: trio.SocketStream, req: dict[str, Any]) -> None:
        try:
            await self.swarm.join(req.get("bootstrap") or [])
            rows = await listing(self.swarm, req)
        except Exception as exc:  # noqa: BLE001 (a SwarmError: the client prints it)
            await _send(stream, {"t": "error", "message": str(exc), "end": True})
            return
        await _send(stream, {"t": "rows", "rows": rows, "end": True})


async def _until_hang_up(stream: trio.SocketStream, work: Any) -> None:
    """``work()``, cancelled if the client hangs up first (EOF: it was stopped, or Ctrl-C)."""
    async with trio.open_nursery() as n:
        async def hang_up() -> None:
            while await stream.receive_some(4096):
                pass
            n.cancel_scope.cancel()

        n.start_soon(hang_up)
        await work()
        n.cancel_scope.cancel()


def _peer_cred(sock: Any) -> tuple[int, int]:
    """The connecting process's pid and uid, as the kernel saw them at connect."""
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return int(pid), int(uid)


async def _read_line(stream: trio.SocketStream) -> bytes:
    buf = b""
    while b"\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            raise ValueError("the client closed before its request ended")
        buf += data
        if len(buf) > MAX_LINE:
            raise ValueError("request too long")
    return buf.split(b"\n", 1)[0]


async def _send(stream: trio.SocketStream, obj: dict[str, Any]) -> None:
    await stream.send_all(dump(obj))


def _listen(path: Path) -> trio.SocketListener:
    """A unix socket at ``path``, 0600 from the start (the umask is set around the bind)."""
    path.unlink(missing_ok=True)  # a stale one: the caller holds the agent's life lock
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(64)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


def run(settings: Settings, files: AgentFiles, idle_s: float) -> int:
    """The agent's life: the first line on stdout says ``ready`` (or the error), for the
    command that started it; then stdout goes to /dev/null and the log has the rest."""
    import fcntl

    life = os.open(files.life, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(life, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _ready({"error": f"an agent already runs for this user and config (see: gputorrent agent status); "
                         f"its socket: {files.socket}"})
        return 1
    os.ftruncate(life, 0)
    os.write(life, str(os.getpid()).encode())

    async def main() -> None:
        swarm = Swarm(list(settings.bootstrap), mdns=settings.mdns, identity=settings.requester_identity_path,
                      swarm_key=settings.swarm_key, data_dir=settings.data_dir, join_later=True,
                      agent=False)
        agent: Agent | None = None
        try:
            async with swarm:
                agent = Agent(swarm, files, idle_s)
                listener = _listen(files.socket)
                try:
                    files.api.write_text(json.dumps({"socket": str(files.socket), "pid": os.getpid(),
                                                     "version": VERSION, "peer_id": swarm.peer_id}))
                    _ready({"ready": True, **agent.info()})
                    print(f"agent {os.getpid()} ({VERSION}) serves {files.socket} as {swarm.peer_id}",
                          file=sys.stderr, flush=True)
                    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                        async with trio.open_nursery() as n:
                            n.start_soon(_stop_on, signals, agent)
                            await agent.serve(listener)
                            n.cancel_scope.cancel()
                finally:
                    for path in (files.api, files.socket):
                        path.unlink(missing_ok=True)
        except Exception as exc:
            if agent is not None:
                raise
            _ready({"error": str(exc)})
            raise SystemExit(1) from None

    try:
        trio.run(main)
    finally:
        os.close(life)
    return 0


async def _stop_on(signals: Any, agent: Agent) -> None:
    async for signum in signals:
        agent.stop(signal.Signals(signum).name)


def _ready(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
