"""Give and take: a donor is admitted first under contention, a newcomer still gets its share,
and credit is only what this machine itself received (engine/admission.py, scoring/ledger.py,
wire.Link)."""

from __future__ import annotations

import shutil
import time

import pytest
import trio

from gputorrent import wire
from gputorrent.api import Swarm
from gputorrent.api.swarm import own_link
from gputorrent.asking.asker import AskFailed
from gputorrent.config import load_settings
from gputorrent.engine.admission import OPTIMISTIC_EVERY, Admission
from gputorrent.identity import Identity
from gputorrent.scoring.ledger import HALF_LIFE_S, Ledger

from .conftest import QUESTION


def test_without_contention_or_credit_it_is_first_come_first_served():
    a = Admission()
    assert a.pick([0.0]) == 0 and a.pick([0.0, 0.0, 0.0]) == 0 and a.pick([5.0, 5.0]) == 0
    assert a.contended == 0


def test_under_contention_credit_goes_first_and_one_in_four_goes_to_a_newcomer():
    a = Admission()
    picks = [a.pick([0.0, 0.0, 30.0, 10.0]) for _ in range(2 * OPTIMISTIC_EVERY)]
    assert picks.count(0) == 2  # the longest-waiting guest, every fourth admission
    assert [p for p in picks if p != 0] == [2] * (2 * OPTIMISTIC_EVERY - 2)  # else the biggest giver
    assert (a.contended, a.by_credit, a.optimistic) == (8, 6, 2)


def test_credit_decays_and_survives_a_restart(tmp_path):
    path = tmp_path / "ledger.sqlite"
    now = time.time()
    ledger = Ledger(path)
    ledger.add("donor", received=100, now=now)
    ledger.add("donor", served=8, now=now)
    ledger.close()
    again = Ledger(path)  # a restarted serve reads what it (or its user's asks) wrote
    assert again.credit("donor", now) == pytest.approx(100)
    assert again.credit("donor", now + HALF_LIFE_S) == pytest.approx(50)
    assert again.get("donor", now).served == pytest.approx(8)
    assert again.credit("stranger", now) == 0.0
    again.close()


def test_a_link_holds_only_for_its_own_requester_and_its_owner_s_signature():
    owner, member, thief = Identity.generate(), Identity.generate(), Identity.generate()
    link = wire.make_link(owner, member.peer_id)
    assert wire.check_link(link, member.peer_id) == owner.peer_id
    with pytest.raises(wire.LinkError, match="came from"):  # lent or replayed by another requester
        wire.check_link(link, thief.peer_id)
    forged = wire.Link(owner.peer_id, thief.peer_id, thief.sign(b"gputorrent-link/1\0" + owner.peer_id.encode()
                                                                + b"\0" + thief.peer_id.encode()))
    with pytest.raises(wire.LinkError, match="not signed"):  # a key someone else owns
        wire.check_link(forged, thief.peer_id)
    request = wire.InferRequest(request_id=b"x" * 16, prompt="hi", link=link)
    assert wire.decode_inbound(wire.encode(request)).link == link  # travels in the request


def test_a_requester_is_linked_to_its_machine_s_serving_key_and_never_creates_one(tmp_path):
    settings = load_settings().with_overrides(data_dir=tmp_path)
    me = Identity.generate()
    assert own_link(settings, me) is None and not (tmp_path / "identity.key").exists()
    serving = Identity.load_or_create(tmp_path / "identity.key")
    link = own_link(settings, me)
    assert link is not None and wire.check_link(link, me.peer_id) == serving.peer_id
    assert own_link(settings, serving) is None  # one key for both: its own credit, no link needed


async def queued(peer, n: int, data_dir) -> None:
    """Until ``peer``'s pongs say ``n`` requests wait in its queue (a peer's state: nothing to await)."""
    from gputorrent.asking.client import ping
    from gputorrent.net.host import connect

    async with Swarm(peers=[peer.addr], mdns=False, identity=Identity.generate(), data_dir=data_dir) as s:
        host = s._core.host
        await connect(host, [peer.addr])
        with trio.fail_after(30):
            while (await ping(host, peer.peer_id, 5.0))[1].queued < n:
                await trio.sleep(0.1)


