"""Hostile requesters and peers, as real processes and raw protocol clients: none of them may
deny service to honest requesters."""

from __future__ import annotations

import time

import pytest
import trio

from gputorrent import protocol, wire
from gputorrent.api import Swarm
from gputorrent.asking.asker import new_request_id
from gputorrent.asking.client import ping, run_attempt
from gputorrent.identity import Identity
from gputorrent.net.host import connect, new_stream, running_host

from .conftest import QUESTION

pytestmark = pytest.mark.slow

PEER = ("--slots", "4", "--ctx", "512", "--threads", "1")


async def _first_reply(host, peer_id: str, req: wire.InferRequest) -> wire.Reply:
    payload = wire.encode(req)
    stream = await new_stream(host, peer_id, [protocol.INFER])
    await stream.write(wire.frame(payload))
    verifier = wire.ReplyVerifier(peer_id, protocol.INFER, req.request_id, wire.request_digest(payload))
    with trio.fail_after(10):
        reply = verifier.open(await wire.FrameReader(stream).read_frame())
    await stream.reset()
    return reply


async def _load(host, peer_id: str) -> wire.Pong:
    return (await ping(host, peer_id, 5.0))[1]


async def test_ghost_slots_and_poisoned_tokens_take_nothing_from_honest_requesters(swarm):
    peer = swarm.start("target", *PEER)
    async with running_host(Identity.generate()) as host:
        pid = await connect(host, peer.addr)
        # An empty prompt tokenizes to nothing on this model (no BOS): refused before it takes a slot.
        empty = await _first_reply(host, pid, wire.InferRequest(request_id=new_request_id(), prompt=""))
        assert isinstance(empty, wire.Error) and "empty" in empty.message
        # A token id outside the vocabulary would fail llama_decode for every sequence in the batch.
        poison = await _first_reply(host, pid, wire.InferRequest(
            request_id=new_request_id(), prompt="Hi", resume_ids=[49152], params=wire.Params(max_tokens=8)))
        assert isinstance(poison, wire.Error) and "vocabulary" in poison.message
        # Four long answers, half-closed, then abandoned with a reset: the peer notices within
        # a heartbeat and frees every slot.
        streams = []
        for _ in range(4):
            req = wire.InferRequest(request_id=new_request_id(), messages=[wire.ChatMessage(
                "user", "Write a long story about the sea.")], params=wire.Params(max_tokens=400, temperature=0.0))
            s = await new_stream(host, pid, [protocol.INFER])
            await s.write(wire.frame(wire.encode(req)))
            await s.close()  # half-closed: we could still read
            streams.append(s)
        with trio.fail_after(20):
            while (await _load(host, pid)).active < 3:  # (one may be done already on a fast machine)
                await trio.sleep(0.05)
        for s in streams:
            await s.reset()
        t0 = time.monotonic()
        with trio.fail_after(15):
            while (await _load(host, pid)).active:
                await trio.sleep(0.1)
        freed_s = time.monotonic() - t0
        res = await run_attempt(host, pid, wire.InferRequest(
            request_id=new_request_id(), messages=[wire.ChatMessage("user", QUESTION)],
            params=wire.Params(temperature=0.0, max_tokens=16)), lambda ids, text: None)
        assert "Paris" in res.text
    assert freed_s < 5
    assert peer.proc.poll() is None


async def test_an_unbounded_model_name_is_not_echoed(swarm):
    import msgspec

    peer = swarm.peers.get("target") or swarm.start("target", *PEER)
    async with running_host(Identity.generate()) as host:
        pid = await connect(host, peer.addr)
        huge = msgspec.msgpack.encode(["req", b"x" * 16, "m" * (1 << 19), None, "hi", {}, [], 1000])
        stream = await new_stream(host, pid, [protocol.INFER])
        await stream.write(wire.frame(huge))
        with trio.fail_after(10):
            raw = await wire.FrameReader(stream).read_frame()
        reply = wire.ReplyVerifier(pid, protocol.INFER, b"", b"").open(raw)
        assert isinstance(reply, wire.Error) and reply.code == protocol.BAD_REQUEST  # signed, and short
        assert len(raw) < 4096


