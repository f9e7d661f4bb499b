"""DHT lookup latency, hops and announce-to-visible time in swarms of 10, 50 and 100 peers.

How the swarm is built: every peer is a real libp2p host (own Ed25519 identity, own TCP
listener on 127.0.0.1, Noise, yamux) running py-libp2p's Kademlia in server mode with the
gputorrent advert validator. The peers are spread over ``--workers`` processes (this script with
``--worker``), each running its share on one trio thread; peers join through the first one (as
through a bootstrap node), eight at a time per process. The requester runs here.
Serving is simulated: each peer announces a signed advert for one of 10 synthetic models and
provides that model's keys, exactly as a serve process does.

Targets on loopback: median provider lookup <= 250 ms at 100 peers; announce to visible <= 2 s.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, median, pct, write_section

from gputorrent.dht import records
from gputorrent.dht.node import swarm_node
from gputorrent.identity import Identity
from gputorrent.net.host import full_addrs, running_host

MODELS = 10


def fake_advert(ident: Identity, addrs: list[str], i: int) -> records.Advert:
    now = time.time()
    model = records.ServedModel(model_id=f"{i % MODELS:064x}", alias=f"bench-model-{i % MODELS}",
                                quantization="Q4_0", context_length=2048)
    return records.Advert(peer_id=ident.peer_id, seq=int(now * 1000), issued_at=now, expires_at=now + 120,
                          addrs=addrs, name=f"bench{i}", device=records.Device(kind="cpu", name="bench"),
                          models=[model])


async def build(n: int, stack: AsyncExitStack, seed: str | None = None, offset: int = 0) -> list:
    """``n`` DHT server nodes in this process, joined through ``seed`` (or the first of them)."""
    nodes = []
    for _ in range(n):
        ident = Identity.generate()
        host = await stack.enter_async_context(running_host(ident, ["/ip4/127.0.0.1/tcp/0"]))
        nodes.append(await stack.enter_async_context(swarm_node(host, ident, server=True)))
    seed = seed or full_addrs(nodes[0].host)[0]
    limit = trio.Semaphore(8)  # peers join and announce a few at a time, as they would start

    async def start(i: int, node) -> None:
        async with limit:
            if full_addrs(node.host)[0] != seed:
                await node.join([seed])
            await node.publish(fake_advert(node.identity, full_addrs(node.host), offset + i))

    async with trio.open_nursery() as nursery:
        for i, node in enumerate(nodes[:8]):  # a core of peers first, so later joins find a table
            nursery.start_soon(start, i, node)
    async with trio.open_nursery() as nursery:
        for i, node in enumerate(nodes[8:], start=8):
            nursery.start_soon(start, i, node)
    return nodes


async def worker(count: int, offset: int, seed: str | None) -> None:
    """Host ``count`` peers until stdin closes; print the seed address and READY."""
    async with AsyncExitStack() as stack:
        nodes = await build(count, stack, seed, offset)
        print(f"SEED {full_addrs(nodes[0].host)[0]}" if seed is None else "JOINED", flush=True)
        print("READY", flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)


def start_workers(n: int, workers: int) -> tuple[list[subprocess.Popen], str]:
    sizes = [n // workers + (1 if i < n % workers else 0) for i in range(workers)]
    cmd = [sys.executable, __file__, "--worker"]

    def spawn(count: int, offset: int, seed: str | None) -> subprocess.Popen:
        args = cmd + ["--count", str(count), "--offset", str(offset)] + (["--seed", seed] if seed else [])
        return subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    first = spawn(sizes[0], 0, None)
    seed = first.stdout.readline().split()[1]
    assert first.stdout.readline().strip() == "READY"
    rest = [spawn(c, sum(sizes[:i + 1]), seed) for i, c in enumerate(sizes[1:])]
    for p in rest:
        while p.stdout.readline().strip() != "READY":
            pass
    return [first, *rest], seed


def stop_workers(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.stdin.close()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def count_queries(node) -> list[int]:
    """Wrap the per-peer GET_PROVIDERS call to count the peers a lookup asks."""
    store = node.dht.provider_store
    counter = [0]
    inner = store._get_providers_from_peer_with_closers

    async def counted(peer_id, key):
        counter[0] += 1
        return await inner(peer_id, key)

    store._get_providers_from_peer_with_closers = counted
    return counter


async def measure(seed: str, n: int, lookups: int, announces: int) -> dict:
    async with AsyncExitStack() as stack:
        ident = Identity.generate()
        host = await stack.enter_async_context(running_host(ident))
        asker = await stack.enter_async_context(swarm_node(host, ident, server=False))
        await asker.join([seed])
        (announcer,) = await build(1, stack, seed, offset=n)
        queries = count_queries(asker)
        latencies, asked, found, hops = [], [], [], []
        for j in range(lookups):
            key = records.provider_key("alias", f"bench-model-{j % MODELS}")
            queries[0] = 0
            t = time.perf_counter()
            ids = await asker.find_providers(key)
            latencies.append((time.perf_counter() - t) * 1000)
            asked.append(queries[0])
            found.append(len(ids))
            hops.append(asker.last_walk.hops if asker.last_walk else 0)
        visible = []
        for j in range(announces):
            key = records.provider_key("alias", f"late-{n}-{j}")
            t = time.perf_counter()
            await announcer.dht.provide(key)
            while announcer.identity.peer_id not in await asker.find_providers(key):
                await trio.sleep(0.02)
            visible.append((time.perf_counter() - t) * 1000)
    return {"n": n, "lat": latencies, "asked": asked, "found": found, "expected": n / MODELS, "visible": visible,
            "hops": hops}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,50,100")
    ap.add_argument("--lookups", type=int, default=30)
    ap.add_argument("--announces", type=int, default=10)
    ap.add_argument("--workers", type=int, default=4, help="processes hosting the swarm's peers")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--seed", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        trio.run(worker, args.count, args.offset, args.seed)
        return
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        t = time.perf_counter()
        procs, seed = start_workers(n, min(args.workers, n))
        built_s = time.perf_counter() - t
        try:
            r = trio.run(measure, seed, n, args.lookups, args.announces) | {"built_s": built_s}
        finally:
            stop_workers(procs)
        rows.append(r)
        print(f"{n} peers (built in {r['built_s']:.1f}s): lookup median {median(r['lat']):.0f} ms, "
              f"p95 {pct(r['lat'], 95):.0f} ms, peers asked {median(r['asked']):.0f}, found "
              f"{median(r['found']):.0f}/{r['expected']:.0f}; announce→visible median "
              f"{median(r['visible']):.0f} ms", file=sys.stderr)
    table = "\n".join(
        f"| {r['n']} | {median(r['lat']):.0f} ms | {pct(r['lat'], 95):.0f} ms | {median(r['asked']):.0f} "
        f"(max {max(r['asked'])}) | {median(r['found']):.0f} of {r['expected']:.0f} | "
        f"{median(r['visible']):.0f} ms | {max(r['visible']):.0f} ms |"
        for r in rows)
    body = f"""## DHT lookups (`benchmarks/dht.py`)

