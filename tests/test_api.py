"""The embeddable API against a real swarm (a bootstrap node and two serve processes), from
trio and from asyncio (trio as a guest on the asyncio loop)."""

import asyncio
import os

import pytest
import trio

import gputorrent
from gputorrent import AskFailed, Failover, Finished, Peer, PeerSeen, Swarm, Text

from .conftest import QUESTION


@pytest.fixture(scope="module")
def mesh(swarm):
    boot = swarm.bootstrap()
    for name in ("api-a", "api-b"):
        swarm.spawn(name, "--bootstrap", boot.addr, "--ctx", "1024", "--rate-limit", "0")
    for name in ("api-a", "api-b"):
        swarm.peers[name].wait_ready(120)
    return swarm, boot.addr


def _swarm(mesh, tmp_path, **kw) -> Swarm:
    return Swarm(bootstrap=[mesh[1]], mdns=False, identity=tmp_path / "me.key", data_dir=tmp_path / "data", **kw)


async def _wait_for_peers(s: Swarm, n: int) -> list:
    with trio.fail_after(20):
        while len(found := await s.peers()) < n:
            await trio.sleep(0.2)  # polling another process's DHT state; bounded
    return found


async def test_from_trio_peers_stream_and_generate(mesh, tmp_path):
    served = {mesh[0].peers[n].peer_id for n in ("api-a", "api-b")}
    async with _swarm(mesh, tmp_path) as s:
        peers = await _wait_for_peers(s, 2)
        assert {p.peer_id for p in peers} == served
        assert all(p.breaker == "closed" and p.advert.models[0].alias == "smollm2" for p in peers)

        events = [ev async for ev in s.stream(QUESTION, model="smollm2", temperature=0, max_tokens=16)]
        texts = [e for e in events if isinstance(e, Text)]
        (done,) = [e for e in events if isinstance(e, Finished)]
        assert isinstance(events[-1], Finished) and len(texts) >= 1
        assert "".join(t.text for t in texts) == done.answer.text and "Paris" in done.answer.text
        assert {t.peer_id for t in texts} == {done.answer.peer_id} <= served
        assert done.answer.receipt_verified and len(done.answer.receipt) == 64

        answer = await s.generate([{"role": "system", "content": "Answer in one word."},
                                   {"role": "user", "content": "What is the capital of France?"}],
                                  temperature=0, max_tokens=8)
        assert "Paris" in answer.text and answer.attempts[-1].outcome == "ok"

        with pytest.raises(AskFailed, match="no live peer serves 'no-such-model'"):
            await s.generate("hi", model="no-such-model")
        with pytest.raises(ValueError, match="bad generation parameter"):
            await s.generate("hi", temperature=99)


async def test_leaving_a_stream_early_cancels_it(mesh, tmp_path):
    async with _swarm(mesh, tmp_path) as s:
        await _wait_for_peers(s, 2)
        with trio.fail_after(30):
            async for ev in s.stream("Count upwards: 1, 2, 3,", raw=True, temperature=0, max_tokens=400):
                if isinstance(ev, Text):
                    break  # the peer's slot is freed; nothing keeps running in the background
        answer = await s.generate(QUESTION, temperature=0, max_tokens=8)
        assert "Paris" in answer.text


async def test_events_report_peers_and_bans(mesh, tmp_path):
    async with _swarm(mesh, tmp_path, watch_interval=0.5) as s:
        seen: set[str] = set()
        with trio.fail_after(20):
            async for ev in s.events():
                if isinstance(ev, PeerSeen):
                    seen.add(ev.peer.peer_id)
                if len(seen) == 2:
                    break
        victim = sorted(seen)[0]
        assert await s.ban(victim) == "open"
        status = {p.peer_id: p for p in await s.peers()}[victim]
        assert status.breaker == "open" and status.banned
        for _ in range(3):  # the banned peer is never chosen
            assert (await s.generate(QUESTION, temperature=0, max_tokens=4)).peer_id != victim
        assert await s.unban(victim) == "closed"


def test_from_asyncio(mesh, tmp_path):
    """asyncio hosts trio as a guest: the same calls, awaited from asyncio tasks."""

    async def main() -> tuple[str, list, str]:
        async with _swarm(mesh, tmp_path) as s:
            for _ in range(100):
                if len(await s.peers()) == 2:
                    break
                await asyncio.sleep(0.2)
            pieces = []
            async for ev in s.stream(QUESTION, temperature=0, max_tokens=16):
                pieces.append(ev)
            other = asyncio.create_task(asyncio.sleep(0))  # asyncio keeps running alongside
            answer = await s.generate(QUESTION, temperature=0, max_tokens=8)
            await other
            return "".join(e.text for e in pieces if isinstance(e, Text)), pieces, answer.text

    text, events, again = asyncio.run(asyncio.wait_for(main(), 60))
    assert "Paris" in text and "Paris" in again and isinstance(events[-1], Finished)


