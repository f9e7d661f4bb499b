"""The engine's attention beside llama.cpp's default and beside no flash attention, in one run:
speed and determinism.

Three contexts of the demo model take turns (engine/llama.py's ATTENTION): "rows" (the
engine's: flash attention with V cached in bf16), "split" (llama.cpp's default: flash attention,
K and V in f16) and "plain" (no flash attention). Each round prefills a short and a long prompt
and decodes 128 tokens greedily, on 2 threads. Then, for each, the largest difference between
the logits of the same row computed at 1 and at 2 threads, and alone or batched with another
answer (a 578-token context: "split" cuts contexts of 512 cells and more by thread).

Run: ``python benchmarks/attention.py [--rounds 7]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, median, write_section

from gputorrent.config import load_settings
from gputorrent.engine.llama import ATTENTION, LlamaRuntime
from gputorrent.lab.logits import decode, greedy_steps, prefill
from gputorrent.models import pull
from gputorrent.wire import ChatMessage

DECODE = 128


def one_round(rt: LlamaRuntime, ids: list[int]) -> tuple[float, float]:
    """Prefill tokens/s and decode tokens/s for one prompt."""
    rt._ll.llama_set_n_threads(rt._ctx.ctx, 2, 2)
    t = time.perf_counter()
    lg = prefill(rt, 0, ids)
    t_prefill = time.perf_counter() - t
    pos = len(ids)
    t = time.perf_counter()
    for _ in range(DECODE):
        lg = decode(rt, [(0, [int(lg.argmax())], pos)])[0]
        pos += 1
    return len(ids) / t_prefill, DECODE / (time.perf_counter() - t)


def spread(rt: LlamaRuntime, long: list[int], other: list[int]) -> float:
    base = greedy_steps(rt, [long], threads=1)
    rest = greedy_steps(rt, [long], threads=2) + greedy_steps(rt, [long, other], threads=2)
    return max(float(abs(a - b).max()) for a, b in zip(base * 2, rest, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    path, _ = pull("smollm2", load_settings().models_dir)
    rts = {name: LlamaRuntime(path, slots=2, n_ctx=1024, n_threads=2, attention=name) for name in ATTENTION}
    enc = rts["rows"].encode_chat
    prompts = {"short (~30 tokens)": enc([ChatMessage("user", "Name three rivers of Europe.")]),
               "long (~500 tokens)": enc([ChatMessage("user", "Summarize: " + "the river runs to the sea " * 80)])}
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _ in range(args.rounds):
        for name, rt in rts.items():
            for label, ids in prompts.items():
                runs.setdefault((name, label), []).append(one_round(rt, ids))
    long = enc([ChatMessage("user", "Here is a list of words: " + "apple pear plum " * 180)])
    other = enc([ChatMessage("user", "Count from one to five.")])
    spreads = {name: spread(rt, long, other) for name, rt in rts.items()}

    lines = [f"{args.rounds} alternating rounds, 2 threads, medians; {machine()}.", "",
             "| attention | prompt | prefill tok/s | decode tok/s | decode ÷ rows | logits 1 vs 2 threads, batched |",
             "|---|---|---|---|---|---|"]
    for label in prompts:
        base = median([r[1] for r in runs[("rows", label)]])
        for name in ATTENTION:
            got = runs[(name, label)]
            dec = median([r[1] for r in got])
            lines.append(f"| {name} | {label} | {median([r[0] for r in got]):.0f} | {dec:.1f} | {dec / base:.2f}× "
                         f"| {spreads[name]:.2g} |")
    body = "\n".join(lines)
    print(body)
    write_section("attention", "## Attention that computes every row whole (`benchmarks/attention.py`)\n\n"
                  "llama.cpp's default CPU flash attention made a row's logits depend on the thread count and "
                  "on batch neighbours past 512 positions (a chain's answer drifted from the whole peer's). "
                  "The engine caches V in bf16, which keeps flash attention off that path "
                  "(engine/llama.py).\n\n" + body)


if __name__ == "__main__":
    main()
