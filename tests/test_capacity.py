"""Serving at capacity, against real serve processes: batching, admission, cancellation,
allowlists, rate limits and private swarms."""

import pytest
import trio

from gputorrent import wire
from gputorrent.asking.asker import new_request_id
from gputorrent.asking.client import AttemptFailed, PeerBusy, RemoteError, ping, run_attempt
from gputorrent.identity import Identity
from gputorrent.net.host import DialError, connect, running_host
from gputorrent.swarmkey import write_new

from .conftest import QUESTION

ALLOWED = Identity.generate()


@pytest.fixture(scope="module")
def peers(swarm, tmp_path_factory):
    key = write_new(tmp_path_factory.mktemp("keys") / "swarm.key")
    spec = {
        "roomy": ("--slots", "4", "--queue", "8", "--rate-limit", "0"),
        "single": ("--slots", "1", "--queue", "0", "--rate-limit", "0"),
        "private": ("--slots", "1", "--allow", ALLOWED.peer_id, "--rate-limit", "3", "--swarm-key", str(key)),
        "impatient": ("--slots", "1", "--first-frame-timeout", "1", "--rate-limit", "0"),
    }
    for name, extra in spec.items():
        swarm.spawn(name, "--ctx", "1024", *extra)
    for name in spec:
        swarm.peers[name].wait_ready(120)
    return swarm.peers, key


def _req(q: str = QUESTION, max_tokens: int = 24) -> wire.InferRequest:
    return wire.InferRequest(request_id=new_request_id(), messages=[wire.ChatMessage("user", q)],
                             params=wire.Params(max_tokens=max_tokens, temperature=0.0))


async def test_eight_concurrent_asks_on_four_slots_all_answer_correctly(peers):
    roomy = peers[0]["roomy"]
    async with running_host(Identity.generate()) as host:
        pid = await connect(host, roomy.addr)
        texts: list[str] = []

        async def one() -> None:
            texts.append((await run_attempt(host, pid, _req(), lambda i, t: None)).text)

        async with trio.open_nursery() as n:
            for _ in range(8):
                n.start_soon(one)
    assert len(texts) == 8 and all("Paris" in t for t in texts)
    assert len(set(texts)) == 1  # greedy: batching must not mix sequences up


async def test_the_thirteenth_concurrent_ask_is_busy_at_once_not_a_timeout(peers):
    roomy = peers[0]["roomy"]
    async with running_host(Identity.generate()) as host:
        pid = await connect(host, roomy.addr)
        async with trio.open_nursery() as n:
            for _ in range(12):  # 4 slots + 8 queued
                n.start_soon(run_attempt, host, pid, _req("Write a very long story about the sea.", 400),
                             lambda i, t: None)

            async def full() -> bool:
                _, pong = await ping(host, pid)
                return pong.active + pong.queued >= 12

            with trio.fail_after(30):
                while not await full():
                    await trio.sleep(0.05)
            t0 = trio.current_time()
            with pytest.raises(PeerBusy) as busy:
                await run_attempt(host, pid, _req(), lambda i, t: None)
            assert trio.current_time() - t0 < 2.0 and busy.value.retry_after_ms > 0
            n.cancel_scope.cancel()  # the twelve go away; their slots must come back
        with trio.fail_after(30):
            while (await ping(host, pid))[1].active:
                await trio.sleep(0.05)
        assert "Paris" in (await run_attempt(host, pid, _req(), lambda i, t: None)).text


async def test_a_cancelled_request_frees_its_slot_at_once(peers):
    single = peers[0]["single"]  # one slot, no queue: a slot not freed means 'busy'
    async with running_host(Identity.generate()) as host:
        pid = await connect(host, single.addr)
        got: list[str] = []
        with trio.move_on_after(60) as scope:
            def on_token(ids, text):
                got.append(text)
                if len(got) >= 3:
                    scope.cancel()  # the requester walks away mid-answer

            await run_attempt(host, pid, _req("Count upwards one by one: 1, 2, 3,", 900), on_token)
        assert scope.cancelled_caught and len(got) >= 3
        # The abandoned answer had ~8 s of tokens left: the slot must come back far sooner.
        with trio.fail_after(1.5):
            while (await ping(host, pid))[1].active:
                await trio.sleep(0.02)
        assert "Paris" in (await run_attempt(host, pid, _req(), lambda i, t: None)).text


async def test_allowlist_and_rate_limit(peers):
    private, key = peers[0]["private"], peers[1]
    from gputorrent.swarmkey import load

    psk = load(key)
    async with running_host(Identity.generate(), psk=psk) as stranger:
        pid = await connect(stranger, private.addr)
        with pytest.raises(RemoteError, match="not_allowed"):
            await run_attempt(stranger, pid, _req(), lambda i, t: None)
    async with running_host(ALLOWED, psk=psk) as friend:
        pid = await connect(friend, private.addr)
        for _ in range(3):
            assert "Paris" in (await run_attempt(friend, pid, _req(max_tokens=12), lambda i, t: None)).text
        with pytest.raises(PeerBusy, match="rate limit"):
            await run_attempt(friend, pid, _req(), lambda i, t: None)


async def test_a_peer_without_the_swarm_key_cannot_connect(peers, tmp_path):
    from gputorrent.swarmkey import load

    private = peers[0]["private"]
    refused = (DialError, AttemptFailed, trio.TooSlowError)
    for psk in (None, load(write_new(tmp_path / "other.key"))):  # no key, then the wrong key
        with pytest.raises(refused):
            async with running_host(ALLOWED, psk=psk) as outsider:
                with trio.fail_after(15):
                    await connect(outsider, private.addr)
                    await ping(outsider, private.peer_id)


async def test_an_answer_may_outlast_the_wait_for_its_request(peers):
    """Regression: the first-frame timeout once bounded the whole answer, so every answer
    longer than 10 s was cut off with a clean end of stream and no receipt."""
    impatient = peers[0]["impatient"]  # waits 1 s for a request
    async with running_host(Identity.generate()) as host:
        pid = await connect(host, impatient.addr)
        req = wire.InferRequest(request_id=new_request_id(), prompt="Count upwards one by one: 1, 2, 3,",
                                params=wire.Params(max_tokens=300, temperature=0.0))
        t0 = trio.current_time()
        res = await run_attempt(host, pid, req, lambda i, t: None)
        assert trio.current_time() - t0 > 1.5 and res.done.finish_reason == "length" and len(res.ids) == 300

        from libp2p.peer.id import ID

        from gputorrent import protocol

        silent = await host.new_stream(ID.from_base58(pid), [protocol.INFER])  # says nothing at all
        with trio.fail_after(10):
            assert await wire.FrameReader(silent).read_frame() is None  # closed after ~1 s


async def test_a_peer_is_reached_by_any_of_its_advertised_addresses(peers):
    roomy = peers[0]["roomy"]
    dead = f"/ip4/127.0.0.1/tcp/9/p2p/{roomy.peer_id}"  # nothing listens on port 9
    async with running_host(Identity.generate()) as host:
        with trio.fail_after(20):
            assert await connect(host, [dead, roomy.addr]) == roomy.peer_id
        with pytest.raises(DialError, match="name different peers"):
            await connect(host, [roomy.addr, f"/ip4/127.0.0.1/tcp/9/p2p/{ALLOWED.peer_id}"])