def test_asyncio_errors_cross_over(mesh, tmp_path):
    async def main() -> None:
        async with _swarm(mesh, tmp_path) as s:
            await s.generate("hi", model="no-such-model")

    with pytest.raises(AskFailed, match="no live peer serves"):
        asyncio.run(asyncio.wait_for(main(), 60))

    async def unreachable() -> None:
        async with Swarm(bootstrap=["/ip4/127.0.0.1/tcp/9/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"],
                         mdns=False, identity=tmp_path / "me.key", data_dir=tmp_path / "data"):
            pass

    with pytest.raises(gputorrent.SwarmError, match="none of the bootstrap peers answered"):
        asyncio.run(asyncio.wait_for(unreachable(), 60))


def test_sync_ask_one_liner(mesh, tmp_path):
    text = gputorrent.ask(QUESTION, model="smollm2", bootstrap=[mesh[1]], mdns=False, identity=tmp_path / "me.key",
                          data_dir=tmp_path / "data", temperature=0, max_tokens=8)
    assert "Paris" in text


async def test_serve_from_code_and_fail_over_to_it(mesh, tmp_path, model_path):
    """A Peer in this process joins the swarm; asking it directly, then through failover."""
    async with Peer(str(model_path), bootstrap=[mesh[1]], mdns=False, identity=tmp_path / "peer.key", slots=2,
                    ctx=512, announce_interval=1) as peer:
        assert peer.addrs and peer.model.alias == "smollm2"
        dead = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
        async with Swarm(peers=[dead, peer.addrs[0]], identity=tmp_path / "me.key", data_dir=tmp_path / "d") as s:
            events = [ev async for ev in s.stream(QUESTION, temperature=0, max_tokens=8)]
        fail = [e for e in events if isinstance(e, Failover)]
        assert fail and fail[0].outcome == "unreachable"
        assert events[-1].answer.peer_id == peer.peer_id and "Paris" in events[-1].answer.text
        async with _swarm(mesh, tmp_path) as s:
            with trio.fail_after(20):
                while peer.peer_id not in {p.peer_id for p in await s.peers()}:
                    await trio.sleep(0.2)
    open_files = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                  if os.path.exists(f"/proc/self/fd/{fd}")]
    assert not [f for f in open_files if f.endswith("ledger.sqlite")]  # a stopped Peer (and Swarm) closed it


def test_serve_and_ask_from_asyncio_sharing_one_guest_run(mesh, tmp_path, model_path):
    async def main():
        async with Peer(str(model_path), bootstrap=[mesh[1]], mdns=False, identity=tmp_path / "peer.key", slots=1,
                        ctx=512) as peer:
            async with Swarm(peers=[peer.addrs[0]], identity=tmp_path / "me.key", data_dir=tmp_path / "d") as s:
                return peer.peer_id, await s.generate(QUESTION, temperature=0, max_tokens=8)

    peer_id, answer = asyncio.run(asyncio.wait_for(main(), 90))
    assert answer.peer_id == peer_id and "Paris" in answer.text


async def test_a_grammar_constrains_the_answer_travels_to_the_spot_check_and_a_bad_one_is_refused(mesh, tmp_path):
    import json

    from gputorrent.asking.formats import json_grammar

    swarm, _ = mesh
    peers = [swarm.peers["api-a"].addr, swarm.peers["api-b"].addr]
    async with Swarm(peers=peers, mdns=False, identity=tmp_path / "me.key", data_dir=tmp_path / "data") as s:
        answer = await s.generate("Name a colour.", temperature=0.0, max_tokens=32, verify=True,
                                  grammar=json_grammar({"type": "object", "properties": {"colour": {"type": "string"}},
                                                        "required": ["colour"]}))
        assert set(json.loads(answer.text)) == {"colour"}
        # The check ran under the same grammar: two honest peers agree token for token.
        assert answer.spot_check is not None and answer.spot_check.agreed is True, answer.spot_check
        with pytest.raises(AskFailed, match="grammar"):
            await s.generate("hi", max_tokens=4, grammar="root ::= this is not gbnf (")
        again = await s.generate(QUESTION, temperature=0.0, max_tokens=8)  # and the peers still serve
        assert "Paris" in again.text