async def _timed_ask(s: Swarm) -> tuple[float, object]:
    t0 = time.monotonic()
    answer = await s.generate(QUESTION, temperature=0.0, max_tokens=8)
    return time.monotonic() - t0, answer


async def test_sybils_that_claim_the_world_and_answer_busy_cannot_stop_an_ask(swarm, tmp_path):
    """Three peers whose signed pongs claim a million slots and a petabyte free, and which
    answer every request Busy: an ask still ends on the honest peer, and once they have
    said Busy their claims no longer put them first."""
    boot = swarm.bootstrap("sybil-boot")
    liars = [swarm.spawn(f"sybil{i}", "--bootstrap", boot.addr, *PEER, "--fault", "sybil") for i in range(3)]
    honest = swarm.spawn("honest", "--bootstrap", boot.addr, *PEER)
    for p in [*liars, honest]:
        p.wait_ready(180)
    async with Swarm([boot.addr], mdns=False, identity=Identity.generate(), data_dir=tmp_path, choose_top=1) as s:
        times, outcomes = [], []
        for _ in range(4):
            seconds, answer = await _timed_ask(s)
            times.append(seconds)
            outcomes.append([a.outcome for a in answer.attempts])
            assert answer.peer_id == honest.peer_id
    # Each liar is believed once: its Busy contradicts its claim of free slots, which costs it
    # reputation; from then on the honest peer goes first.
    assert outcomes == [["busy", "busy", "busy", "ok"], ["ok"], ["ok"], ["ok"]]
    assert max(times) < 5


def _two_good_and_one(swarm, name: str, fault: str) -> tuple:
    """A bootstrap node, two honest serving peers and one told to misbehave, all ready."""
    boot = swarm.bootstrap(f"{name}-boot")
    good = [swarm.spawn(f"{name}-good{i}", "--bootstrap", boot.addr, *PEER) for i in range(2)]
    bad = swarm.spawn(f"{name}-bad", "--bootstrap", boot.addr, *PEER, "--fault", fault)
    for p in [*good, bad]:
        p.wait_ready(180)
    return boot, good, bad


async def test_idle_dht_streams_and_a_silent_dht_node_hide_nobody(swarm, tmp_path):
    """One attacker holds 16 idle Kademlia streams open on the bootstrap node, and one peer
    takes every DHT request and never answers: the swarm stays visible and answers come
    within 5 s of their normal time."""
    from libp2p.peer.id import ID

    boot, good, _ = _two_good_and_one(swarm, "kad", "dht-silent")
    async with Swarm([boot.addr], mdns=False, identity=Identity.generate(), data_dir=tmp_path / "before") as s:
        normal, _ = await _timed_ask(s)
    async with running_host(Identity.generate()) as attacker:
        target = ID.from_base58(await connect(attacker, boot.addr))
        held = []
        for _ in range(16):
            try:
                held.append(await attacker.new_stream(target, ["/ipfs/kad/1.0.0"]))
            except Exception:
                pass  # refused past its budget: what the guard is for
        async with Swarm([boot.addr], mdns=False, identity=Identity.generate(), data_dir=tmp_path / "during") as s:
            seen = {p.peer_id for p in await s.peers("smollm2")}
            attacked, answer = await _timed_ask(s)
        assert {p.peer_id for p in good} <= seen
        assert held  # the attacker did get streams: they just cost the others nothing
    assert attacked < normal + 5
    assert answer.text


