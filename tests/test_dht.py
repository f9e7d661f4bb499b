"""A swarm with no coordinator: a bootstrap node and 5 serve processes on loopback, and
requesters in this process and as fresh CLI processes."""

import json
import signal
import time
from contextlib import asynccontextmanager

import msgspec
import pytest
import trio

from gputorrent.dht import records
from gputorrent.dht.node import swarm_node
from gputorrent.identity import Identity
from gputorrent.net.host import running_host

from .conftest import BOTH_WAYS, QUESTION
from .test_records import advert

INTERVAL, TTL = 4.0, 12.0  # short, so departures and expiry are quick to see; 8 peers on 2 cores
SERVE = ("--announce-interval", str(INTERVAL), "--advert-ttl", str(TTL), "--slots", "1", "--ctx", "512")


@pytest.fixture(scope="module")
def dht_swarm(swarm):
    boot = swarm.bootstrap()
    peers = [swarm.spawn(f"p{i}", "--bootstrap", boot.addr, *SERVE) for i in range(5)]
    for p in peers:
        p.wait_ready(120)
    return boot, peers


@asynccontextmanager
async def Requester(boot_addr: str):
    """A fresh node (new identity, empty DHT) joined through the bootstrap peer."""
    ident = Identity.generate()
    async with running_host(ident) as host, swarm_node(host, ident, server=False) as node:
        assert await node.join([boot_addr]) == 1
        yield node


async def _until(predicate, timeout: float, every: float = 0.2):
    """Poll an eventually-true condition of the swarm (time-based facts: nothing to await)."""
    with trio.move_on_after(timeout):
        while True:
            result = await predicate()
            if result:
                return result
            await trio.sleep(every)
    return None


async def test_a_fresh_requester_finds_every_peer(dht_swarm):
    boot, peers = dht_swarm
    async with Requester(boot.addr) as node:
        adverts = {a.peer_id: a for a in await node.find_model("smollm2")}
        overview = {a.peer_id for a in await node.overview()}
    assert {p.peer_id for p in peers} <= set(adverts)
    assert {p.peer_id for p in peers} <= overview
    ad = adverts[peers[0].peer_id]
    assert ad.addrs == [peers[0].addr] and ad.models[0].alias == "smollm2" and ad.models[0].total_blocks == 30
    assert ad.device.kind == "cpu" and ad.device.cores >= 1 and ad.load.slots == 1 and ad.tokens_per_s > 0


async def test_a_new_peer_is_found_within_3s_even_by_a_requester_that_looked_before(dht_swarm, swarm):
    boot, _ = dht_swarm
    async with Requester(boot.addr) as node:
        before = {a.peer_id for a in await node.find_model("smollm2")}  # leaves local provider records
        late = swarm.spawn("late", "--bootstrap", boot.addr, *SERVE)
        await trio.to_thread.run_sync(late.wait_ready, 120)
        ready_at = time.monotonic()

        async def seen():
            return late.peer_id in {a.peer_id for a in await node.find_model("smollm2")}

        assert await _until(seen, 3.0), "late peer not found within 3 s of being ready"
        assert time.monotonic() - ready_at <= 3.0
    assert late.peer_id not in before


