"""What the mesh costs over calling llama-cpp-python directly.

(a) llama-cpp-python in this process (``Llama.create_completion(stream=True)``);
(b) the same request through a local serve process over libp2p, every frame signed and
verified. Runs alternate, same prompts, greedy, so both see the same machine state.
Process start and the one-time dial are excluded from (b) (the dial is reported apart).

Targets: mesh tokens/s >= 0.95 x direct; added time to first token <= 50 ms.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, median, write_section

from gputorrent import wire
from gputorrent.asking.asker import new_request_id
from gputorrent.asking.client import run_attempt
from gputorrent.config import load_settings
from gputorrent.identity import Identity
from gputorrent.lab.localswarm import LocalSwarm
from gputorrent.models import pull
from gputorrent.net.host import connect, running_host

TOPICS = ["the sea", "a lighthouse", "an old clock", "a mountain village", "a red kite", "the first snow",
          "a train at night", "a lost key", "a small robot", "a garden in spring", "a desert road", "a library"]


def prompts(n: int) -> list[str]:
    # Distinct first words: neither side may reuse a cached prompt prefix.
    return [f"{t.capitalize()} is the subject of this short story. Once upon a time," for t in (TOPICS * 4)[:n]]


def direct(llm, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for _ in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, stream=True):
        last = time.perf_counter()
        first = first or last
        n += 1
    return (first - t0) * 1000, (n - 1) / (last - first), n


async def mesh(host, peer_id: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    req = wire.InferRequest(request_id=new_request_id(), prompt=prompt,
                            params=wire.Params(max_tokens=max_tokens, temperature=0.0))
    t0 = time.perf_counter()
    res = await run_attempt(host, peer_id, req, lambda ids, text: None)
    n = len(res.ids)
    return (res.t_first - t0) * 1000, (n - 1) / (res.t_last - res.t_first), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()

    from llama_cpp import Llama

    from gputorrent.engine.llama import default_threads

    path, _ = pull("smollm2", load_settings().models_dir)
    threads = default_threads()
    llm = Llama(str(path), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    direct(llm, "Warm up.", 8)
    results = {"direct": [], "mesh": []}

    async def run(peer_addr: str) -> float:
        async with running_host(Identity.generate()) as host:
            t = time.perf_counter()
            peer_id = await connect(host, peer_addr)
            dial_ms = (time.perf_counter() - t) * 1000
            await mesh(host, peer_id, "Warm up.", 8)
            for i, p in enumerate(prompts(args.runs)):
                order = (("direct", "mesh") if i % 2 == 0 else ("mesh", "direct"))
                for side in order:
                    if side == "direct":
                        results["direct"].append(direct(llm, p, args.max_tokens))
                    else:
                        results["mesh"].append(await mesh(host, peer_id, p, args.max_tokens))
                print(f"run {i + 1}/{args.runs}: direct {results['direct'][-1][1]:.1f} tok/s, "
                      f"mesh {results['mesh'][-1][1]:.1f} tok/s", file=sys.stderr)
            return dial_ms

    with LocalSwarm() as swarm:
        peer = swarm.start("bench", "--slots", "1", "--threads", str(threads))
        dial_ms = trio.run(run, peer.addr)

    d_ttft, d_tps = median([r[0] for r in results["direct"]]), median([r[1] for r in results["direct"]])
    m_ttft, m_tps = median([r[0] for r in results["mesh"]]), median([r[1] for r in results["mesh"]])
    tokens = median([r[2] for r in results["mesh"]])
    ratio, added = m_tps / d_tps, m_ttft - d_ttft
    body = f"""## Mesh overhead (`benchmarks/overhead.py`)

{machine()}; demo model SmolLM2-135M Q4_1; {args.runs} alternating runs of {args.max_tokens} greedy tokens
(median {tokens:.0f} generated), {threads} decode threads on both sides, one slot on the peer.
Direct is llama-cpp-python's `Llama.create_completion(stream=True)` in the benchmark process; mesh is
the same prompt through a serve process over libp2p (Noise, yamux), every frame signed and verified.

| path | tokens/s (median) | time to first token (median) |
|---|---|---|
| direct, in-process | {d_tps:.1f} | {d_ttft:.1f} ms |
| mesh, local peer | {m_tps:.1f} | {m_ttft:.1f} ms |
| **mesh / direct** | **{ratio:.3f}×** (target ≥ 0.95) | **{added:+.1f} ms** (target ≤ +50 ms) |

Dialing the peer once (Noise handshake, yamux) took {dial_ms:.0f} ms; it is paid once per peer per
process and is not in the figures above.
"""
    print(body)
    if not args.no_write:
        write_section("overhead", body)


if __name__ == "__main__":
    main()
