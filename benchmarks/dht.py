"""DHT lookup latency, hops and announce-to-visible time in swarms of 10, 50 and 100 peers.

How the swarm is built: every peer is a real libp2p host (own Ed25519 identity, own TCP
listener on 127.0.0.1, Noise, yamux) running py-libp2p's Kademlia in server mode with the
gputorrent advert validator, and all peers of one swarm share this one process and its one
trio thread. So every lookup's remote work runs on the same core as the asker: a pessimistic
setting next to one peer per machine. Peers join through peer 0 (as through a bootstrap node).
Serving is simulated: each peer announces a signed advert for one of 10 synthetic models and
provides that model's keys, exactly as a serve process does.

Targets on loopback: median provider lookup <= 250 ms at 100 peers; announce to visible <= 2 s.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, median, pct, write_section  # noqa: E402

from gputorrent.dht import records  # noqa: E402
from gputorrent.dht.node import swarm_node  # noqa: E402
from gputorrent.identity import Identity  # noqa: E402
from gputorrent.peer.host import full_addrs, running_host  # noqa: E402

MODELS = 10


def fake_advert(ident: Identity, addrs: list[str], i: int) -> records.Advert:
    now = time.time()
    model = records.ServedModel(model_id=f"{i % MODELS:064x}", alias=f"bench-model-{i % MODELS}",
                                quantization="Q4_0", context_length=2048)
    return records.Advert(peer_id=ident.peer_id, seq=int(now * 1000), issued_at=now, expires_at=now + 120,
                          addrs=addrs, name=f"bench{i}", device=records.Device(kind="cpu", name="bench"),
                          models=[model])


async def build(n: int, stack: AsyncExitStack) -> list:
    nodes = []
    for i in range(n):
        ident = Identity.generate()
        host = await stack.enter_async_context(running_host(ident, ["/ip4/127.0.0.1/tcp/0"]))
        node = await stack.enter_async_context(swarm_node(host, ident, server=True))
        if nodes:
            await node.join([full_addrs(nodes[0].host)[0]])
        nodes.append(node)
    async with trio.open_nursery() as nursery:  # everyone announces, as serve peers do at start
        for i, node in enumerate(nodes):
            nursery.start_soon(node.publish, fake_advert(node.identity, full_addrs(node.host), i))
    return nodes


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


async def measure(n: int, lookups: int, announces: int) -> dict:
    async with AsyncExitStack() as stack:
        t = time.perf_counter()
        nodes = await build(n, stack)
        built_s = time.perf_counter() - t
        ident = Identity.generate()
        host = await stack.enter_async_context(running_host(ident))
        asker = await stack.enter_async_context(swarm_node(host, ident, server=False))
        await asker.join([full_addrs(nodes[n // 2].host)[0]])
        queries = count_queries(asker)
        latencies, asked, found = [], [], []
        for j in range(lookups):
            key = records.provider_key("alias", f"bench-model-{j % MODELS}")
            queries[0] = 0
            t = time.perf_counter()
            ids = await asker.find_providers(key)
            latencies.append((time.perf_counter() - t) * 1000)
            asked.append(queries[0])
            found.append(len(ids))
        visible = []
        for j in range(announces):
            node = nodes[(j * 7) % n]
            key_name = f"late-{n}-{j}"
            key = records.provider_key("alias", key_name)
            t = time.perf_counter()
            await node.dht.provide(key)
            while node.identity.peer_id not in await asker.find_providers(key):
                await trio.sleep(0.02)
            visible.append((time.perf_counter() - t) * 1000)
    expected = n / MODELS
    return {"n": n, "built_s": built_s, "lat": latencies, "asked": asked, "found": found,
            "expected": expected, "visible": visible}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,50,100")
    ap.add_argument("--lookups", type=int, default=30)
    ap.add_argument("--announces", type=int, default=10)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        r = trio.run(measure, n, args.lookups, args.announces)
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
yamux) running py-libp2p's Kademlia in server mode; **all peers of one swarm share one process
and one trio thread**, so the remote side of every lookup runs on the asker's core (pessimistic).
Each peer announces a signed advert for one of {MODELS} synthetic models and provides its keys;
a separate client-mode requester joins through a middle peer. {args.lookups} provider lookups
(local records set aside, so every one goes to the network) and {args.announces} fresh announces
per size.

| peers | lookup median | lookup p95 | peers asked per lookup | providers found | announce → visible median | max |
|---|---|---|---|---|---|---|
{table}

Targets: median lookup ≤ 250 ms at 100 peers; announce to visible ≤ 2 s. "Peers asked" counts
GET_PROVIDERS requests (py-libp2p asks 3 at a time, so rounds ≈ asked / 3).
"""
    print(body)
    if not args.no_write:
        write_section("dht", body)


if __name__ == "__main__":
    main()
