"""A thin command's side of the agent (stdlib only: no trio, no py-libp2p).

``call`` sends one request and yields the agent's events; when no agent answers it starts one
first (``start``), under a lock, so that two commands started at once start one agent. A socket
file nobody listens on (an agent that crashed) is replaced; an agent of another version is
stopped and replaced. ``render`` prints an ask's events as the in-process path does.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import GputorrentError
from .paths import AgentFiles
from .protocol import MAX_LINE, VERSION, dump, load

START_S = 120.0  # joining the swarm (a bootstrap walk) plus an interpreter start, at most
STOP_S = 15.0
HELLO_S = 5.0  # a status or a stop: an agent that answers nothing in this long is stuck
# An ask's events can be minutes apart (a model loading at the peer): its own --deadline bounds
# it in the agent, and this margin covers the agent saying so. A listing walks the DHT.
MARGIN_S = 15.0
ASK_S = 600.0


class AgentError(GputorrentError):
    """The agent could not be started or reached; the message says why and what to do."""


def wanted(no_agent: bool) -> bool:
    """Whether a command should use the agent: not with ``--no-agent`` or GPUTORRENT_AGENT=off."""
    return not no_agent and os.environ.get("GPUTORRENT_AGENT", "on").strip().lower() not in ("0", "off", "no", "false")


def start_argv(settings: Any) -> list[str]:
    """``gputorrent agent run``'s flags for these settings: what a first command starts it with.
    The key and data dir go too, so that the agent's files are the ones the command looks for."""
    argv = [f"--bootstrap={a}" for a in settings.bootstrap]
    argv += ["--no-mdns"] if not settings.mdns else []
    argv += [f"--swarm-key={settings.swarm_key}"] if settings.swarm_key else []
    if settings.identity and Path(settings.identity) != settings.data_dir / "requester.key":
        argv += [f"--identity={settings.identity}"]  # a key of its own; the default keeps the link to identity.key
    argv += [f"--data-dir={settings.data_dir}"]
    return argv


def _connect(files: AgentFiles) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(files.socket))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    return sock


def quiet_s(req: dict[str, Any]) -> float:
    """How long the agent may stay silent on ``req`` before the client gives up on it."""
    op = req.get("op")
    if op in ("hello", "stop", "breakers"):
        return HELLO_S
    if op in ("ask", "stream"):
        return float(req.get("deadline") or ASK_S) + MARGIN_S
    return START_S


def _events(sock: socket.socket) -> Iterator[dict[str, Any]]:
    buf = b""
    while True:
        while b"\n" not in buf:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                raise AgentError(f"the agent sent nothing for {sock.gettimeout():.0f} s; it may be stuck: see its "
                                 "log (gputorrent agent status), stop it (gputorrent agent stop), "
                                 "or run with --no-agent") from None
            if not data:
                raise AgentError("the agent closed the connection mid-answer (see its log: gputorrent agent status)")
            buf += data
            if len(buf) > MAX_LINE:
                raise AgentError("the agent sent a line too long to be one event")
        line, buf = buf.split(b"\n", 1)
        ev = load(line)
        yield ev
        if ev.get("end"):
            return


def request(files: AgentFiles, req: dict[str, Any]) -> Iterator[dict[str, Any]] | None:
    """The events of ``req`` from a running agent, or None when none runs."""
    sock = _connect(files)
    if sock is None:
        return None
    sock.settimeout(quiet_s(req))
    sock.sendall(dump({**req, "version": VERSION}))
    return _closing(sock, _events(sock))


def _closing(sock: socket.socket, events: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    with sock:  # closed when the caller stops early too (Ctrl-C): the agent cancels the request
        yield from events


def call(files: AgentFiles, req: dict[str, Any], start_argv: list[str]) -> Iterator[dict[str, Any]]:
    """The events of ``req``, starting an agent (``gputorrent agent run *start_argv``) if
    none answers, and replacing one of another version."""
    for _ in range(3):
        events = request(files, req)
        if events is None:
            start(files, start_argv)
            events = request(files, req)
            if events is None:
                continue
        first = next(events)
        if first.get("t") == "mismatch":
            stop(files)
            continue
        yield first
        yield from events
        return
    raise AgentError(f"no agent answered at {files.socket}; see {files.log}, or run with --no-agent")


def _lock(path: Any, timeout: float) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise AgentError(f"another command has been starting the agent for {timeout:.0f} s; "
                                 f"see {path.with_suffix('.log')}") from None
            time.sleep(0.05)


def running_pid(files: AgentFiles) -> int | None:
    """The pid of the agent that holds ``files.life``, or None when none does."""
    try:
        fd = os.open(files.life, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else -1
    finally:
        os.close(fd)  # closing drops the lock if it was ours
    return None


def start(files: AgentFiles, argv: list[str]) -> bool:
    """Start an agent unless one answers by the time this command holds the start lock."""
    fd = _lock(files.start, START_S)
    try:
        probe = _connect(files)
        if probe is not None:  # started by the command that held the lock before
            probe.close()
            return True
        if running_pid(files) is not None:  # alive, but not listening yet or any more: wait for it
            _wait(lambda: _connect(files) is not None or running_pid(files) is None, STOP_S)
            if _connect(files) is not None:
                return True
        _rotate(files.log)
        with open(files.log, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "gputorrent.cli", "agent", "run", *argv],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                    start_new_session=True, close_fds=True)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], START_S)
        line = proc.stdout.readline() if ready else b""
        proc.stdout.close()
        try:
            said = json.loads(line) if line else {}
        except ValueError:
            said = {}
        if said.get("ready"):
            return True
        if said.get("error"):
            raise AgentError(said["error"])
        if not line and _exited(proc):
            raise AgentError(f"the agent exited at start: {_last_line(files.log)} (full log: {files.log})")
        proc.kill()
        raise AgentError(f"the agent did not start within {START_S:.0f} s; see {files.log}, or run with --no-agent")
    finally:
        os.close(fd)