def test_ask_with_only_bootstrap_answers(dht_swarm, swarm, cli):
    boot, peers = dht_swarm
    done = cli("ask", QUESTION, "--bootstrap", boot.addr, "--no-mdns", "--temperature", "0", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert "Paris" in out["text"] and out["receipt_verified"]
    assert out["peer_id"] in {p.peer_id for p in swarm.peers.values()}
    assert "Failed to read DHT message" not in done.stderr  # py-libp2p's noise stays quiet


@BOTH_WAYS
def test_peers_and_models_list_from_the_swarm(dht_swarm, cli):
    boot, peers = dht_swarm
    done = cli("peers", "--bootstrap", boot.addr, "--no-mdns", "--json")
    assert done.returncode == 0, done.stderr
    listed = {a["peer_id"] for a in json.loads(done.stdout)}
    assert {p.peer_id for p in peers if p.proc.poll() is None} <= listed
    assert boot.peer_id not in listed  # a bootstrap node serves nothing and announces nothing
    table = cli("peers", "--bootstrap", boot.addr, "--no-mdns")
    assert "smollm2" in table.stdout and "peers" in table.stdout
    models = cli("models", "list", "--swarm", "--bootstrap", boot.addr, "--no-mdns", "--json")
    (row,) = json.loads(models.stdout)
    assert row["alias"] == "smollm2" and row["peers"] >= 5


async def test_sigterm_leaves_within_one_interval_and_sigkill_after_expiry(dht_swarm):
    boot, peers = dht_swarm
    graceful, crashed = peers[3], peers[4]
    async with Requester(boot.addr) as node:
        lookups: list[float] = []

        async def listed():
            t = time.monotonic()
            found = {a.peer_id for a in await node.find_model("smollm2")}
            lookups.append(round(time.monotonic() - t, 2))
            return found

        assert {graceful.peer_id, crashed.peer_id} <= await listed()
        assert graceful.stop(signal.SIGTERM) == 0
        t0 = time.monotonic()
        assert await _until(lambda: _absent(listed, graceful.peer_id), INTERVAL), \
            f"SIGTERM'd peer still listed (lookups took {lookups} s)"
        assert time.monotonic() - t0 <= INTERVAL

        crashed.stop(signal.SIGKILL)
        killed_at = time.monotonic()
        assert crashed.peer_id in await listed()  # nobody said goodbye: the advert lives on...
        assert await _until(lambda: _absent(listed, crashed.peer_id), TTL + INTERVAL), "killed peer never expired"
        assert time.monotonic() - killed_at <= TTL + INTERVAL  # ...until it expires


async def _absent(listed, peer_id):
    return peer_id not in await listed()


async def test_forged_replayed_and_expired_adverts_are_refused_by_remote_peers(dht_swarm):
    from libp2p.peer.id import ID

    boot, peers = dht_swarm
    victim = peers[0]
    key = records.advert_key(victim.peer_id)
    async with Requester(boot.addr) as node:
        store = node.dht.value_store
        from gputorrent.net.host import connect

        targets = [ID.from_base58(await connect(node.host, p.addr)) for p in peers[:3] if p.proc.poll() is None]
        first = await node.get_advert_value(victim.peer_id)
        first_seq = records.open_advert(key, first).seq

        async def newer():
            ad = await node.get_advert(victim.peer_id)
            return ad if ad and ad.seq > first_seq else None

        assert await _until(newer, 3 * INTERVAL)  # the victim has re-announced since

        forger = Identity.generate()
        body = records.sign_advert(forger, advert(forger, seq=2**62, name="forged"))  # signed by another key
        expired_self = records.sign_advert(forger, advert(forger, issued=time.time() - 600, ttl=60))
        latest = await node.get_advert_value(victim.peer_id)
        assert records.open_advert(key, latest).seq > first_seq
        for target in targets:
            # Each target holds the newest copy first (a peer outside the advert's replicas may
            # hold none, and then an older copy would rightly be the best it has).
            await store._store_at_peer(target, key.encode(), latest)
            assert not await store._store_at_peer(target, key.encode(), body)  # forged
            assert not await store._store_at_peer(target, key.encode(), first)  # replayed, lower sequence
            assert not await store._store_at_peer(target, records.advert_key(forger.peer_id).encode(), expired_self)
        ad = await node.get_advert(victim.peer_id)
        assert ad is not None and ad.name != "forged" and ad.seq > first_seq
        assert await node.get_advert(forger.peer_id) is None
        with pytest.raises(records.RecordError):  # local puts run the same validator
            await node.dht.put_value(key, body)


def test_request_deadlines_follow_the_measured_round_trips():
    """A quiet machine keeps the 1 s floor; answers measured at ~1.5 s (a loaded machine) stretch
    the deadline past them, so slow but live peers are not cut off and marked suspect; never past
    the ceiling."""
    from gputorrent.dht.walk import RoundTrips

    rt = RoundTrips(floor=1.0, ceiling=5.0)
    assert rt.timeout == 1.0
    for _ in range(20):
        rt.add(0.005)
    assert rt.timeout == 1.0
    for _ in range(20):
        rt.add(1.5)
    assert 1.5 < rt.timeout <= 5.0
    for _ in range(20):
        rt.add(30.0)
    assert rt.timeout == 5.0


async def test_a_walk_keeps_peers_slower_than_the_floor_once_slowness_is_measured(autojump_clock):
    """In virtual time: peers answering in 1.5 s are lost to a fixed 1 s deadline and kept by the
    measured one."""
    import trio

    from gputorrent.dht.walk import RoundTrips, walk

    async def slow(peer):
        await trio.sleep(1.5)
        return []

    fixed = await walk(list(range(5)), slow, sorted, query_timeout=1.0, lookup_timeout=4.0)
    assert fixed.responded == [] and len(fixed.timed_out) == 5
    rt = RoundTrips(floor=1.0, ceiling=5.0)
    for _ in range(3):
        rt.add(1.5)
    adaptive = await walk(list(range(5)), slow, sorted, query_timeout=rt.timeout,
                          lookup_timeout=4.0 * rt.timeout, on_answer=rt.add)
    assert sorted(adaptive.responded) == list(range(5))


async def test_late_answers_count_and_only_silence_is_a_timeout(autojump_clock):
    """In virtual time: a request past its deadline frees its place in the walk but is still
    waited for, so peers answering at 1.5 s (a loaded machine, before any slowness is measured)
    are kept and not reported timed out; a peer silent past the late deadline is."""
    import trio

    from gputorrent.dht.walk import walk

    async def query(peer):
        await trio.sleep(1.5 if peer < 5 else 100)
        return []

    t = trio.current_time()
    walked = await walk(list(range(6)), query, sorted, query_timeout=1.0, late_timeout=2.0, lookup_timeout=8.0)
    assert sorted(walked.responded) == list(range(5)) and walked.timed_out == [5]
    assert trio.current_time() - t <= 3.5  # the silent one cost its late deadline, not the lookup's


def test_one_timeout_is_not_enough_to_leave_a_peer_out():
    """A fresh requester on a loaded machine waited 2-3 s for its first answers and its first walk
    made every peer a suspect for 30 s; a suspect now takes two timeouts in a row."""
    import trio

    from gputorrent.dht.node import SwarmNode

    async def main():
        node = SwarmNode(None, Identity.generate(), None)
        node._strike("a")
        assert not node._is_suspect("a")
        node._strike("a")
        assert node._is_suspect("a")

    trio.run(main)


async def test_an_advert_is_asked_of_its_owner_first(dht_swarm):
    """One request to the owner instead of a walk: fetching a lookup's adverts by walks sent
    ~70 requests at once and slowed a loaded swarm past every deadline."""
    boot, peers = dht_swarm
    async with Requester(boot.addr) as node:
        assert {p.peer_id for p in peers} <= set(await node.find_providers(records.provider_key("alias", "smollm2")))
        node.last_walk = None
        ad = await node.get_advert(peers[1].peer_id)
        assert ad is not None and ad.peer_id == peers[1].peer_id
        assert node.last_walk is None  # no walk was needed


async def test_a_live_provider_without_an_advert_costs_one_request_not_a_walk(dht_swarm):
    """A made-up provider that answers (a DHT node serving nothing) is asked once: its answer
    is final. A walk for each cost a requester 0.5-7 s per made-up provider."""
    from gputorrent.net.host import connect, full_addrs

    boot, peers = dht_swarm
    fake = Identity.generate()
    async with running_host(fake, ["/ip4/127.0.0.1/tcp/0"]) as host, swarm_node(host, fake, server=True) as node:
        assert await node.join([boot.addr]) == 1
        async with Requester(boot.addr) as asker:
            await connect(asker.host, full_addrs(host))
            asker.last_walk = None
            assert await asker.get_advert(fake.peer_id) is None
            assert asker.last_walk is None  # its answer was taken as final
            assert (await asker.get_advert(peers[0].peer_id)).peer_id == peers[0].peer_id


async def test_providing_that_reached_nobody_is_done_again_at_the_next_interval():
    """A peer that announced before any other DHT node was there (or whose provide was cut
    off) provides again once one is: counting that provide as done left its records at itself
    alone for ten minutes, found only by walks that happened to ask it."""
    from gputorrent.net.host import full_addrs

    first, second = Identity.generate(), Identity.generate()
    model = records.ServedModel(model_id="ab" * 32, alias="smollm2", quantization="Q8_0", context_length=2048,
                                end_block=30, total_blocks=30)
    key = bytes.fromhex(records.lookup_key("smollm2"))
    listen = ["/ip4/127.0.0.1/tcp/0"]
    async with running_host(first, listen) as host_a, swarm_node(host_a, first, server=True) as a, \
            running_host(second, listen) as host_b, swarm_node(host_b, second, server=True) as b:
        async with trio.open_nursery() as n:
            await n.start(a.announce_forever, lambda: msgspec.structs.replace(advert(first, models=[model]), addrs=full_addrs(host_a)), 0.5)
            assert await b.join(full_addrs(host_a)) == 1  # the second node, after the first announce

            async def stored_at_b():
                return first.peer_id in {p.peer_id.to_base58() for p in b.dht.provider_store.get_providers(key)}

            assert await _until(stored_at_b, 10.0), "the first peer's provider record never reached the second"
            n.cancel_scope.cancel()