async def test_a_short_fuzz_run_crashes_nothing_hangs_nothing_and_frees_every_slot(swarm):
    """benchmarks/fuzz.py runs 100,000 frames; this is 2,000 of the same."""
    from gputorrent.lab.fuzz import fuzz, rss_mb

    peer = swarm.start("fuzzed", *PEER, "--rate-limit", "0")
    async with running_host(Identity.generate()) as host:
        pid = await connect(host, peer.addr)
        before = rss_mb(peer.proc.pid)
        result = await fuzz(host, pid, frames=2000, workers=8)
        with trio.fail_after(15):
            while (pong := await _load(host, pid)).active or pong.queued:
                await trio.sleep(0.2)
        res = await run_attempt(host, pid, wire.InferRequest(
            request_id=new_request_id(), messages=[wire.ChatMessage("user", QUESTION)],
            params=wire.Params(temperature=0.0, max_tokens=16)), lambda ids, text: None)
    assert peer.proc.poll() is None and result.hung == 0 and result.frames >= 2000
    assert "Paris" in res.text
    assert rss_mb(peer.proc.pid) - before < 100


async def test_the_rate_limiter_forgets_the_least_recent_requester_first():
    from gputorrent.serving.server import MAX_REQUESTERS, InferServer

    server = InferServer(Identity.generate(), engine=None, model=None, rate_limit=3)
    for i in range(MAX_REQUESTERS + 500):  # made-up peer ids, one request each
        assert server._rate_limited(f"id{i}") == 0
    assert len(server._recent) == MAX_REQUESTERS  # bounded, however many ids come
    assert "id0" not in server._recent and f"id{MAX_REQUESTERS + 499}" in server._recent
    for _ in range(3):
        assert server._rate_limited("regular") == 0
    assert 0 < server._rate_limited("regular") <= 60  # the 4th in a minute waits


async def test_sybil_provider_records_sent_first_do_not_keep_an_honest_provider_out(swarm, tmp_path):
    """20 made-up peers provide the model's key at every DHT node before the honest peer
    starts (py-libp2p kept the first 20 per key and refused the rest): the honest peer is
    still stored, and requesters find it."""
    from libp2p.peer.id import ID

    from gputorrent.dht import records
    from gputorrent.dht.node import swarm_node

    boot = swarm.bootstrap("prov-boot")
    others = [swarm.start(f"prov-dht{i}", "--bootstrap", boot.addr, command="bootstrap") for i in range(2)]
    key = bytes.fromhex(records.provider_key("alias", "smollm2"))
    stored = 0
    for _ in range(20):
        sybil = Identity.generate()
        async with running_host(sybil, ["/ip4/127.0.0.1/tcp/0"]) as host, \
                swarm_node(host, sybil, server=False) as node:  # listening: a provider needs an address
            for dht in (boot, *others):
                stored += bool(await node.dht.provider_store._send_add_provider(
                    ID.from_base58(await connect(host, dht.addr)), key))
    assert stored == 60  # every node answered every sybil
    honest = swarm.start("prov-honest", "--bootstrap", boot.addr, *PEER)
    me = Identity.generate()
    async with running_host(me) as host, swarm_node(host, me, server=False) as node:
        listed: set[str] = set()  # what the other nodes say, not the honest peer about itself
        for dht in (boot, *others):
            providers, _ = await node.dht.provider_store._get_providers_from_peer_with_closers(
                ID.from_base58(await connect(host, dht.addr)), key)
            assert len(providers) <= 20
            listed |= {p.peer_id.to_base58() for p in providers}
    assert honest.peer_id in listed
    async with Swarm([boot.addr], mdns=False, identity=Identity.generate(), data_dir=tmp_path) as s:
        seen = {p.peer_id for p in await s.peers("smollm2")}
        answer = await s.generate(QUESTION, model="smollm2", temperature=0.0, max_tokens=8)
    assert honest.peer_id in seen and answer.peer_id == honest.peer_id


