"""Answers through a relay and through a hole punch, beside direct ones, in the NAT lab.

One donor at home A (behind a cone NAT) answers three requesters, each a process asking
``--asks`` times in a row at ``--peer`` (no DHT: only the path differs):
- direct: from home A's own LAN, at the donor's LAN address;
- relayed: from home B (symmetric NAT, where hole punching cannot work), through relay 1;
- hole-punched: from home C (cone NAT), through relay 1 until DCUtR has upgraded the connection,
  then directly; only the asks after the upgrade count.
The first ask of each process is left out (connection set-up); rounds alternate the paths so a
slower moment of the machine falls on all three. Greedy decoding: every path's text must match.

Targets (issue 21): relayed decode >= 0.8x direct tokens/s; relayed first token within +50 ms
of direct. Needs root (network namespaces): ``sudo .venv/bin/python benchmarks/nat.py``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, median, write_section

from gputorrent.config import load_settings
from gputorrent.lab import natlab
from gputorrent.lab.localswarm import LocalSwarm
from gputorrent.models import pull

QUESTION = "Write a short story about a lighthouse keeper."


def asks(lab, home: str, peer: str, key: Path, n: int, max_tokens: int, env: dict, wait_direct: float = 0) -> list[dict]:
    cmd = lab.exec_argv(home, [sys.executable, "-m", "gputorrent.lab.streamer", QUESTION, "--peer", peer,
                               "--identity", str(key), "--asks", str(n), "--max-tokens", str(max_tokens),
                               "--wait-direct", str(wait_direct)])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{home}: {done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    events = [json.loads(line) for line in done.stdout.splitlines()]
    return [e["answer"] for e in events if "answer" in e]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--asks", type=int, default=5, help="asks per requester process (the first is left out)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--no-write", action="store_true", help="print, do not update docs/benchmarks.md")
    args = ap.parse_args()
    reason = natlab.unavailable_reason()
    if reason:
        raise SystemExit(f"the NAT lab cannot run here: {reason}")
    model, _ = pull("smollm2", load_settings().models_dir)
    paths = {"direct": [], "relayed": [], "hole-punched": []}
    texts: set[str] = set()
    with natlab.NatLab() as lab, LocalSwarm() as swarm:
        relay = swarm.start("relay1", command="bootstrap", wrap=lab.exec_argv("inet", []),
                            listen=f"/ip4/{natlab.RELAY_IP}/tcp/4001", timeout=60)
        donor = swarm.start("donor", "--bootstrap", relay.addr, "--model", str(model), "--slots", "1",
                            wrap=lab.exec_argv("home-a", []), listen=f"/ip4/{lab.homes['a'].ip}/tcp/4001")
        circuit = donor.info["addrs"][0]
        lan = f"/ip4/{lab.homes['a'].ip}/tcp/4001/p2p/{donor.peer_id}"
        for r in range(args.rounds):
            for path, home, addr, wait in (("direct", "home-a", lan, 0), ("relayed", "home-b", circuit, 0),
                                           ("hole-punched", "home-c", circuit, 15)):
                got = asks(lab, home, addr, swarm.workdir / f"{path}-{r}.key", args.asks + (1 if wait else 0),
                           args.max_tokens, swarm.env, wait)
                counted = [a for a in got[1:] if a["attempts"][-1]["path"] == path]
                paths[path] += counted
                texts |= {a["text"] for a in got}
                print(f"round {r + 1} {path}: {len(counted)} asks, ttft "
                      f"{[round(a['ttft_ms']) for a in counted]} ms, tokens/s "
                      f"{[a['tokens_per_s'] for a in counted]}", flush=True)
    ttft = {p: median([a["ttft_ms"] for a in v]) for p, v in paths.items()}
    tps = {p: median([a["tokens_per_s"] for a in v]) for p, v in paths.items()}
    n = {p: len(v) for p, v in paths.items()}
    rows = "\n".join(f"| {p} | {n[p]} | {ttft[p]:.0f} | {ttft[p] - ttft['direct']:+.0f} | {tps[p]:.1f} | "
                     f"{tps[p] / tps['direct']:.2f}x |" for p in paths)
    body = f"""## Behind NAT: relayed and hole-punched answers (`benchmarks/nat.py`)

{machine()}; the NAT lab (network namespaces, kernel NAT). One donor at home A (cone NAT, 1 slot),
asked at `--peer` from its own LAN (direct), from home B through a relay (symmetric NAT: no
punch), and from home C after DCUtR upgraded the relayed connection (hole-punched); {args.rounds}
rounds alternating the paths, {args.asks} asks each after a first that is left out, {args.max_tokens}
tokens, greedy (every path's text identical: {len(texts) == 1}).

| path | asks | first token p50 (ms) | vs direct | decode tokens/s p50 | vs direct |
|---|---|---|---|---|---|
{rows}

Targets: relayed decode >= 0.8x direct; relayed first token within +50 ms of direct."""
    print(body)
    if not args.no_write:
        write_section("nat", body)


if __name__ == "__main__":
    main()
