"""``make demo``: a bootstrap node and three peers on loopback, found through the DHT;
one question, a streamed answer, a clean stop."""

from __future__ import annotations

import subprocess
import sys

from .lab.localswarm import LocalSwarm

QUESTION = "What is the capital of France? Answer in one word."


def main(peers: int = 3) -> int:
    print(f"starting a local swarm on 127.0.0.1: a bootstrap node and {peers} peers serving smollm2…",
          file=sys.stderr)
    with LocalSwarm() as swarm:
        boot = swarm.bootstrap()
        print(f"  bootstrap ready: {boot.addr}", file=sys.stderr)
        started = [swarm.spawn(f"peer{i}", "--bootstrap", boot.addr) for i in range(peers)]
        for p in started:
            p.wait_ready(120)
            print(f"  {p.name} ready: {p.addr}", file=sys.stderr)
        base = [sys.executable, "-m", "gputorrent.cli"]
        common = ["--bootstrap", boot.addr, "--no-mdns", "--identity", str(swarm.identity("asker"))]
        print("\n$ gputorrent peers --bootstrap …", file=sys.stderr)
        subprocess.call([*base, "peers", *common])
        print(f"\n$ gputorrent ask {QUESTION!r} --bootstrap … --temperature 0 --explain\n", file=sys.stderr)
        rc = subprocess.call([*base, "ask", QUESTION, *common, "--temperature", "0", "--explain"])
        print("\nstopping the swarm…", file=sys.stderr)
    print("done", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
