"""Start and stop real serve processes on loopback: for ``make demo``, tests and benchmarks.

Readiness is an event, not a guess: a serve process prints its first address on stdout only
once it accepts requests, and we block on that line (with a deadline). Stopping is SIGTERM,
a bounded wait, then SIGKILL, so no caller leaves processes behind even when it fails.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import GputorrentError


class SwarmError(GputorrentError):
    pass


@dataclass
class PeerProcess:
    name: str
    proc: subprocess.Popen
    ready_file: Path
    identity: Path
    log: Path  # the process's stderr: a file, so a chatty peer never blocks on a full pipe
    addr: str = ""
    info: dict = field(default_factory=dict)

    @property
    def peer_id(self) -> str:
        return self.info.get("peer_id", "")

    def stderr(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float) -> None:
        """Block until the process prints its address (it does so once serving)."""
        deadline = time.monotonic() + timeout
        out = self.proc.stdout
        assert out is not None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SwarmError(f"{self.name} did not become ready within {timeout:g}s")
            ready, _, _ = select.select([out], [], [], left)
            if ready:
                line = out.readline()
                if not line:
                    err = self.stderr()
                    raise SwarmError(f"{self.name} exited with {self.proc.wait()} before it was ready:\n{err[-2000:]}")
                if line.startswith(("/", "http://")):  # a peer's multiaddr, or a gateway's URL
                    self.addr = line.strip()
                    if self.ready_file.is_file():
                        self.info = json.loads(self.ready_file.read_text())
                    return

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout:
            self.proc.stdout.close()
        return self.proc.returncode


class LocalSwarm:
    """A set of serve processes on 127.0.0.1, each with its own identity.

    >>> with LocalSwarm() as swarm:
    ...     peer = swarm.start("a")
    ...     print(peer.addr)
    """

    def __init__(self, model: str = "smollm2", workdir: Path | None = None, env: dict | None = None) -> None:
        self.model = model
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="gputorrent-swarm-")
        self.workdir = Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        self.workdir.mkdir(parents=True, exist_ok=True)
        # A runtime dir of its own: an agent its gateway (or anything it runs) starts is the
        # swarm's, never the user's, and ends with it.
        self.run_dir = self.workdir / "run"
        self.run_dir.mkdir(mode=0o700, exist_ok=True)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "XDG_RUNTIME_DIR": str(self.run_dir), **(env or {})}
        self.peers: dict[str, PeerProcess] = {}

    def start(self, name: str, *extra: str, timeout: float = 120.0, command: str = "serve",
              env: dict | None = None, wrap: list[str] | None = None, listen: str | None = None) -> PeerProcess:
        peer = self.spawn(name, *extra, command=command, env=env, wrap=wrap, listen=listen)
        try:
            peer.wait_ready(timeout)
        except BaseException:
            peer.stop(signal.SIGKILL)
            raise
        return peer

    def spawn(self, name: str, *extra: str, command: str = "serve", env: dict | None = None,
              wrap: list[str] | None = None, listen: str | None = None) -> PeerProcess:
        """Start a serve (or bootstrap) process without waiting for it: start several, then
        wait on each. Loopback only, mDNS off: nothing leaves this machine. ``wrap`` prefixes
        the command (``ip netns exec NS``: a NAT lab's host, listening on ``listen`` there)."""
        ready = self.workdir / f"{name}.ready.json"
        ident = self.workdir / f"{name}.key"
        model = ["--model", self.model] if command == "serve" else []
        listen_args = ["--port", "0"] if command == "gateway" else ["--listen", listen or "/ip4/127.0.0.1/tcp/0"]
        cmd = [*(wrap or []), sys.executable, "-m", "gputorrent.cli", command, *model, "--no-mdns", *listen_args,
               "--ready-file", str(ready), "--identity", str(ident), *extra]
        log = self.workdir / f"{name}.stderr"
        with open(log, "w") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env={**self.env, **(env or {})},
                                    stdin=subprocess.DEVNULL)
        peer = self.peers[name] = PeerProcess(name, proc, ready, ident, log)
        return peer

    def gateway(self, name: str, *extra: str, timeout: float = 60.0) -> PeerProcess:
        """``gputorrent gateway`` on a free loopback port; its URL is ``.addr``."""
        return self.start(name, *extra, timeout=timeout, command="gateway")

    def bootstrap(self, name: str = "bootstrap", timeout: float = 60.0) -> PeerProcess:
        """A DHT-only node for the others to join by."""
        return self.start(name, timeout=timeout, command="bootstrap")

    def identity(self, name: str) -> Path:
        return self.workdir / f"{name}.key"

    def stop(self) -> None:
        for peer in self.peers.values():
            if peer.proc.poll() is None:
                peer.proc.send_signal(signal.SIGTERM)
        for peer in self.peers.values():
            peer.stop()
        from ..agent.client import stop_all

        stop_all(self.run_dir)

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._tmp:
            self._tmp.cleanup()
