"""Internet scale by simulation: the swarm's DHT at 1,000 to 100,000 peers, in one process.

What is simulated, and what is the real code:
- The lookup is the project's own walk (``gputorrent/dht/walk.py``: 5 requests in flight, k = 20,
  stop when the 20 closest known have answered, 1 s per request, 4 s per walk, peers that
  timed out avoided for 30 s), run unchanged under trio in virtual time (MockClock). Only the
  transport under it is simulated: a request is a trio sleep of the pair's round trip (plus a
  dial of 3 round trips to a peer not connected lately), and an unreachable or hung peer never
  answers (the walk's own timeout ends it).
- The record rules are the project's constants: providers renewed every 600 s and forgotten
  after 1,800 s, at most 200 per key per node, 20 returned per answer (a random sample),
  adverts put every 30 s with a 120 s TTL, at most 64 providers kept per lookup.
- Routing tables are built by joining: each peer enters through a bootstrap node and walks for
  its own id and for a random id (a bucket refresh), learning every peer that answers; a peer
  that timed out is dropped from the table. 20 entries per bucket, the oldest kept.
- Churn: session and off times drawn from Weibull distributions (shape 0.5: heavy-tailed, as
  measured for BitTorrent and KAD peers; median session 30 min here). A fraction of peers sits
  behind NAT and cannot be dialled; a fraction is hung (connects, never answers). Round trips
  are log-normal (median 80 ms, a long tail past 500 ms).
- Bytes are counted per message from the sizes of py-libp2p's Kademlia protobufs plus framing
  (and a dial's handshakes); adverts of peers whose puts are not simulated one by one are
  counted from the measured cost of the puts that are.

``--peers 10000 --json`` prints one JSON object; without ``--json`` it also writes the table
for 1,000, 10,000 and 100,000 peers to docs/benchmarks.md (``--sizes``).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, median, pct, write_section

from gputorrent.dht.guards import PROVIDER_TTL_S, PROVIDERS_PER_KEY
from gputorrent.dht.node import (
    ADVERT_REPLICAS,
    LOOKUP_TIMEOUT_S,
    MAX_PROVIDERS,
    QUERY_TIMEOUT_S,
    REWALK_S,
    STORE_TIMEOUT_S,
    SUSPECT_S,
)
from gputorrent.dht.records import ADVERT_TTL_S, ANNOUNCE_INTERVAL_S, PROVIDE_INTERVAL_S
from gputorrent.dht.walk import K, walk

BITS = 64
# Message sizes in bytes (protobuf + yamux/Noise framing + a new stream's multistream-select,
# since py-libp2p opens a stream per request).
STREAM = 90
PEER_ENTRY = 90  # peer id (38) + two multiaddrs
REQ = STREAM + 60  # FIND_NODE / GET_PROVIDERS / GET_VALUE: type and key
CLOSER = 20 * PEER_ENTRY  # closer peers in an answer
ADD_PROVIDER = STREAM + 60 + PEER_ENTRY
ADVERT = 800  # a signed advert (PUT_VALUE, GET_VALUE answer)
DIAL = 3000  # TCP + Noise XX + yamux + identify, both ways
CONNECTIONS = 100  # connections a peer keeps (least recently used closed first)


def key_of(text: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


@dataclass(eq=False)
class Node:
    id: int
    nat: bool = False
    hung: bool = False
    online: bool = False
    lat: float = 0.04  # one-way latency to the "core" (s); a pair's round trip is the sum x 2
    buckets: dict[int, list[int]] = field(default_factory=dict)
    providers: dict[int, dict[int, float]] = field(default_factory=dict)  # key -> provider -> expiry
    values: dict[int, float] = field(default_factory=dict)  # advert key -> expiry
    suspect: dict[int, float] = field(default_factory=dict)
    conns: OrderedDict = field(default_factory=OrderedDict)
    model: int = 0
    shard: bool = False  # holds blocks of its model, not all of it
    joined_at: float = 0.0


class Sim:
    def __init__(self, n: int, seed: int, nat: float, hung: float, session_s: float, nat_server: bool) -> None:
        self.rng = random.Random(seed)
        self.nat_server = nat_server  # True: peers behind NAT run the DHT in server mode (as serve does)
        self.session_s = session_s
        ids = {self.rng.getrandbits(BITS) for _ in range(n)}
        self.nodes: dict[int, Node] = {}
        for i in ids:
            nd = Node(i, lat=min(0.6, self.rng.lognormvariate(math.log(0.02), 0.6)))
            r = self.rng.random()
            nd.nat = r < nat
            nd.hung = nat <= r < nat + hung
            self.nodes[i] = nd
        self.order = list(self.nodes)
        self.rng.shuffle(self.order)
        self.boot = [self.nodes[i] for i in self.order[:8]]
        for b in self.boot:
            b.nat = b.hung = False
        self.bytes = defaultdict(float)  # node id -> bytes sent and received
        self.msgs = 0
        self.models = 50
        self.zipf = [1 / (r + 1) for r in range(self.models)]

    # --- the transport --------------------------------------------------------------------

    def rtt(self, a: Node, b: Node) -> float:
        return 2 * (a.lat + b.lat) * self.rng.uniform(0.9, 1.2)

    def count(self, a: Node, b: Node, nbytes: float) -> None:
        self.bytes[a.id] += nbytes
        self.bytes[b.id] += nbytes
        self.msgs += 1

    async def request(self, src: Node, dst_id: int, size_req: int, answer) -> object:
        """One request from ``src``; ``answer(dst)`` gives (reply, reply bytes). A peer that is
        offline, behind NAT or hung never answers: the caller's timeout ends the wait."""
        dst = self.nodes[dst_id]
        if not dst.online or dst.nat:
            await trio.sleep_forever()
        rtt = self.rtt(src, dst)
        if dst_id not in src.conns:
            await trio.sleep(3 * rtt)
            self.count(src, dst, DIAL)
            src.conns[dst_id] = True
            if len(src.conns) > CONNECTIONS:
                src.conns.popitem(last=False)
        else:
            src.conns.move_to_end(dst_id)
        if dst.hung:
            await trio.sleep_forever()
        await trio.sleep(rtt)
        reply, size = answer(dst)
        self.count(src, dst, size_req + size)
        if self.nat_server or not src.nat:  # a server-mode peer that asked joins the answerer's table
            self.add(dst, src.id)
        return reply

    # --- routing tables -----------------------------------------------------------------------

    def add(self, nd: Node, peer: int) -> None:
        if peer == nd.id:
            return
        b = nd.buckets.setdefault((nd.id ^ peer).bit_length(), [])
        if peer not in b and len(b) < K:
            b.append(peer)

    def drop(self, nd: Node, peer: int) -> None:
        b = nd.buckets.get((nd.id ^ peer).bit_length())
        if b and peer in b:
            b.remove(peer)

    def closest(self, nd: Node, key: int, n: int = K) -> list[int]:
        return heapq.nsmallest(n, (p for b in nd.buckets.values() for p in b), key=lambda p: p ^ key)

    async def lookup(self, nd: Node, key: int, kind: str = "node", found: list | None = None):
        """The real walk from ``nd``'s table; ``kind`` picks what each peer answers."""
        now = trio.current_time

        def is_suspect(p: int) -> bool:
            return nd.suspect.get(p, 0) > now()

        async def query(peer: int):
            def answer(dst: Node):
                closer = self.closest(dst, key)
                if kind == "providers":
                    live = [p for p, exp in dst.providers.get(key, {}).items() if exp > now()]
                    sample = live if len(live) <= K else self.rng.sample(live, K)
                    return (closer, sample), CLOSER + len(sample) * PEER_ENTRY
                if kind == "value":
                    has = dst.values.get(key, 0) > now()
                    return (closer, has), CLOSER + (ADVERT if has else 0)
                return (closer, None), CLOSER

            closer, extra = await self.request(nd, peer, REQ, answer)
            self.add(nd, peer)
            if found is not None and extra:
                found.extend(extra if isinstance(extra, list) else [peer])
            return closer

        walked = await walk(self.closest(nd, key), query, lambda ps: sorted(ps, key=lambda p: p ^ key), me=nd.id,
                            is_suspect=is_suspect, query_timeout=QUERY_TIMEOUT_S, lookup_timeout=LOOKUP_TIMEOUT_S,
                            enough=(lambda: len(found) >= MAX_PROVIDERS) if kind == "providers" and found is not None
                            else (lambda: bool(found)) if kind == "value" and found is not None else (lambda: False))
        for p in walked.timed_out:
            nd.suspect[p] = now() + SUSPECT_S
            self.drop(nd, p)
        return walked

    async def store(self, nd: Node, key: int, kind: str, cache: dict | None = None) -> tuple[object, int]:
        """A store at the closest peers, as ``DhtNode._store_near`` does: a walk to the key, or
        for a renewal within ``REWALK_S`` the peers the last walk found (while half still take
        it); adverts go to ``ADVERT_REPLICAS`` peers, provider records to ``K``."""
        replicas = ADVERT_REPLICAS if kind == "value" else K
        cache = {} if cache is None else cache
        walked = None
        if key in cache and trio.current_time() - cache[key][0] < REWALK_S:
            targets = cache[key][1]
        else:
            walked = await self.lookup(nd, key)
            targets = walked.responded[:replicas]
            cache[key] = (trio.current_time(), targets)
        stored = 0

        async def one(peer: int) -> None:
            nonlocal stored

            def answer(dst: Node):
                if kind == "provider":
                    recs = dst.providers.setdefault(key, {})
                    if nd.id in recs or len(recs) < PROVIDERS_PER_KEY:
                        recs[nd.id] = trio.current_time() + PROVIDER_TTL_S
                else:
                    dst.values[key] = trio.current_time() + ADVERT_TTL_S
                return None, 20

            with trio.move_on_after(STORE_TIMEOUT_S):
                await self.request(nd, peer, ADD_PROVIDER if kind == "provider" else STREAM + ADVERT, answer)
                stored += 1

        async with trio.open_nursery() as n:
            for p in targets:
                n.start_soon(one, p)
        if walked is not None or 2 * stored >= len(targets):
            return walked, stored
        del cache[key]
        return await self.store(nd, key, kind, cache)

    # --- peers' lives -------------------------------------------------------------------------

    def session(self) -> float:
        return self.rng.weibullvariate(self.session_s / math.log(2) ** 2, 0.5)

    async def join(self, nd: Node) -> None:
        nd.online = True
        nd.joined_at = trio.current_time()
        nd.suspect.clear()
        self.add(nd, self.rng.choice(self.boot).id)
        await self.lookup(nd, nd.id)
        await self.lookup(nd, self.rng.getrandbits(BITS))

    async def life(self, nd: Node, stop: float, start_delay: float, churn: bool, adverts: bool) -> None:
        """Join, provide the model (again every 600 s) and, for sampled peers, put the advert
        every 30 s; leave after a session and come back after an off time."""
        await trio.sleep(start_delay)
        while trio.current_time() < stop:
            await self.join(nd)
            if nd.hung:  # froze after joining: in others' tables, answering nobody
                await trio.sleep(max(0.0, stop - trio.current_time()))
                return
            end = trio.current_time() + (self.session() if churn and nd not in self.boot else math.inf)
            with trio.move_on_at(min(end, stop)):
                async with trio.open_nursery() as n:
                    n.start_soon(self.renew, nd, self.provider_key(nd), PROVIDE_INTERVAL_S, "provider")
                    if adverts:
                        n.start_soon(self.renew, nd, key_of(f"advert/{nd.id}"), self.announce_s, "value")
            nd.online = False
            nd.conns.clear()
            if not churn or trio.current_time() >= stop:
                return
            await trio.sleep(self.session())

    async def renew(self, nd: Node, key: int, interval: float, kind: str) -> None:
        await trio.sleep(self.rng.uniform(0, min(interval, 5.0)))
        cache: dict = {}
        while True:
            t = trio.current_time()
            before = self.bytes[nd.id]
            await self.store(nd, key, kind, cache)
            if kind == "value":  # the bytes this peer sent and received for its own put
                self.put_costs.append((self.bytes[nd.id] - before, t))
            await trio.sleep(max(0.0, interval - (trio.current_time() - t)))

    put_costs: list = []
    layout = "split"

    def provider_key(self, nd: Node) -> int:
        """The key ``nd`` provides its model under: shard peers under a key of their own
        (records.model_keys, "split"), or beside whole peers as before ("mixed")."""
        return key_of(f"{'shards' if nd.shard and self.layout == 'split' else 'model'}/{nd.model}")