def _rotate(log: Any, keep: int = 1 << 20) -> None:
    """One older log beside the current one, each about ``keep`` bytes at most at start."""
    try:
        if log.stat().st_size > keep:
            log.replace(log.with_suffix(".log.1"))
    except OSError:
        pass


def _exited(proc: subprocess.Popen) -> bool:
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        return False
    return True


def _last_line(log: Any) -> str:
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "no log"


def stop(files: AgentFiles) -> bool:
    """Ask a running agent to stop and wait until it has; False when none ran. An agent that
    does not answer (stuck), or does not end in time, is killed."""
    events = request(files, {"op": "stop"})
    if events is None:
        return False
    try:
        for _ in events:
            pass
        stuck = False
    except AgentError:
        stuck = True
    if stuck or not _wait(lambda: running_pid(files) is None, STOP_S):
        pid = running_pid(files)
        if pid and pid > 0:
            import signal

            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not _wait(lambda: running_pid(files) is None, STOP_S):
            raise AgentError(f"the agent (pid {running_pid(files)}) did not stop; kill it by hand")
    return True


def stop_all(run_dir: Path, timeout: float = 10.0) -> list[int]:
    """End every agent whose files are in the runtime dir ``run_dir`` (a test's, a lab's):
    SIGTERM, then SIGKILL after ``timeout``. The pids that were running."""
    import signal

    pids = []
    for life in (run_dir / "gputorrent").glob("agent-*.lock"):
        pid = running_pid(AgentFiles.from_lock(life))
        if pid and pid > 0:
            pids.append(pid)
            os.kill(pid, signal.SIGTERM)
    for pid in pids:
        if not _wait(lambda p=pid: not _alive(p), timeout):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a child of this process that exited is a zombie until reaped
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def _wait(done: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class AskPrinter:
    """Prints an ask's events as ``gputorrent ask`` does, in-process or from the agent: the
    answer streamed to stdout (or one JSON object with ``json_mode``), notes on stderr, an error
    raised as ``error`` (exit 1) or, for bad flags, ``usage`` (exit 2)."""

    def __init__(self, *, json_mode: bool, error: type[Exception], usage: type[Exception]) -> None:
        self.json_mode = json_mode
        self.error = error
        self.usage = usage

    def feed(self, ev: dict[str, Any]) -> int:
        """Print one event; 0 once the answer is done, -1 before; raises on an error."""
        kind = ev.get("t")
        if kind == "text" and not self.json_mode:
            sys.stdout.write(ev["text"])
            sys.stdout.flush()
        elif kind == "note":
            print(ev["text"], file=sys.stderr)
        elif kind == "done":
            if self.json_mode:
                print(json.dumps(ev["answer"], indent=2, default=str))
            else:
                print()
            for line in ev.get("notes", []):
                print(line, file=sys.stderr)
            return 0
        elif kind == "error":
            if ev.get("usage"):
                raise self.usage(ev["message"])
            if not self.json_mode and ev.get("partial"):
                print()
            if self.json_mode and "attempts" in ev:
                print(json.dumps({"error": ev["message"], "attempts": ev["attempts"], "text": ev.get("partial", "")},
                                 indent=2, default=str))
            raise self.error(ev["message"])
        return -1


def render(events: Iterator[dict[str, Any]], *, json_mode: bool, error: type[Exception],
           usage: type[Exception]) -> int:
    """``AskPrinter`` over an agent's events; the exit code."""
    printer = AskPrinter(json_mode=json_mode, error=error, usage=usage)
    for ev in events:
        if printer.feed(ev) == 0:
            return 0
    raise error("the answer ended without a receipt")