{machine()}. Every peer is a real libp2p host (own identity, TCP listener on 127.0.0.1, Noise,
yamux) running py-libp2p's Kademlia in server mode with the advert validator. **The peers of one
swarm share {args.workers} worker processes** (up to {args.workers}; each process runs its peers
on one trio thread), so on these 2 cores every lookup competes with the whole swarm's work: a
pessimistic setting next to one peer per machine. Each peer announces a signed advert for one of
{MODELS} synthetic models and provides its keys. The requester (client mode) and one announcing
peer run in the benchmark process. {args.lookups} provider lookups and {args.announces} fresh
announces (provide → a lookup sees it) per size.

| peers | lookup median | lookup p95 | peers asked per lookup | providers found | announce → visible median | max |
|---|---|---|---|---|---|---|
{table}

Targets: median lookup ≤ 250 ms at 100 peers; announce to visible ≤ 2 s. "Peers asked" counts
GET_PROVIDERS requests (our lookup keeps 5 in flight and stops once the 20 closest known peers
have answered). "Providers found" is the median over lookups of providers returned against
providers announced: a provider is missed when its own `provide` did not reach the peers the
lookup asks, which happens here while dozens of peers join and announce at once on 2 cores.
"""
    print(body)
    if not args.no_write:
        write_section("dht", body)


if __name__ == "__main__":
    main()
