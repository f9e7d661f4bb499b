"""Each py-libp2p 0.8.1 quirk that gputorrent/dht works around, shown to happen with the raw
call and not to happen through our wrapper. Real hosts on loopback, in this process."""

from contextlib import AsyncExitStack

import pytest

from gputorrent.dht import records
from gputorrent.dht.node import swarm_node
from gputorrent.identity import Identity
from gputorrent.net.host import full_addrs, running_host

from .test_records import advert


async def _swarm(stack: AsyncExitStack, n: int, *, client: bool = False):
    nodes = []
    for _i in range(n):
        ident = Identity.generate()
        host = await stack.enter_async_context(running_host(ident, ["/ip4/127.0.0.1/tcp/0"]))
        node = await stack.enter_async_context(swarm_node(host, ident, server=True))
        if nodes:
            assert await node.join([full_addrs(nodes[0].host)[0]]) == 1
        nodes.append(node)
    ident = Identity.generate()
    host = await stack.enter_async_context(running_host(ident))
    asker = await stack.enter_async_context(swarm_node(host, ident, server=False))
    assert await asker.join([full_addrs(nodes[-1].host)[0]]) == 1
    return nodes, asker


async def test_a_provider_that_appears_after_a_lookup_is_still_found():
    key = records.provider_key("alias", "workaround-test")
    async with AsyncExitStack() as stack:
        nodes, asker = await _swarm(stack, 4)
        await nodes[0].dht.provide(key)
        first = await asker.dht.find_providers(key)  # py-libp2p keeps what it found...
        assert nodes[0].identity.peer_id in {p.peer_id.to_base58() for p in first}
        await nodes[2].dht.provide(key)
        raw = await asker.dht.find_providers(key)  # ...and then answers from that copy alone
        assert nodes[2].identity.peer_id not in {p.peer_id.to_base58() for p in raw}
        ours = await asker.find_providers(key)
        assert {nodes[0].identity.peer_id, nodes[2].identity.peer_id} <= set(ours)


async def test_a_serving_peer_finds_the_others_not_only_itself():
    key = records.provider_key("alias", "self-test")
    async with AsyncExitStack() as stack:
        nodes, _ = await _swarm(stack, 4)
        for node in nodes[:3]:
            await node.dht.provide(key)
        providers = {n.identity.peer_id for n in nodes[:3]}
        raw = await nodes[0].dht.find_providers(key)  # whatever the local store holds, alone
        assert not providers <= {p.peer_id.to_base58() for p in raw}
        assert providers <= set(await nodes[0].find_providers(key))


async def test_providers_come_back_without_duplicates():
    key = records.provider_key("alias", "dup-test")
    async with AsyncExitStack() as stack:
        nodes, asker = await _swarm(stack, 5)
        await nodes[1].dht.provide(key)
        ours = await asker.find_providers(key)
        assert len(ours) == len(set(ours)) and nodes[1].identity.peer_id in ours


async def test_advert_keys_are_short_enough_to_route_and_long_ones_are_not():
    async with AsyncExitStack() as stack:
        nodes, asker = await _swarm(stack, 3)
        owner = nodes[1]
        value = records.sign_advert(owner.identity, advert(owner.identity, seq=3))
        await owner.dht.put_value(records.advert_key(owner.identity.peer_id), value)
        got = await asker.get_advert(owner.identity.peer_id)
        assert got is not None and got.seq == 3
        # The same record under an unhashed key (/gt/<52-char peer id>) is refused by the validator
        # here, and py-libp2p's FIND_NODE would reject it anyway (over 50 bytes).
        with pytest.raises(records.RecordError):
            await owner.dht.put_value(f"/gt/{owner.identity.peer_id}", value)


async def test_hosts_hold_one_connection_per_peer_so_dials_do_not_wait():
    async with running_host(Identity.generate()) as host:
        assert host.get_network().connection_config.max_connections_per_peer == 1


