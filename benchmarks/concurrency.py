"""Aggregate throughput and time to first token at 1, 2, 4 and 8 concurrent streams against one
peer (continuous batching: the streams share each decode step), and the peer's peak RSS.

Targets on 2 CPU cores: aggregate tokens/s at 8 streams >= 1.5 x one stream (llama.cpp's own
server reaches about 1.6x here with 8 parallel slots); peak RSS <= model file + 400 MB.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, median, pct, write_section

from gputorrent import wire
from gputorrent.asking.asker import new_request_id
from gputorrent.asking.client import run_attempt
from gputorrent.identity import Identity
from gputorrent.lab.localswarm import LocalSwarm
from gputorrent.models import CATALOG
from gputorrent.net.host import connect, running_host


def prompt(i: int) -> str:
    # Counting keeps greedy decoding going to max_tokens: a stream that stopped early would
    # leave a wave's time mostly time-to-first-token and understate the one-stream baseline.
    start = 100 * (i + 1)
    return f"Count upwards one by one: {start}, {start + 1}, {start + 2},"


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def wave(host, peer_id: str, n: int, max_tokens: int, offset: int) -> tuple[float, list[float], int]:
    """``n`` streams at once: aggregate tokens/s (all tokens over the wave's wall time), each
    stream's time to first token, and the fewest tokens any stream generated."""
    results = []

    async def one(i: int) -> None:
        req = wire.InferRequest(request_id=new_request_id(), prompt=prompt(offset + i),
                                params=wire.Params(max_tokens=max_tokens, temperature=0.0))
        results.append(await run_attempt(host, peer_id, req, lambda ids, text: None))

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, i)
    elapsed = max(r.t_last for r in results) - t0
    tokens = sum(len(r.ids) for r in results)
    return tokens / elapsed, [(r.t_first - r.t_start) * 1000 for r in results], min(len(r.ids) for r in results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    slots = max(levels)
    rows: dict[int, tuple[list[float], list[float]]] = {n: ([], []) for n in levels}
    shortest: list[int] = []

    with LocalSwarm() as swarm:
        peer = swarm.start("bench", "--slots", str(slots), "--queue", "0", "--ctx", str(args.ctx),
                           "--rate-limit", "0")

        async def run() -> None:
            async with running_host(Identity.generate()) as host:
                pid = await connect(host, peer.addr)
                await wave(host, pid, 1, 8, 0)  # warm
                for r in range(args.rounds):
                    for n in levels:
                        agg, ttfts, fewest = await wave(host, pid, n, args.max_tokens, r * 10 + n)
                        rows[n][0].append(agg)
                        rows[n][1].extend(ttfts)
                        shortest.append(fewest)
                        print(f"round {r + 1}, {n} streams: {agg:.1f} tokens/s aggregate "
                              f"(shortest stream {fewest} tokens)", file=sys.stderr)

        trio.run(run)
        rss = peak_rss_mb(peer.proc.pid)

    model_mb = CATALOG["smollm2"].size / 2**20
    from gputorrent.config import load_settings
    from gputorrent.models import read_info, resolve
    from gputorrent.models.quant import estimate_memory

    est = estimate_memory(read_info(resolve("smollm2", load_settings().models_dir), identify=False), args.ctx, slots)
    # Each round measures every level back to back, so the ratio is taken within a round (the
    # machine's speed drifts between rounds on a shared VM) and the median over rounds reported.
    def ratio(n: int) -> float:
        return median([a / b for a, b in zip(rows[n][0], rows[levels[0]][0], strict=False)])

    table = "\n".join(
        f"| {n} | {median(rows[n][0]):.1f} ({min(rows[n][0]):.0f}–{max(rows[n][0]):.0f}) | {ratio(n):.2f}× | "
        f"{pct(rows[n][1], 50):.0f} ms | {pct(rows[n][1], 95):.0f} ms |" for n in levels)
    top = levels[-1]
    body = f"""## Concurrency (`benchmarks/concurrency.py`)

{machine()}; demo model; one serve process with `--slots {slots} --ctx {args.ctx}` (continuous batching:
all running streams share each `llama_decode`), the requester in the benchmark process. Each level
runs that many streams at once on distinct counting prompts, greedy, {args.max_tokens} tokens each (the
shortest stream of any wave generated {min(shortest)}), {args.rounds} rounds; aggregate = all tokens over the
wave's wall time, time to first token included. "vs 1 stream" is the median over rounds of each
round's ratio (levels run back to back within a round; this shared VM's speed drifts between rounds).

| streams | aggregate tokens/s, median (min–max) | vs 1 stream | time to first token p50 | p95 |
|---|---|---|---|---|
{table}

Target: aggregate at {top} streams ≥ 1.5 × one stream: measured **{ratio(top):.2f}×** (per round:
{", ".join(f"{a / b:.2f}" for a, b in zip(rows[top][0], rows[levels[0]][0], strict=False))}).
Peak RSS of the serve process (VmHWM): **{rss:.0f} MB** against a model file of {model_mb:.0f} MB, i.e.
model + {rss - model_mb:.0f} MB (target: model + 400 MB). `gputorrent models info` estimates {est.total_mb} MB
for these settings (weights {est.weights_mb} + KV cache {est.kv_cache_mb} + buffers {est.buffers_mb}): what llama.cpp
reserves; the process adds the Python runtime and libp2p, and KV pages no answer reached stay untouched.
"""
    print(body)
    if not args.no_write:
        write_section("concurrency", body)


if __name__ == "__main__":
    main()
