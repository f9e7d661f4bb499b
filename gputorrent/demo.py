"""``make demo``: three peers on loopback, one question, a streamed answer, a clean stop."""

from __future__ import annotations

import subprocess
import sys

from .localswarm import LocalSwarm

QUESTION = "What is the capital of France? Answer in one word."


def main(peers: int = 3) -> int:
    print(f"starting {peers} peers on 127.0.0.1 with the demo model (smollm2)…", file=sys.stderr)
    with LocalSwarm() as swarm:
        started = [swarm.spawn(f"peer{i}") for i in range(peers)]
        for p in started:
            p.wait_ready(120)
            print(f"  {p.name} ready: {p.addr}", file=sys.stderr)
        cmd = [sys.executable, "-m", "gputorrent.cli", "ask", QUESTION, "--temperature", "0",
               "--identity", str(swarm.identity("asker"))]
        for p in started:
            cmd += ["--peer", p.addr]  # the first answers; the others are failover
        print(f"\n$ gputorrent ask {QUESTION!r} --temperature 0 --peer …\n", file=sys.stderr)
        rc = subprocess.call(cmd)
        print("\nstopping peers…", file=sys.stderr)
    print("done", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
