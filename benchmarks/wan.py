"""Commands across real distance, in the NAT lab with every home's access link shaped
(natlab.LINKS: lan 0.5 ms, continent 30 ms, intercontinental 150 ms between a home and the
internet; loss and rate as the profile says), each figure beside its floor in round trips.

A relay/bootstrap in the internet namespace; a public donor there, or a donor at home A reached
through the relay (then home to home: two shaped links, 2 RTTs a round trip). From home C, each
measured ``--rounds`` times (medians): the link's RTT (a TCP connect), ``peers`` and a cold
``ask`` in-process, the first ask through the agent (it starts one), a warm one, and ``peers``
through the agent; asks ``--max-tokens 8`` greedy. "Round trips" is the whole-process time less the answer's own (first token and
decode), divided by the home's RTT to where the command goes; "floor" is the fewest round trips
the command needs on that path. Not yet here: 2- and 3-hop chains and a model pull.

Run (root, network namespaces): ``python benchmarks/wan.py [--rounds 3] [--links lan,continent]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, median, write_section

from gputorrent.lab import natlab
from gputorrent.lab.localswarm import LocalSwarm
from gputorrent.lab.wan import Timed, gputorrent, prepare, tcp_rtt_ms

# Fewest round trips per command on its path: the TCP connect, Noise and multistream (1 each
# with py-libp2p's pipelining, yamux inside), then the request itself. peers: connect to the
# bootstrap (3) and one lookup (1). A cold ask: the same, then a connect to the donor (3) and
# the request (1). A warm ask through the agent: the request (1); a warm peers through it: none
# (its view is kept fresh). Relayed: every leg crosses the relay, which adds its own connect to
# the donor when the circuit opens.
FLOORS = {"peers, cold": 4, "peers (agent)": 0, "cold ask": 8, "first ask (agent)": 8, "warm ask (agent)": 1}


FAILED: list[str] = []  # what failed, to say under the table


def series(lab, env, args: list[str], rounds: int, before: list[str] | None = None) -> list[Timed]:
    """``rounds`` timed runs; a failed one is set aside (and said), and the donor's breaker is
    reset after it, so that one failure does not fail every later round."""
    out = []
    for _ in range(rounds):
        if before:
            gputorrent(lab, "home-c", *before, env=env)
        t = gputorrent(lab, "home-c", *args, env=env, timeout=300)
        if t.rc != 0:
            FAILED.append(f"{' '.join(a for a in args if not a.startswith('/ip4'))}: {t.stderr.strip()[-300:]}")
            print("FAILED", FAILED[-1], flush=True)
            for pid in env.get("_DONOR", "").split():
                gputorrent(lab, "home-c", "peers", "--reset", pid, env=env)
            continue
        out.append(t)
    return out


def reachable(lab, env: dict, relay: str, timeout: float = 90) -> None:
    """Wait until the donor's advert holds an address (a donor at home has one once a relay
    took its reservation, a little after it says it is ready)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = gputorrent(lab, "home-c", "peers", "--bootstrap", relay, "--json", "--no-ping", "--no-agent", env=env)
        if t.rc == 0 and isinstance(t.out, list) and any(p.get("addrs") for p in t.out):
            return
        time.sleep(1)
    raise RuntimeError("the donor never advertised an address")


