"""Commands timed across the NAT lab's shaped links (natlab.NatLab.shape): what
tests/test_wan_lab.py checks and benchmarks/wan.py reports, in round trips of the link."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from .natlab import NatLab


def prepare(prefix: str) -> tuple[Any, Any]:
    """What a benchmark across the NAT lab needs first: the lab usable here (else it exits
    saying why), the demo model's file, and a work dir the lab's hosts can enter."""
    import os
    import tempfile
    from pathlib import Path

    from ..config import load_settings
    from ..models import pull
    from . import natlab

    reason = natlab.unavailable_reason()
    if reason:
        raise SystemExit(f"NAT lab unavailable: {reason}")
    model, _ = pull("smollm2", load_settings().models_dir)
    work = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(work, 0o755)
    return model, work


def tcp_rtt_ms(lab: NatLab, host: str, ip: str, port: int, tries: int = 5) -> float:
    """The fastest of ``tries`` TCP connects from ``host`` to ``ip:port``: one round trip."""
    probe = ("import socket, sys, time\nbest = 1e9\nfor _ in range(int(sys.argv[3])):\n"
             "    t = time.perf_counter(); s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)\n"
             "    best = min(best, time.perf_counter() - t); s.close()\nprint(best * 1000)")
    done = subprocess.run(lab.exec_argv(host, [sys.executable, "-c", probe, ip, str(port), str(tries)]),
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"RTT probe from {host} failed: {done.stderr[-500:]}")
    return float(done.stdout)


@dataclass
class Timed:
    seconds: float  # the whole process, start to exit
    rc: int
    out: Any  # the parsed --json output, or None
    stderr: str

    @property
    def model_s(self) -> float:
        """The answer's own time: its first token, then the rest at its own speed."""
        if not isinstance(self.out, dict) or "ttft_ms" not in self.out:
            return 0.0
        n = self.out["usage"]["completion_tokens"]
        return self.out["ttft_ms"] / 1000 + max(0, n - 1) / max(self.out["tokens_per_s"], 1e-9)

    def round_trips(self, rtt_ms: float) -> float:
        """Seconds beyond the model's own time, in round trips of ``rtt_ms``."""
        return (self.seconds - self.model_s) * 1000 / rtt_ms


def gputorrent(lab: NatLab, host: str, *args: str, env: dict[str, str], timeout: float = 120) -> Timed:
    """``gputorrent ARGS`` run inside ``host``, timed; its ``--json`` output parsed."""
    started = time.perf_counter()
    done = subprocess.run(lab.exec_argv(host, [sys.executable, "-m", "gputorrent.cli", *args]), capture_output=True,
                          text=True, timeout=timeout, env=env)
    took = time.perf_counter() - started
    try:
        out = json.loads(done.stdout) if done.stdout.strip()[:1] in ("{", "[") else None
    except ValueError:
        out = None
    return Timed(took, done.returncode, out, done.stderr[-2000:])