async def test_every_advertised_address_is_tried_despite_the_negative_cache():
    """Raw: py-libp2p dials one TCP address per peer (the first it heard of) and, once that
    fails, refuses the peer for 60 s even at a good address. ``connect`` tries each in turn."""
    import trio
    from libp2p.peer.peerinfo import PeerInfo

    from gputorrent.net.host import DialError, connect, parse_peer_addr

    async with running_host(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as target, \
            running_host(Identity.generate()) as raw, running_host(Identity.generate()) as ours:
        live = full_addrs(target)[0]
        dead = f"/ip4/127.0.0.1/tcp/9/p2p/{target.get_id().to_base58()}"  # nothing listens on port 9
        both = PeerInfo(target.get_id(), [parse_peer_addr(dead).addrs[0], parse_peer_addr(live).addrs[0]])
        with pytest.raises(Exception), trio.fail_after(20):
            await raw.connect(both)
        with pytest.raises(Exception, match="negative cache"), trio.fail_after(20):
            await raw.connect(parse_peer_addr(live))
        with trio.fail_after(20):
            with pytest.raises(DialError, match="cannot reach peer"):
                await connect(ours, [dead])
            assert await connect(ours, [dead, live]) == target.get_id().to_base58()


async def test_twelve_idle_streams_silence_a_raw_node_and_not_ours():
    """Raw: py-libp2p serves 12 inbound DHT streams at once for everyone and never times one
    out, so one peer holding 12 idle streams makes the node reset every other lookup. Ours
    budgets per peer (8), so the same attacker costs the others nothing."""
    import trio
    from libp2p.kad_dht.kad_dht import PROTOCOL_ID

    from gputorrent.net.host import connect

    async def lookup_after_attack(guarded: bool) -> bool:
        async with AsyncExitStack() as stack:
            nodes, asker = await _swarm(stack, 2)
            target = nodes[0]
            if not guarded:  # put py-libp2p's own handler back
                target.host.set_stream_handler(PROTOCOL_ID, target.dht.handle_stream)
            key = records.advert_key(nodes[1].identity.peer_id)
            value = records.sign_advert(nodes[1].identity, advert(nodes[1].identity, seq=5))
            target.dht.value_store.put(key.encode(), value)
            attacker = await stack.enter_async_context(running_host(Identity.generate()))
            pid = await connect(attacker, full_addrs(target.host)[0])
            from libp2p.peer.id import ID

            for _ in range(12):
                try:
                    await attacker.new_stream(ID.from_base58(pid), [PROTOCOL_ID])  # opened, never written
                except Exception:
                    break
            with trio.fail_after(5):  # until the target's handlers hold them (another task's state: polled)
                while (target.dht._inbound_limiter.borrowed_tokens < 12 if not guarded
                       else sum(target.dht.gt_inbound.values()) < 8):
                    await trio.sleep(0.01)
            await connect(asker.host, full_addrs(target.host)[0])
            with trio.move_on_after(5):
                got, _ = await asker.dht.value_store._get_from_peer(target.host.get_id(), key.encode(),
                                                                   return_closer_peers=True)
                return got == value
            return False

    assert not await lookup_after_attack(guarded=False)
    assert await lookup_after_attack(guarded=True)


async def test_a_requester_whose_only_contact_timed_out_still_asks_it():
    """Walks leave out peers that recently timed out, but never all of them: a requester
    that knows only its bootstrap node must keep asking it (a loaded moment must not blind it
    for the 30 s a suspect is left out)."""
    import trio

    key = records.provider_key("alias", "suspect-test")
    async with AsyncExitStack() as stack:
        nodes, asker = await _swarm(stack, 3)
        await nodes[1].provide(key)
        contacts = list(asker.dht.routing_table.get_peer_ids())
        for peer in contacts:
            asker._suspect[peer] = trio.current_time() + 30
        await asker.find_providers(key)
        # Its suspect contacts were asked and answered. (Not "the provider was found": py-libp2p
        # 0.8.1 sometimes neither stores a fresh ADD_PROVIDER nor returns the provider's own
        # record, in about 1 run of 3 here, with or without suspects; noted in the closing note.)
        assert contacts and set(contacts) & set(asker.last_walk.responded)


async def test_writes_cancelled_midway_leave_the_connection_working():
    """A stream write cut off by a deadline (a ping past ranking's wait, a DHT query past its
    1 s) must not break the connection under the other streams: raw py-libp2p advanced Noise's
    nonce without sending and the other side dropped the connection."""
    import trio

    from gputorrent.net.host import connect, new_stream

    got: list[int] = []

    async def sink(stream) -> None:
        try:
            while data := await stream.read(1 << 16):
                got.append(len(data))
        except Exception:
            pass

    async with AsyncExitStack() as stack:
        server = await stack.enter_async_context(running_host(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]))
        server.set_stream_handler("/gt-test/sink/1", sink)
        client = await stack.enter_async_context(running_host(Identity.generate()))
        pid = await connect(client, full_addrs(server)[0])
        for i in range(30):
            stream = await new_stream(client, pid, ["/gt-test/sink/1"])
            with trio.move_on_after(0.0005 * (i % 5)):
                await stream.write(b"x" * 300_000)  # many Noise messages: cut off somewhere inside
            await stream.reset()
        with trio.fail_after(5):  # the connection still carries a fresh stream end to end
            stream = await new_stream(client, pid, ["/gt-test/sink/1"])
            before = sum(got)
            await stream.write(b"y" * 1000)
            while sum(got) < before + 1000:
                await trio.sleep(0.01)


