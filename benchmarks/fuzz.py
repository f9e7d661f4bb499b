"""Fuzz a real serve process with 100,000 frames (random, truncated, oversized, wrong-typed,
absurd values, half-open and rapid open/close streams; see gputorrent/fuzz.py).

Records crashes, hung streams, slots free afterwards, the worst ping while fuzzing, and RSS
before and after. Targets (issue "Hostile peers"): 0 crashes, 0 hung streams, every slot free
within 15 s after the run, no ping slower than 1 s during it, RSS after within 100 MB of before.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, write_section

from gputorrent.asking.client import ping
from gputorrent.identity import Identity
from gputorrent.lab.fuzz import fuzz, rss_mb
from gputorrent.lab.localswarm import LocalSwarm
from gputorrent.net.host import connect, running_host

PEER = ("--slots", "4", "--ctx", "512", "--rate-limit", "0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    with LocalSwarm() as ls:
        peer = ls.start("target", *PEER)

        async def run() -> dict:
            async with running_host(Identity.generate()) as host:
                pid = await connect(host, peer.addr)
                await ping(host, pid)
                before = rss_mb(peer.proc.pid)
                t0 = time.monotonic()
                result = await fuzz(host, pid, frames=args.frames, workers=args.workers)
                took = time.monotonic() - t0
                t1 = time.monotonic()
                freed = None
                while time.monotonic() - t1 < 15:
                    pong = (await ping(host, pid, 5.0))[1]
                    if pong.active == 0 and pong.queued == 0:
                        freed = time.monotonic() - t1
                        break
                    await trio.sleep(0.2)
                return {"result": result, "took": took, "freed": freed, "before": before,
                        "after": rss_mb(peer.proc.pid), "alive": peer.proc.poll() is None}

        out = trio.run(run)
    r = out["result"]
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(r.kinds.items()))
    freed = f"{out['freed']:.1f} s" if out["freed"] is not None else "NOT within 15 s"
    body = f"""## Fuzzing a serving peer (`benchmarks/fuzz.py`)

{machine()}; one serve process (`{' '.join(PEER)}`), {args.workers} fuzzing streams at once from one
requester process, {r.frames:,} frames over {r.streams:,} streams in {out['took']:.0f} s ({kinds}).

| measure | result | target |
|---|---|---|
| crashes | {0 if out['alive'] else 1} | 0 |
| hung streams (no end within 15 s) | {r.hung} | 0 |
| stream opens refused | {r.refused_open} | (allowed) |
| all slots free after the run | {freed} | ≤ 15 s |
| worst ping during the run ({r.pings} pings) | {r.worst_ping_ms:.0f} ms | ≤ 1000 ms |
| RSS before → after | {out['before']:.0f} → {out['after']:.0f} MB ({out['after'] - out['before']:+.0f} MB) | within 100 MB |
"""
    print(body)
    if not args.no_write:
        write_section("fuzz", body)


if __name__ == "__main__":
    main()