async def test_made_up_providers_at_frozen_addresses_do_not_crowd_an_honest_advert_out(swarm):
    """64 provider ids named before an honest one, each at an address that takes the TCP
    connection and never speaks: every advert fetch of theirs holds a fetch slot until its
    deadline. The honest peer, which this node is connected to, goes first; it used to wait
    behind them past the fetch deadline, and its second chance went to the first dozen of them."""
    from libp2p.peer.id import ID
    from multiaddr import Multiaddr

    from gputorrent.dht.node import swarm_node

    boot = swarm.bootstrap("tarpit-boot")
    honest = swarm.start("tarpit-honest", "--bootstrap", boot.addr, *PEER)
    held: list[trio.SocketStream] = []
    made_up = [Identity.generate().peer_id for _ in range(64)]
    me = Identity.generate()
    async with trio.open_nursery() as n:
        tarpit = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]

        async def hold() -> None:
            while True:
                held.append(await tarpit.accept())  # kept open, never read or written

        n.start_soon(hold)
        port = tarpit.socket.getsockname()[1]
        try:
            async with running_host(me) as host, swarm_node(host, me, server=False) as node:
                assert await node.join([boot.addr, honest.addr]) == 2
                for pid in made_up:  # as a provider record would: its id at the tarpit's address
                    host.get_peerstore().add_addrs(ID.from_base58(pid), [Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")], 600)
                found = await node.get_adverts([*made_up, honest.peer_id])
        finally:
            n.cancel_scope.cancel()
            for conn in held:
                await conn.aclose()
            await tarpit.aclose()
    assert [a.peer_id for a in found] == [honest.peer_id]
    assert len(held) >= 16  # the made-up ones were dialed: each held a fetch slot


async def test_a_node_naming_two_thousand_fake_providers_costs_an_ask_little(swarm, tmp_path):
    boot, good, _ = _two_good_and_one(swarm, "fake", "dht-fake-providers")
    async with Swarm([boot.addr], mdns=False, identity=Identity.generate(), data_dir=tmp_path / "a") as s:
        seen = {p.peer_id for p in await s.peers("smollm2")}
        seconds, answer = await _timed_ask(s)
    assert {p.peer_id for p in good} <= seen and len(seen) <= 3  # none of the 2,000 made-up ones
    assert seconds < 10 and answer.text


def test_advertised_addresses_are_dialed_only_where_they_can_be_a_peer():
    from gputorrent.api.swarm import _join_scope
    from gputorrent.net.host import reachable_from

    never = ["/ip4/0.0.0.0/tcp/1", "/ip6/::/tcp/1", "/ip4/224.0.0.251/tcp/1", "/ip4/169.254.9.9/tcp/1",
             "/ip6/fe80::1/tcp/1", "/ip4/255.255.255.255/tcp/1", "/ip4/240.1.2.3/tcp/1"]
    for scope in ("public", "private", "loopback"):
        assert not any(reachable_from(a, scope) for a in never)
    # Joined over the internet: an advert cannot aim us at our own LAN or machine.
    assert _join_scope(["/ip4/9.9.9.9/tcp/4001/p2p/x"]) == "public"
    assert not reachable_from("/ip4/192.168.1.10/tcp/22", "public")
    assert not reachable_from("/ip4/127.0.0.1/tcp/22", "public")
    assert reachable_from("/ip4/1.1.1.1/tcp/4001", "public")
    # Joined on a LAN: LAN and internet addresses, not loopback; on this machine: all of them.
    assert _join_scope(["/ip4/192.168.1.2/tcp/4001/p2p/x"]) == "private"
    assert _join_scope([]) == "loopback"  # mDNS only: a serve on this machine advertises 127.0.0.1
    assert reachable_from("/ip4/10.0.0.5/tcp/4001", "private") and not reachable_from("/ip4/127.0.0.1/tcp/1", "private")
    assert _join_scope(["/ip4/127.0.0.1/tcp/4001/p2p/x"]) == "loopback"
    assert reachable_from("/ip4/127.0.0.1/tcp/4001", "loopback")