def simulate(n: int, *, seed: int = 1, minutes: float = 20.0, warmup_min: float = 8.0, nat: float = 0.3,
             hung: float = 0.01, session_min: float = 30.0, lookups: int = 400, sampled_adverts: int = 200,
             churn: bool = True, nat_server: bool = True, announce_s: float = ANNOUNCE_INTERVAL_S,
             shards: float = 0.0, layout: str = "split") -> dict:
    sim = Sim(n, seed, nat, hung, session_min * 60, nat_server)
    sim.put_costs = []
    sim.layout = layout
    sim.announce_s = announce_s
    rng = sim.rng
    out: dict = {"peers": n}
    hops, asked, ok, visible, providers_found, overview_msgs, lat = [], [], [], [], [], [], []
    useless: list[float] = []  # share of the providers a whole-model lookup found that are shard peers

    for nd in sim.nodes.values():
        nd.model = rng.choices(range(sim.models), weights=sim.zipf)[0]
        nd.shard = rng.random() < shards

    async def main() -> None:
        t_wall = time.monotonic()
        async with trio.open_nursery() as nursery:
            for b in sim.boot:
                b.online = True
            # Peers start over the first minutes (as a swarm grows), each joining by a walk.
            sample = set(rng.sample(sim.order, min(sampled_adverts, n)))
            for i, nid in enumerate(sim.order):
                nd = sim.nodes[nid]
                nursery.start_soon(sim.life, nd, math.inf, (i / n) * warmup_min * 60 * 0.6, churn, nid in sample)
            await trio.sleep(warmup_min * 60)
            bytes_at, t_at = dict(sim.bytes), trio.current_time()
            online = lambda: [nd for nd in sim.nodes.values() if nd.online and not nd.hung]  # noqa: E731
            gap = minutes * 60 / max(1, lookups)
            for j in range(lookups):
                live = online()
                asker = rng.choice(live)
                model = rng.choices(range(sim.models), weights=sim.zipf)[0]
                key = key_of(f"model/{model}")
                now = trio.current_time()
                # Providers a requester could use: online and dialable, announced a minute ago or more.
                have = {nd.id for nd in live if nd.model == model and not nd.nat and not nd.shard
                        and now - nd.joined_at >= 60}
                found: list[int] = []
                t = trio.current_time()
                walked = await sim.lookup(asker, key, "providers", found)
                lat.append(trio.current_time() - t)
                hops.append(walked.hops)
                asked.append(walked.asked)
                got = set(found) & have
                if have:
                    ok.append(bool(got))
                if found:
                    useless.append(sum(sim.nodes[p].shard for p in set(found)) / len(set(found)))
                if model == 0:
                    providers_found.append((len(set(found)), len(have)))
                if j % 10 == 0:  # announce to visible: a fresh key, provided, then looked up
                    who = rng.choice(live)
                    fresh = rng.getrandbits(BITS)
                    t0 = trio.current_time()
                    await sim.store(who, fresh, "provider")
                    for _ in range(20):
                        seen: list[int] = []
                        await sim.lookup(rng.choice(online()), fresh, "providers", seen)
                        if who.id in seen:
                            visible.append(trio.current_time() - t0)
                            break
                        await trio.sleep(1.0)
                    if j % 50 == 0:  # one overview: a lookup of the swarm key, as `peers` does
                        overview_msgs.append((await sim.lookup(asker, key_of("swarm/all"))).asked)
                await trio.sleep(max(0.0, gap - (trio.current_time() - now)))
            span = trio.current_time() - t_at
            per_peer = [(sim.bytes[i] - bytes_at.get(i, 0)) / span for i in sim.nodes]
            out["bytes_per_s_per_peer_simulated"] = median(per_peer)
            out["bytes_per_s_busiest_peer"] = max(per_peer)
            out["wall_s"] = round(time.monotonic() - t_wall, 1)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    # Adverts: only a sample of peers put theirs one by one; every peer does, so the rest is
    # counted from the measured cost of the sampled puts (messages x an average message).
    # (A put's bytes, counted at the putting peer, are also received by others: x 2.)
    puts = [c for c, t in sim.put_costs if t >= warmup_min * 60]
    advert_bps = 2 * (sum(puts) / len(puts)) / announce_s if puts else 0.0
    sampled_share = min(sampled_adverts, n) / n
    out.update({
        "lookup_hops_p50": median(hops), "lookup_hops_p95": pct(hops, 95),
        "lookup_messages_p50": median(asked), "lookup_messages_p95": pct(asked, 95),
        "lookup_s_p50": round(median(lat), 3), "lookup_s_p95": round(pct(lat, 95), 3),
        "lookup_success": round(sum(ok) / max(1, len(ok)), 4),
        "announce_visible_s_p50": round(median(visible), 2) if visible else None,
        "announce_visible_s_p95": round(pct(visible, 95), 2) if visible else None,
        "popular_model_providers_found": (median([f for f, _ in providers_found]),
                                          median([h for _, h in providers_found])) if providers_found else None,
        "overview_messages": median(overview_msgs) if overview_msgs else None,
        "advert_put_bytes_mean": round(sum(puts) / len(puts)) if puts else None,
        "announce_interval_s": announce_s,
        "bytes_per_s_per_peer": round(out["bytes_per_s_per_peer_simulated"] + advert_bps * (1 - sampled_share), 1),
        "nat": nat, "nat_server_mode": nat_server, "hung": hung, "session_median_min": session_min, "churn": churn,
        "shards": shards, "layout": layout,
        "shard_share_of_found_mean": round(sum(useless) / len(useless), 4) if useless else 0.0,
    })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=10_000)
    ap.add_argument("--sizes", help="comma-separated peer counts for the docs table, e.g. 1000,10000,100000")
    ap.add_argument("--minutes", type=float, default=20.0, help="virtual minutes measured after the warm-up")
    ap.add_argument("--lookups", type=int, default=400)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--nat", type=float, default=0.3, help="share of peers behind NAT (not dialable)")
    ap.add_argument("--hung", type=float, default=0.01, help="share of peers that never answer")
    ap.add_argument("--session-min", type=float, default=30.0, help="median session length")
    ap.add_argument("--no-churn", action="store_true")
    ap.add_argument("--shards", type=float, default=0.0, help="share of peers holding shards (blocks) of their model")
    ap.add_argument("--layout", choices=["split", "mixed"], default="split",
                    help="split: shards provide under keys of their own (as serve does); mixed: beside whole peers")
    ap.add_argument("--shard-keys", action="store_true",
                    help="the shard-key comparison: no shards, 30%% split, 30%% mixed, side by side; writes its table")
    ap.add_argument("--calibrate", default="50,100", help="real-swarm sizes to calibrate against ('' for none)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    kw = dict(seed=args.seed, minutes=args.minutes, nat=args.nat, hung=args.hung, session_min=args.session_min,
              lookups=args.lookups, churn=not args.no_churn)
    if args.shard_keys:
        body = shard_keys(args.peers, kw)
        print(body)
        if not args.no_write:
            write_section("simulate-shards", body)
        return
    if args.json:
        print(json.dumps(simulate(args.peers, shards=args.shards, layout=args.layout, **kw)))
        return
    rows = []
    for n in [int(x) for x in (args.sizes or str(args.peers)).split(",")]:
        r = simulate(n, **kw)
        print(json.dumps(r), file=sys.stderr)
        rows.append(r)
    calibration = calibrate([int(x) for x in args.calibrate.split(",")]) if args.calibrate else []
    body = report(rows, calibration, kw)
    print(body)
    if not args.no_write:
        write_section("simulate", body)