def one_link(link: natlab.Link, rounds: int, model: Path, work: Path) -> list[dict]:
    rows = []
    with natlab.NatLab() as lab:
        lab.shape(link)
        for where in ("public", "home A"):
            with LocalSwarm(workdir=work / f"{link.name}-{where[0]}") as swarm:
                relay = swarm.start("relay", command="bootstrap", wrap=lab.exec_argv("inet", []),
                                    listen=f"/ip4/{natlab.RELAY_IP}/tcp/4001", timeout=60)
                host, listen = (("inet", f"/ip4/{natlab.RELAY2_IP}/tcp/4002") if where == "public"
                                else ("home-a", f"/ip4/{lab.homes['a'].ip}/tcp/4001"))
                swarm.start("donor", "--bootstrap", relay.addr, "--model", str(model), wrap=lab.exec_argv(host, []),
                            listen=listen, timeout=180)
                rtt = tcp_rtt_ms(lab, "home-c", natlab.RELAY_IP, 4001)
                to_donor = rtt if where == "public" else 2 * rtt
                run = work / f"run-{link.name}-{where[0]}"
                run.mkdir(mode=0o700)
                env = {**swarm.env, "XDG_DATA_HOME": str(work / f"data-{link.name}-{where[0]}"),
                       "XDG_RUNTIME_DIR": str(run), "GPUTORRENT_MDNS": "0", "GPUTORRENT_AGENT_IDLE": "600"}
                env.pop("GPUTORRENT_IDENTITY", None)
                env["_DONOR"] = swarm.peers["donor"].peer_id
                ask = ["ask", "Name three colours.", "--bootstrap", relay.addr, "--max-tokens", "8",
                       "--temperature", "0", "--json"]
                reachable(lab, env, relay.addr)
                try:
                    peers = ["peers", "--bootstrap", relay.addr, "--json", "--no-ping"]
                    measured = {
                        "peers, cold": (series(lab, env, [*peers, "--no-agent"], rounds), rtt),
                        "cold ask": (series(lab, env, [*ask, "--no-agent"], rounds), to_donor),
                        "first ask (agent)": (series(lab, env, ask, rounds, before=["agent", "stop"]), to_donor),
                        "warm ask (agent)": (series(lab, env, ask, rounds), to_donor),
                        "peers (agent)": (series(lab, env, peers, rounds), rtt),
                    }
                finally:
                    gputorrent(lab, "home-c", "agent", "stop", env=env)
                for name, (ts, r) in measured.items():
                    if not ts:
                        continue
                    path = ts[-1].out["attempts"][-1]["path"] if isinstance(ts[-1].out, dict) else ""
                    rows.append({"link": link, "where": where, "path": path, "command": name, "rtt_ms": r,
                                 "seconds": median([t.seconds for t in ts]),
                                 "beyond_model_s": median([t.seconds - t.model_s for t in ts])})
                    print(rows[-1], flush=True)
    return rows


def path_of(row: dict) -> str:
    return f" ({row['path']})" if row["path"] else ""


def table(rows: list[dict]) -> str:
    """Each figure, and what the link added to it over the same command on the LAN profile, in
    round trips of the link (the issue's measure: process start and CPU cancel out)."""
    base = {(r["where"], r["command"]): r for r in rows if r["link"].name == "lan"}
    out = []
    for r in rows:
        b = base.get((r["where"], r["command"]))
        added = "" if b is None or r["link"].name == "lan" else \
            f"{(r['beyond_model_s'] - b['beyond_model_s']) * 1000 / max(r['rtt_ms'] - b['rtt_ms'], 1e-9):.0f}"
        out.append(f"| {r['link'].name} ({r['link'].rtt_ms:g} ms) | {r['where']}{path_of(r)} "
                   f"| {r['command']} | {r['rtt_ms']:.1f} | {r['seconds']:.2f} | {r['beyond_model_s']:.2f} | {added} "
                   f"| {FLOORS[r['command']]} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--links", default="lan,continent,intercontinental")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    model, work = prepare("gputorrent-wan-")
    rows = []
    for name in args.links.split(","):
        rows += one_link(natlab.LINKS[name], args.rounds, model, work)
    body = f"""## Across real distance (`benchmarks/wan.py`)

{machine()}; {args.rounds} rounds, medians. Every home's access link delayed in user space
(gputorrent/lab/delay.py: the kernel has no netem), with the profile's loss and TBF rate. From
home C; the donor in the internet ("public") or at home A behind a cone NAT (home to home: two
shaped links). "Beyond the model" = whole process − the answer's own first token and decode.
"Round trips added" = what the link added to that over the LAN profile, ÷ the RTT to the donor
(to the bootstrap for `peers`); "floor" = the fewest round trips the command needs.

| link (home RTT) | donor | command | RTT to it, ms | seconds | beyond the model, s | round trips added | floor |
|---|---|---|---|---|---|---|---|
{table(rows)}

Failed runs (set aside; the donor's breaker reset after each): {len(FAILED)}.
{chr(10).join("- " + f for f in FAILED)}"""
    print(body)
    if not args.no_write:
        write_section("wan", body)


if __name__ == "__main__":
    main()
