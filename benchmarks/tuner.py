"""The decode thread tuner's cost on a quiet machine (issue #36), side by side in one run.

One engine (the demo model, 8 slots, 2 threads), its tuner swapped between rounds:
- "backoff": engine/threads.py as it is (tries that lose wait longer, up to MAX_GAP steps);
- "every 48": the last wave's fixed rhythm (a 3-step try of another count every 48 steps);
- "pinned 2": no tries at all, always 2 threads.
Each tuner is kept across rounds, as a serve keeps its own. Each round: 1 stream of 160
tokens, then 8 at once; decode tokens/s from the first token to the
last (1 stream) and aggregate over the whole (8 streams). Rounds alternate the tuners so a
slower moment of the machine falls on all three; medians.

Run: ``python benchmarks/tuner.py [--rounds 7]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, median, write_section

from gputorrent.config import load_settings
from gputorrent.engine import Finished, Tokens
from gputorrent.engine.llama import LlamaEngine
from gputorrent.engine.streaming import EventChannel
from gputorrent.engine.threads import EXPLORE_EVERY, ThreadTuner
from gputorrent.models import pull
from gputorrent.wire import ChatMessage, Params

TOKENS = 160
TUNERS = {"backoff": lambda: ThreadTuner(2), "every 48": lambda: ThreadTuner(2, max_gap=EXPLORE_EVERY),
          "pinned 2": lambda: ThreadTuner(2, options=[2])}


async def stream(eng: LlamaEngine, ids: list[int]) -> tuple[float, float, int]:
    """(first token time, last token time, tokens) of one greedy answer."""
    ch = EventChannel()
    eng.submit(eng.make_job(ids, Params(max_tokens=TOKENS, temperature=0.0), ch.emit))
    first = last = 0.0
    n = 0
    async for ev in ch:
        if isinstance(ev, Tokens):
            last = time.perf_counter()
            first = first or last
            n += len(ev.ids)
        elif isinstance(ev, Finished):
            break
    return first, last, n


async def streams(eng: LlamaEngine, prompts: list[list[int]]) -> float:
    """Aggregate tokens/s of ``prompts`` answered at once."""
    got: list[tuple[float, float, int]] = []

    async def one(ids: list[int]) -> None:
        got.append(await stream(eng, ids))

    t = time.perf_counter()
    async with trio.open_nursery() as n:
        for ids in prompts:
            n.start_soon(one, ids)
    return sum(g[2] for g in got) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    path, _ = pull("smollm2", load_settings().models_dir)
    eng = LlamaEngine(path, slots=8, n_ctx=1024, n_threads=2)
    topics = ["the sea", "a city at night", "a mountain village", "a long train ride", "an old library",
              "a storm", "a garden in spring", "a market"]
    prompts = [eng.encode_chat([ChatMessage("user", f"Write a long story about {t}.")]) for t in topics]
    one: dict[str, list[float]] = {k: [] for k in TUNERS}
    eight: dict[str, list[float]] = {k: [] for k in TUNERS}

    tuners = {name: make() for name, make in TUNERS.items()}  # each kept across rounds, as a serve keeps its own

    async def run() -> None:
        for r in range(args.rounds + 1):
            for name, tuner in tuners.items():
                eng.tuner = tuner
                first, last, n = await stream(eng, prompts[r % len(prompts)])
                rate1, rate8 = (n - 1) / (last - first), await streams(eng, prompts)
                if r == 0:
                    continue  # a first round that warms each tuner up, as a serve's first minute does
                one[name].append(rate1)
                eight[name].append(rate8)
            if r:
                print(f"round {r}: " + ", ".join(f"{k} {one[k][-1]:.1f}/{eight[k][-1]:.1f}" for k in TUNERS),
                      flush=True)

    try:
        trio.run(run)
    finally:
        eng.close()
    base1, base8 = median(one["pinned 2"]), median(eight["pinned 2"])
    rows = "\n".join(f"| {k} | {median(one[k]):.1f} | {median(one[k]) / base1:.3f}× | {median(eight[k]):.1f} "
                     f"| {median(eight[k]) / base8:.3f}× |" for k in TUNERS)
    body = f"""## The thread tuner on a quiet machine (`benchmarks/tuner.py`)

{machine()}; {args.rounds} alternating rounds, medians. One engine (demo model, 8 slots, 2
threads) with its tuner swapped between rounds, each tuner kept across them (a first round,
not counted, warms each up); 1 stream of {TOKENS} tokens (decode tokens/s, first to last token),
then 8 at once (aggregate tokens/s).

| tuner | 1 stream tok/s | vs pinned | 8 streams tok/s | vs pinned |
|---|---|---|---|---|
{rows}"""
    print(body)
    if not args.no_write:
        write_section("tuner", body)


if __name__ == "__main__":
    main()