def shard_keys(n: int, kw: dict) -> str:
    """Whole-model lookups with no shard peers, with 30 % shard peers under keys of their own
    (the layout serve uses), and with the same 30 % beside whole peers: same seed, same swarm."""
    runs = []
    for shards, layout, label in [(0.0, "split", "no shard peers"), (0.3, "split", "30 % shard peers, own keys"),
                                  (0.3, "mixed", "30 % shard peers, under the model's keys")]:
        r = simulate(n, shards=shards, layout=layout, **kw)
        print(json.dumps(r), file=sys.stderr)
        runs.append((label, r))
    return shard_keys_report(n, kw, runs)


def shard_keys_report(n: int, kw: dict, runs: list[tuple[str, dict]]) -> str:
    p = runs[0][1]["lookup_success"]
    margin = 100 * 1.96 * math.sqrt(max(p * (1 - p), 1e-4) / kw["lookups"])  # binomial, 95 %
    rows = "\n".join(
        f"| {label} | {100 * r['lookup_success']:.1f} % | {r['lookup_hops_p50']:.0f} / {r['lookup_hops_p95']:.0f} | "
        f"{r['lookup_messages_p50']:.0f} / {r['lookup_messages_p95']:.0f} | {r['lookup_s_p50']:.2f} / "
        f"{r['lookup_s_p95']:.2f} s | {100 * r['shard_share_of_found_mean']:.1f} % |" for label, r in runs)
    return f"""## Shard keys at scale, simulated (`benchmarks/simulate.py --shard-keys`)

{machine()}. {n:,} peers, the set-up of the table above ({kw['minutes']:g} virtual minutes, {kw['lookups']}
whole-model lookups, churn, {100 * kw['nat']:.0f} % behind NAT, {100 * kw['hung']:.0f} % hung), same seed in each
run. A shard peer holds blocks of its model; success counts only whole-model providers (live, dialable).
"Shard records in what was found": of the providers a whole-model lookup returned, the share that
were shard peers, each an advert fetch wasted and a slot of the 64 kept per lookup taken.

| set-up | success | hops p50 / p95 | messages p50 / p95 | lookup time p50 / p95 | shard records in what was found |
|---|---|---|---|---|---|
{rows}

With {kw['lookups']} lookups a run's success rate is known to about ±{margin:.1f} points (binomial, 95 %):
differences smaller than that are not told apart here. With 30 % of peers holding shards there are
also 30 % fewer whole-model holders, which alone lowers success for the rarest models.
Shard peers provide under keys of their own (`records.model_keys`): a whole-model lookup never reads
their records, and a chain's lookup reads only theirs.
"""


