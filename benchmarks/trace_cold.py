"""Where a cold command's round trips go: one traced ``ask --no-agent`` and one traced
``peers --no-agent`` from home C across a shaped link (natlab.LINKS), the donor public.

Each step the command takes (gputorrent/trace.py: the join's dial, lookups and their walks,
advert fetches, dials, pings, the stream, the first token) with its start and length in round
trips of the link, so that what runs one after another shows. Issue #35 asks for it: a cold ask
at 51 ms took ~235 round trips; at 30 ms, 32 remained.

Run (root, network namespaces): ``python benchmarks/trace_cold.py [--link continent]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, write_section

from gputorrent.lab import natlab, tracing
from gputorrent.lab.localswarm import LocalSwarm
from gputorrent.lab.wan import gputorrent, prepare, tcp_rtt_ms


def traced(lab, env: dict, work: Path, name: str, *args: str) -> tuple[list[tracing.Span], float]:
    path = work / f"{name}.trace"
    path.unlink(missing_ok=True)
    t = gputorrent(lab, "home-c", *args, env={**env, "GPUTORRENT_TRACE": str(path)}, timeout=300)
    if t.rc != 0:
        raise RuntimeError(f"{name} failed: {t.stderr[-500:]}")
    return tracing.read(path), t.seconds


def summary(spans: list[tracing.Span], rtt: float) -> str:
    at = tracing.phases(spans)
    return ", ".join(f"{name} {at[name][0] * 1000 / rtt:.1f}" for name in ("join", "rank", "infer stream", "first token")
                     if name in at)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--link", default="continent", choices=sorted(natlab.LINKS))
    ap.add_argument("--runs", type=int, default=3, help="traced runs of each command; the median is shown whole")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    model, work = prepare("gputorrent-trace-")
    link = natlab.LINKS[args.link]
    with natlab.NatLab() as lab:
        lab.shape(link)
        with LocalSwarm(workdir=work / "swarm") as swarm:
            relay = swarm.start("relay", command="bootstrap", wrap=lab.exec_argv("inet", []),
                                listen=f"/ip4/{natlab.RELAY_IP}/tcp/4001", timeout=60)
            swarm.start("donor", "--bootstrap", relay.addr, "--model", str(model), wrap=lab.exec_argv("inet", []),
                        listen=f"/ip4/{natlab.RELAY2_IP}/tcp/4002", timeout=180)
            rtt = tcp_rtt_ms(lab, "home-c", natlab.RELAY_IP, 4001)
            env = {**swarm.env, "XDG_DATA_HOME": str(work / "data"), "GPUTORRENT_MDNS": "0", "GPUTORRENT_AGENT": "off"}
            env.pop("GPUTORRENT_IDENTITY", None)
            ask = ["ask", "Name three colours.", "--bootstrap", relay.addr, "--max-tokens", "8", "--temperature", "0",
                   "--json"]
            gputorrent(lab, "home-c", *ask, env=env, timeout=300)  # the donor's first answer: warm it
            asks = [traced(lab, env, work, f"ask{i}", *ask) for i in range(args.runs)]
            listings = [traced(lab, env, work, f"peers{i}", "peers", "--bootstrap", relay.addr, "--json")
                        for i in range(args.runs)]
    ask_spans, ask_s = sorted(asks, key=lambda run: run[1])[len(asks) // 2]  # the median run, shown whole
    peers_spans, peers_s = sorted(listings, key=lambda run: run[1])[len(listings) // 2]
    runs = "\n".join(f"| {i + 1} | {s:.2f} | {summary(spans, rtt)} |" for i, (spans, s) in enumerate(asks))
    body = f"""## Where a cold command's round trips go (`benchmarks/trace_cold.py`)

{machine()}; the {link.name} link ({link.rtt_ms:g} ms between a home and the internet; measured
TCP connect from home C {rtt:.1f} ms), the donor and the relay/bootstrap public. {args.runs} traced runs each
(`GPUTORRENT_TRACE`, gputorrent/trace.py), after one untraced ask that warmed the donor. Start and
length from the process's own start, in ms and in round trips of the link. Spans nest and overlap
(lookups run side by side); "first token" is when the answer's first token arrived.

### `ask --no-agent`: {args.runs} runs

| run | whole process, s | round trips from the process's start: join, rank, infer stream, first token |
|---|---|---|
{runs}

The median run ({ask_s:.2f} s whole process), step by step:

{tracing.table(ask_spans, rtt)}

### `peers --no-agent` (the median of {args.runs} runs: {peers_s:.2f} s whole process)

{tracing.table(peers_spans, rtt)}
"""
    print(body)
    if not args.no_write:
        write_section("trace_cold", body)


if __name__ == "__main__":
    main()