@pytest.mark.slow
async def test_a_donor_is_served_before_guests_that_queued_first(swarm, tmp_path):
    """A one-slot peer P. The donor D served P's user earlier (P's machine received tokens from
    D); under contention D's request, queued last, is admitted before two guests queued first.
    A request with a forged link is refused with a reason."""
    home = {name: tmp_path / name for name in ("p", "d")}
    data = {name: home[name] / "gputorrent" for name in home}  # what XDG_DATA_HOME gives a serve's data dir
    donor = swarm.start("donor", "--slots", "2", "--ctx", "512", env={"XDG_DATA_HOME": str(home["d"])})
    busy = swarm.start("busy", "--slots", "1", "--queue", "8", "--ctx", "512", "--threads", "1",
                       env={"XDG_DATA_HOME": str(home["p"])})
    # P's user asks D: P's machine now holds D's credit.
    async with Swarm(peers=[donor.addr], mdns=False, identity=Identity.generate(), data_dir=data["p"]) as s:
        given = (await s.generate(QUESTION, temperature=0.0, max_tokens=16)).usage["completion_tokens"]
    assert 0 < Ledger(data["p"] / "ledger.sqlite").credit(donor.peer_id) <= given  # the ids it sent (a stop token is not)
    data["d"].mkdir(parents=True, exist_ok=True)
    shutil.copy(swarm.identity("donor"), data["d"] / "identity.key")  # D's user asks with D's key beside it
    (data["d"] / "identity.key").chmod(0o600)

    finished: list[str] = []

    async def ask(who: str, data_dir, max_tokens: int, started: trio.Event | None = None) -> None:
        async with Swarm(peers=[busy.addr], mdns=False, identity=Identity.generate(), data_dir=data_dir) as s:
            async for ev in s.stream("Write a long story about the sea.", temperature=0.0, max_tokens=max_tokens):
                if started is not None and not started.is_set():
                    started.set()
                del ev
        finished.append(who)

    async with trio.open_nursery() as n:
        running = trio.Event()
        n.start_soon(ask, "first", tmp_path / "g0", 48, running)
        await running.wait()  # the slot is taken
        for i in (1, 2):
            n.start_soon(ask, f"guest{i}", tmp_path / f"g{i}", 8)
        await queued(busy, 2, tmp_path / "watch")  # the guests wait in the queue first
        n.start_soon(ask, "donor", data["d"], 8)
    assert finished[0] == "first" and finished[1] == "donor", finished

    async with Swarm(peers=[busy.addr], mdns=False, identity=Identity.generate(), data_dir=tmp_path / "f") as s:
        s._core.link = wire.make_link(Identity.generate(), "12D3KooWsomebodyElse")
        with pytest.raises(AskFailed, match="link"):
            await s.generate(QUESTION, temperature=0.0, max_tokens=4)


def test_peers_show_what_each_peer_gave_and_got():
    from gputorrent.api.rows import cells
    from gputorrent.api.swarm import PeerStatus

    from .test_records import advert

    st = PeerStatus(advert(Identity.generate()), 1.0, "closed", got=16.4, gave=8.0)
    assert cells(st)["got/gave tok"] == "16/8"
    assert st.to_dict()["got_tokens"] == 16.4 and st.to_dict()["gave_tokens"] == 8.0


async def test_metrics_count_admissions_by_credit_and_optimistic():
    from gputorrent.metrics import ServeMetrics, exposition

    m = ServeMetrics()
    snapshot = {"active": 1, "queued": 3, "slots": 1, "admissions": {"contended": 8, "by_credit": 6, "optimistic": 2}}
    with trio.move_on_after(0.1):
        await m.watch(lambda: snapshot, every=1.0)
    text = exposition(m.registry)[0].decode()
    assert 'gputorrent_contended_admissions{how="by_credit"} 6.0' in text
    assert 'gputorrent_contended_admissions{how="optimistic"} 2.0' in text


@pytest.mark.slow
async def test_a_peer_caught_lying_keeps_no_credit_and_its_user_is_a_stranger_here(swarm, tmp_path):
    """A peer answering junk under valid signatures (``--fault wrong-tokens``) answers a verified
    ask and is blamed by its spot check: it ends with no credit at the machine it lied to, so its
    linked user is admitted there as a stranger. Named first again, it is asked last (it got the
    next asks too). An honest peer still earns."""
    common = ("--slots", "2", "--ctx", "512", "--threads", "1")
    liar, h1, h2 = (swarm.spawn(name, *common, *extra) for name, extra in
                    (("junk-liar", ("--fault", "wrong-tokens")), ("junk-h1", ()), ("junk-h2", ())))
    for p in (liar, h1, h2):
        p.wait_ready(120)
    data = tmp_path / "me"
    ledger = data / "ledger.sqlite"
    async with Swarm(peers=[liar.addr, h1.addr, h2.addr], mdns=False, identity=Identity.generate(),
                     data_dir=data) as s:
        answer = await s.generate(QUESTION, temperature=0.0, max_tokens=8, verify=True)
        assert answer.peer_id == liar.peer_id and answer.usage["completion_tokens"] > 0
        assert answer.spot_check is not None and answer.spot_check.blamed == liar.peer_id, answer.spot_check
        for _ in range(2):  # named first, but caught: it goes last now
            answer = await s.generate(QUESTION, temperature=0.0, max_tokens=8, verify=True)
            assert answer.peer_id != liar.peer_id and answer.spot_check.agreed is True, answer.spot_check
    assert Ledger(ledger).credit(liar.peer_id) == 0.0
    async with Swarm(peers=[h1.addr], mdns=False, identity=Identity.generate(), data_dir=data) as s:
        await s.generate(QUESTION, temperature=0.0, max_tokens=8)
    assert Ledger(ledger).credit(h1.peer_id) > 0  # credit itself still works


def test_a_forfeit_keeps_what_was_served_and_settle_skips_the_caught(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.add("liar", received=30, served=5, now=0.0)
    ledger.settle({"liar": 10, "honest": 7}, {"liar"}, now=0.0)
    assert ledger.get("liar", now=0.0) == type(ledger.get("liar", now=0.0))("liar", 0.0, 5.0, 0.0)
    assert ledger.credit("honest", now=0.0) == 7
