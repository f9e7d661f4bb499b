"""Chains are spot-checked like whole answers: a hop that sends wrong hidden states (validly
signed) is caught and blamed when a third holder of its blocks can settle it. Real shard serve
processes: blocks 0:15 held by two honest peers and a liar, blocks 15:30 by two peers; no
peer serves the whole model."""

from __future__ import annotations

import json

import pytest
import trio

from gputorrent.api import Swarm
from gputorrent.api.swarm import Plan
from gputorrent.asking.chain import Hop

from .conftest import QUESTION

PROMPTS = ["Describe a cat.", "Why is the sky blue?", "List some fruits and their colors."]


@pytest.fixture(scope="module")
def chain_swarm(swarm):
    boot = swarm.bootstrap("cv-boot")
    join = ("--bootstrap", boot.addr, "--announce-interval", "5", "--slots", "2", "--threads", "1")
    spec = {"h1": ("0:15",), "h2": ("0:15",), "liar": ("0:15", "--fault", "wrong-hidden"),
            "t1": ("15:30",), "t2": ("15:30",)}
    procs = {name: swarm.spawn(f"cv-{name}", *join, "--blocks", blocks, *extra)
             for name, (blocks, *extra) in spec.items()}
    for p in procs.values():
        p.wait_ready(180)
    return boot, procs


async def _hops(s: Swarm, procs, names: list[str]) -> list[Hop]:
    with trio.fail_after(60):
        while True:
            ads = {st.peer_id: st.advert for st in await s.peers("smollm2")}
            if {procs[n].peer_id for n in procs} <= set(ads):
                break
            await trio.sleep(0.5)
    out = []
    for n in names:
        m = ads[procs[n].peer_id].models[0]
        out.append(Hop(ads[procs[n].peer_id], m.first_block, m.end_block, 0.0, m.model_id, m.total_blocks))
    return out


async def test_a_lying_hop_is_caught_by_verify_and_blamed(chain_swarm, tmp_path):
    boot, procs = chain_swarm
    async with Swarm([boot.addr], mdns=False, data_dir=tmp_path / "data", identity=tmp_path / "me.key") as s:
        lied = await _hops(s, procs, ["liar", "t1"])
        for prompt in (QUESTION, *PROMPTS[:2]):  # every time, whatever the prompt
            answer = await s.generate(prompt, model="smollm2", temperature=0.0, max_tokens=8, verify=True,
                                      plan=Plan("smollm2", [], chain=lied))
            check = answer.spot_check
            assert [h["peer_id"] for h in answer.chain] == [procs["liar"].peer_id, procs["t1"].peer_id]
            assert check.agreed is False and check.blamed == procs["liar"].peer_id, (prompt, check)
            assert check.blocks == [0, 15]
        status = {p.peer_id: p for p in await s.peers("smollm2")}
        assert status[procs["liar"].peer_id].observed["integrity_failures"] > 0
        # An honest chain checked against one that holds the liar: the liar is blamed, not the honest.
        honest = await _hops(s, procs, ["h1", "t2"])
        answer = await s.generate(QUESTION, model="smollm2", temperature=0.0, max_tokens=8, verify=True,
                                  plan=Plan("smollm2", [], chain=honest))
        check = answer.spot_check
        assert "Paris" in answer.text
        assert check.agreed or check.blamed == procs["liar"].peer_id, check


def test_ask_verify_json_reports_the_chain_and_its_check(chain_swarm, cli):
    boot, procs = chain_swarm
    done = cli("ask", QUESTION, "--bootstrap", boot.addr, "--no-mdns", "--verify", "--json", "--max-tokens", "8",
               "--temperature", "0", timeout=240)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert [h["blocks"] for h in answer["chain"]] == [[0, 15], [15, 30]]
    check = answer["spot_check"]
    assert len(check["peers"]) >= 4  # the chain's two hops and another chain's two
    assert check["agreed"] or check["blamed"] == procs["liar"].peer_id, check


async def test_at_a_spot_check_rate_the_answers_drawn_are_checked_and_the_liar_caught_in_each(chain_swarm, tmp_path):
    """``spot_check=P`` (``ask --spot-check``, 0.05 by default) checks each chain answer with
    probability P: exactly the answers its draws pick, and every one of those catches the liar."""
    import random

    boot, procs = chain_swarm
    rate, n, seed = 0.4, 6, 3
    twin = random.Random(seed)
    expected = [twin.random() < rate for _ in range(n)]
    assert 0 < sum(expected) < n  # the seed picks some answers and skips others
    async with Swarm([boot.addr], mdns=False, data_dir=tmp_path / "data", identity=tmp_path / "me.key") as s:
        lied = await _hops(s, procs, ["liar", "t1"])
        s._core.spot_rng = random.Random(seed)  # the draws the twin above made
        checked = []
        for i in range(n):
            answer = await s.generate(PROMPTS[i % len(PROMPTS)], model="smollm2", temperature=0.0, max_tokens=4,
                                      spot_check=rate, plan=Plan("smollm2", [], chain=lied))
            checked.append(answer.spot_check is not None)
            if answer.spot_check is not None:
                assert answer.spot_check.blamed == procs["liar"].peer_id, answer.spot_check
        assert checked == expected