def calibrate(sizes: list[int]) -> list[tuple[int, dict, dict]]:
    """The same provider lookups on a real swarm (benchmarks/dht.py: py-libp2p hosts on
    loopback) and in the simulation with no churn, NAT or hung peers, side by side."""
    import dht

    out = []
    for n in sizes:
        procs, seed = dht.start_workers(n, min(4, n))
        try:
            real = trio.run(dht.measure, seed, n, 30, 0)
        finally:
            dht.stop_workers(procs)
        sim = simulate(n, churn=False, nat=0.0, hung=0.0, lookups=60, minutes=5, warmup_min=3)
        print(n, "real hops", median(real["hops"]), "asked", median(real["asked"]), "sim", sim["lookup_hops_p50"],
              sim["lookup_messages_p50"], file=sys.stderr)
        out.append((n, real, sim))
    return out


def report(rows: list[dict], calibration: list, kw: dict) -> str:
    table = "\n".join(
        f"| {r['peers']:,} | {r['lookup_hops_p50']:.0f} / {r['lookup_hops_p95']:.0f} | "
        f"{r['lookup_messages_p50']:.0f} / {r['lookup_messages_p95']:.0f} | {r['lookup_s_p50']:.2f} / "
        f"{r['lookup_s_p95']:.2f} s | {100 * r['lookup_success']:.1f} % | {r['announce_visible_s_p50']} s | "
        f"{r['bytes_per_s_per_peer']:.0f} B/s (busiest {r['bytes_per_s_busiest_peer']:.0f}) | "
        f"{r['popular_model_providers_found'][0]:.0f} of {r['popular_model_providers_found'][1]:.0f} | "
        f"{r['overview_messages']:.0f} | {r['wall_s']:.0f} s |" for r in rows)
    cal = "\n".join(
        f"| {n} | {median(real['hops']):.0f} (p95 {pct(real['hops'], 95):.0f}) | {sim['lookup_hops_p50']:.0f} "
        f"(p95 {sim['lookup_hops_p95']:.0f}) | {median(real['asked']):.0f} (p95 {pct(real['asked'], 95):.0f}) | "
        f"{sim['lookup_messages_p50']:.0f} (p95 {sim['lookup_messages_p95']:.0f}) |" for n, real, sim in calibration)
    return f"""## Internet scale, simulated (`benchmarks/simulate.py`)

{machine()}. One process, virtual time (trio's MockClock). The lookup is the project's own walk
(`gputorrent/dht/walk.py`, unchanged) over a simulated transport; routing tables are built by joining;
record rules and intervals are the project's constants. Churn: Weibull sessions and off times (shape 0.5,
median {kw['session_min']:g} min); {100 * kw['nat']:.0f} % of peers behind NAT (not dialable, yet in server mode
as `serve` runs today); {100 * kw['hung']:.0f} % hung (in tables, never answering); log-normal round trips
(median ~80 ms); a dial costs 3 round trips and ~3 KB. {kw['lookups']} provider lookups of 50 models
(Zipf popularity) over {kw['minutes']:g} virtual minutes after an 8-minute warm-up. Success: the lookup
found a live, dialable provider of the model (one online for a minute or more), when one exists.

| peers | hops p50 / p95 | messages p50 / p95 | lookup time p50 / p95 | success | announce → visible p50 | background per peer | popular model: providers found of live | overview messages | wall |
|---|---|---|---|---|---|---|---|---|---|
{table}

Background traffic counts every byte a peer sends and receives for the DHT: its own advert puts
(every 30 s, {ADVERT_REPLICAS} replicas) and provider renewals (every 600 s), the walks for them, joins,
and answering and storing for others; adverts of peers not simulated one by one are counted from the
measured mean cost of those that were.

Calibration: the same provider lookups on a real swarm of py-libp2p hosts on loopback
(`benchmarks/dht.py`'s swarm) and in the simulation with no churn, NAT or hung peers.

| peers | real hops p50 | simulated hops p50 | real messages p50 | simulated messages p50 |
|---|---|---|---|---|
{cal}
"""


if __name__ == "__main__":
    main()