async def test_an_expired_advert_is_not_served():
    """py-libp2p keeps a value for its own time to live, far past the advert's expiry: a node
    that missed the renewals went on answering with the dead advert."""
    import time

    import trio

    async with AsyncExitStack() as stack:
        nodes, asker = await _swarm(stack, 2)
        owner = Identity.generate()
        key = records.advert_key(owner.peer_id)
        value = records.sign_advert(owner, advert(owner, ttl=0.5))
        nodes[1].dht.value_store.put(key.encode(), value)
        _, validity = nodes[1].dht.value_store.store[key.encode()]
        assert validity is None or validity > time.time() + 60  # py-libp2p's own idea: far past expiry
        peer = nodes[1].host.get_id()
        assert await asker.dht.value_store._get_from_peer(peer, key.encode()) == value
        await trio.sleep(0.6)  # the advert's own expiry passing (wall clock), not synchronisation
        assert await asker.dht.value_store._get_from_peer(peer, key.encode()) is None
        assert key.encode() not in nodes[1].dht.value_store.store


async def test_askers_stay_out_of_the_routing_tables_of_the_peers_they_ask():
    """py-libp2p adds every peer that sends a DHT request to its routing table; requesters are
    DHT clients that come and go, so each one that ever asked stayed in the tables, dead once it
    left, and walks and crawls spent requests on a growing list of gone askers."""
    key = records.provider_key("alias", "client-test")
    async with AsyncExitStack() as stack:
        nodes, _ = await _swarm(stack, 3)
        ident = Identity.generate()  # a requester that listens (as `ask` does, for hole punching)
        host = await stack.enter_async_context(running_host(ident, ["/ip4/127.0.0.1/tcp/0"]))
        asker = await stack.enter_async_context(swarm_node(host, ident, server=False))
        assert await asker.join([full_addrs(nodes[0].host)[0]]) == 1
        await nodes[1].provide(key)
        assert nodes[1].identity.peer_id in await asker.find_providers(key)
        assert set(asker.last_walk.responded) >= {n.host.get_id() for n in nodes}  # it asked every one
        for node in nodes:
            assert not node.dht.routing_table.peer_in_table(host.get_id())
        for node in nodes[1:]:  # servers are still added
            assert nodes[0].dht.routing_table.peer_in_table(node.host.get_id())


async def test_a_peer_known_before_its_dht_ran_is_added_once_it_serves():
    """A serving peer connects to its bootstrap peers (reachability probes) before its DHT
    runs, so what identify told them lacks the DHT protocol; they must look again when it
    sends DHT requests, or it stays out of every table and nobody's walk finds it."""
    from gputorrent.net.host import connect

    async with AsyncExitStack() as stack:
        nodes, _ = await _swarm(stack, 1)
        ident = Identity.generate()
        host = await stack.enter_async_context(running_host(ident, ["/ip4/127.0.0.1/tcp/0"]))
        import trio

        await connect(host, full_addrs(nodes[0].host)[0])
        await nodes[0].host._identify_peer(host.get_id(), reason="test")  # as a dial-back does: no DHT yet
        assert "/ipfs/kad/1.0.0" not in nodes[0].host.get_peerstore().get_protocols(host.get_id())
        late = await stack.enter_async_context(swarm_node(host, ident, server=True))
        assert await late.join([full_addrs(nodes[0].host)[0]]) == 1
        with trio.fail_after(5):  # added after its first DHT stream
            while not nodes[0].dht.routing_table.peer_in_table(host.get_id()):
                await trio.sleep(0.05)


async def test_many_requests_to_one_peer_at_once_all_get_their_answer():
    """A DHT server serves 8 streams per peer and resets the rest, which py-libp2p reports as an
    empty answer ("no copy"): fetching a lookup's adverts sent one peer 14 requests at once and
    half came back empty. Ours keep at most 4 open at one peer."""
    import trio

    async with AsyncExitStack() as stack:
        nodes, asker = await _swarm(stack, 1)
        target = nodes[0]
        ad = advert(target.identity)
        key = records.advert_key(ad.peer_id).encode()
        await target.put_value(key.decode(), records.sign_advert(target.identity, ad))
        peer = target.host.get_id()

        async def burst(ask) -> int:
            got = []

            async def one():
                got.append(await ask(lambda p: asker.dht.value_store._get_from_peer(p, key)))

            async with trio.open_nursery() as n:
                for _ in range(14):
                    n.start_soon(one)
            return sum(bool(v) for v in got)

        assert await burst(lambda request: request(peer)) < 14  # raw: some are reset, reported empty
        assert await burst(lambda request: asker._ask(peer, request)) == 14


