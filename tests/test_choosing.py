"""Choosing peers well, with real misbehaving peer processes: breakers, reputation, failover on
stall and busy, spot checks, and --explain following the weights."""

import json
import time

import pytest

from gputorrent.identity import short_id

from .conftest import BOTH_WAYS, QUESTION

SMALL = ("--ctx", "512")


@pytest.fixture(scope="module")
def crowd(swarm):
    """A bootstrap node, three healthy peers with different capacity, and misbehaving ones."""
    boot = swarm.bootstrap()
    spec = {
        "roomy": ("--slots", "6"), "middle": ("--slots", "2"), "narrow": ("--slots", "1"),
        "corrupt": ("--slots", "1", "--fault", "corrupt-signature"),
        "liar": ("--slots", "1", "--fault", "wrong-tokens"),
        "staller": ("--slots", "1", "--fault", "stall-after-tokens=3"),
        "busy": ("--slots", "1", "--fault", "busy"),
    }
    for name, extra in spec.items():
        swarm.spawn(name, "--bootstrap", boot.addr, "--name", name, *SMALL, *extra)
    for name in spec:
        swarm.peers[name].wait_ready(180)
    return boot, swarm.peers


def _json(done):
    assert done.stdout.strip().startswith("{"), done.stderr
    return json.loads(done.stdout)


def _peers(cli, boot) -> dict:
    done = cli("peers", "--bootstrap", boot.addr, "--no-mdns", "--json")
    assert done.returncode == 0, done.stderr
    return {p["name"]: p for p in json.loads(done.stdout)}


@BOTH_WAYS
def test_a_stall_fails_over_after_the_deadline_with_nothing_lost(crowd, cli):
    _, peers = crowd
    q = ("--temperature", "0", "--max-tokens", "24")
    healthy = _json(cli("ask", QUESTION, "--peer", peers["roomy"].addr, "--json", *q))
    t0 = time.monotonic()
    out = _json(cli("ask", QUESTION, "--peer", peers["staller"].addr, "--peer", peers["roomy"].addr,
                    "--stall-timeout", "2", "--json", *q))
    assert time.monotonic() - t0 >= 2
    assert [a["outcome"] for a in out["attempts"]] == ["stalled", "ok"]
    assert out["text"] == healthy["text"]


def test_a_busy_peer_is_skipped(crowd, cli):
    _, peers = crowd
    out = _json(cli("ask", QUESTION, "--peer", peers["busy"].addr, "--peer", peers["roomy"].addr, "--json"))
    assert [a["outcome"] for a in out["attempts"]] == ["busy", "ok"]


@BOTH_WAYS
def test_a_corrupt_peer_is_refused_and_its_breaker_opens_and_stays_open(crowd, cli):
    boot, peers = crowd
    out = _json(cli("ask", QUESTION, "--peer", peers["corrupt"].addr, "--peer", peers["roomy"].addr, "--json"))
    assert [a["outcome"] for a in out["attempts"]] == ["integrity", "ok"]
    seen = _peers(cli, boot)
    assert seen["corrupt"]["breaker"] == "open" and seen["corrupt"]["reputation"] < 1
    assert seen["roomy"]["breaker"] == "closed"
    # Persisted: the next ask (a new process) does not even try it.
    done = cli("ask", QUESTION, "--bootstrap", boot.addr, "--no-mdns", "--model", "smollm2", "--explain", "--json")
    assert done.returncode == 0, done.stderr
    assert peers["corrupt"].peer_id not in [a["peer_id"] for a in _json(done)["attempts"]]
    assert "breaker open" in done.stderr
    reset = cli("peers", "--reset", peers["corrupt"].peer_id)
    assert reset.returncode == 0 and _peers(cli, boot)["corrupt"]["breaker"] == "closed"


def test_a_peer_returning_wrong_tokens_is_caught_by_verify(crowd, cli):
    boot, peers = crowd
    out = _json(cli("ask", QUESTION, "--peer", peers["liar"].addr, "--peer", peers["roomy"].addr,
                    "--peer", peers["middle"].addr, "--verify", "--json"))
    check = out["spot_check"]
    assert out["peer_id"] == peers["liar"].peer_id  # its signatures are fine: only the check sees it
    assert check["agreed"] is False and check["blamed"] == peers["liar"].peer_id
    assert set(check["peers"]) == {peers[n].peer_id for n in ("liar", "roomy", "middle")}
    seen = _peers(cli, boot)
    assert seen["liar"]["reputation"] < seen["roomy"]["reputation"]
    assert seen["liar"]["breaker"] == "open"


def test_honest_peers_agree_under_verify(crowd, cli):
    _, peers = crowd
    out = _json(cli("ask", QUESTION, "--peer", peers["roomy"].addr, "--peer", peers["middle"].addr,
                    "--verify", "--json"))
    assert out["spot_check"]["agreed"] is True and out["spot_check"]["blamed"] is None


def test_explain_shows_the_choice_following_the_weights(crowd, cli):
    boot, peers = crowd
    common = ("--bootstrap", boot.addr, "--no-mdns", "--model", "smollm2", "--choose-top", "1", "--json")
    by_slots = cli("ask", QUESTION, *common, "--explain", "--weights", "vram=0,slots=1,rtt=0,speed=0")
    assert by_slots.returncode == 0, by_slots.stderr
    assert _json(by_slots)["peer_id"] == peers["roomy"].peer_id, by_slots.stderr  # the most free slots
    table = by_slots.stderr
    assert "weights: vram 0, slots 1, rtt 0, speed 0" in table and "chose " + short_id(peers["roomy"].peer_id) in table
    shown = {short_id(p.peer_id): n for n, p in peers.items()}  # the same short ids as `peers` shows
    order = [shown[line.split()[0]] for line in table.splitlines() if line.split() and line.split()[0] in shown]
    print(table)
    assert order.index("roomy") < order.index("middle") < order.index("narrow")  # ranked by the weights