async def test_a_node_that_joins_after_a_walk_gets_the_next_renewal():
    """Renewals store where the last walk found the closest peers (a walk every 10 min); a node
    that joined since must still get the current advert at the next renewal, or it held none (or
    an old one) for 10 minutes."""
    async with AsyncExitStack() as stack:
        nodes, _ = await _swarm(stack, 3)
        owner = nodes[1]
        key = records.advert_key(owner.identity.peer_id)
        await owner.put_value(key, records.sign_advert(owner.identity, advert(owner.identity, seq=1)))
        ident = Identity.generate()
        host = await stack.enter_async_context(running_host(ident, ["/ip4/127.0.0.1/tcp/0"]))
        newcomer = await stack.enter_async_context(swarm_node(host, ident, server=True))
        assert await newcomer.join([full_addrs(owner.host)[0]]) == 1  # the owner's table learns it
        assert owner.dht.routing_table.peer_in_table(host.get_id())
        assert newcomer.dht.value_store.store.get(key.encode()) is None
        await owner.put_value(key, records.sign_advert(owner.identity, advert(owner.identity, seq=2)))  # renewal
        held = newcomer.dht.value_store.store.get(key.encode())
        assert held is not None and records.open_advert(key, held[0].value).seq == 2


async def test_a_stopped_host_stops_listening():
    """Raw: leaving py-libp2p's ``host.run`` leaves its TCP listener serving (a trio system
    task), so a stopped peer still accepted dials and answered identify and ping."""
    import trio
    from libp2p import new_host
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from multiaddr import Multiaddr

    from gputorrent.net.host import DialError, connect

    raw = new_host(key_pair=Identity.generate().libp2p_key_pair())
    listen = [Multiaddr("/ip4/127.0.0.1/tcp/0")]
    async with raw.run(listen):
        raw_addr = full_addrs(raw)[0]
    async with running_host(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as ours:
        our_addr = full_addrs(ours)[0]
    async with running_host(Identity.generate()) as dialer:
        with trio.fail_after(20):
            assert await connect(dialer, [raw_addr]) == info_from_p2p_addr(Multiaddr(raw_addr)).peer_id.to_base58()
            with pytest.raises(DialError, match="cannot reach peer"):
                await connect(dialer, [our_addr])
    for listener in raw.get_network().listeners.values():
        await listener.close()


async def test_a_negotiation_sends_its_header_and_first_proposal_in_one_flight():
    """py-libp2p waited for the other side's multistream header before proposing a protocol:
    two round trips before every stream and for each of a dial's two negotiations (traced across
    a 30 ms link: 2.1 round trips per new stream, 14 per dial). A listener here that answers
    nothing until it holds both the header and a proposal: a pipelined client hears its refusal
    at once, a waiting one would hang until its timeout."""
    import functools

    import trio

    from gputorrent.net.host import DialError, connect

    got: list[bytes] = []

    async def picky(stream: trio.SocketStream) -> None:
        buf = b""
        while buf.count(b"\n") < 2:  # the header and one proposal, each "<len>...\n"
            data = await stream.receive_some(1024)
            if not data:
                return
            buf += data
        got.append(buf)
        await stream.send_all(b"\x13/multistream/1.0.0\n" + b"\x03na\n")
        while await stream.receive_some(1024):  # any later proposal (another security protocol)
            await stream.send_all(b"\x03na\n")

    async with trio.open_nursery() as n:
        listeners = await n.start(functools.partial(trio.serve_tcp, picky, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        peer = Identity.generate().peer_id
        async with running_host(Identity.generate()) as host:
            with trio.fail_after(3):
                with pytest.raises(DialError):
                    await connect(host, f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer}")
        n.cancel_scope.cancel()
    assert got and got[0].startswith(b"\x13/multistream/1.0.0\n") and b"/noise" in got[0]


async def test_a_request_sent_with_its_negotiation_is_answered_and_a_refusal_fails_the_first_read():
    """Our own streams (ping, infer) send the request with the negotiation: no round trip before
    it. The negotiation's replies are read before the first read; a peer that does not speak the
    protocol fails that read, and the connection is still good for the next stream."""
    import trio

    from gputorrent.net.host import connect, new_stream

    async def echo(stream) -> None:
        await stream.write(await stream.read(5))
        await stream.close()

    async with running_host(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as server, \
            running_host(Identity.generate()) as client:
        server.set_stream_handler("/gputorrent-test/echo/1", echo)
        peer = await connect(client, full_addrs(server)[0])
        with trio.fail_after(5):
            stream = await new_stream(client, peer, ["/gputorrent-test/echo/1"], first=b"hello")
            assert await stream.read(5) == b"hello"
            refused = await new_stream(client, peer, ["/gputorrent-test/none/1"], first=b"hello")
            with pytest.raises(ConnectionError, match="does not speak"):
                await refused.read(5)
            again = await new_stream(client, peer, ["/gputorrent-test/echo/1"], first=b"again")
            assert await again.read(5) == b"again"
