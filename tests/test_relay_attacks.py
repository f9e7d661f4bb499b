"""Relays under attack (#34), in the NAT lab: an attacker at home B, a private donor at home C,
an honest requester at home A, two public relays. Each attack is the real hostile client
(``gputorrent.lab.relayflood``) against real relay processes.

- Reservation exhaustion: 16 keys reserve, then one connection asks 200 reservations for
  made-up peer ids. py-libp2p reserved for the id named in the message: the relay was full for
  an hour, and a donor starting afterwards got no reservation anywhere.
- Circuit flood: 16 keys from one address each hold a circuit to the donor through each relay;
  the donor's 16 circuits per relay were gone and honest asks were refused ("no reservation").

The lab's whole "internet" is one /24 standing for many networks, so its relays count source
networks per /32 (``--relay-limits v4-prefix=32``); the limits are the defaults otherwise."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from gputorrent.lab import natlab
from gputorrent.lab.localswarm import LocalSwarm

pytestmark = pytest.mark.slow

_reason = natlab.unavailable_reason()
if _reason:
    pytest.skip(f"NAT lab unavailable: {_reason}", allow_module_level=True)

LAB_LIMITS = ("--relay-limits", "v4-prefix=32")


@pytest.fixture(scope="module")
def relays(lab, tmp_path_factory):
    with LocalSwarm(workdir=tmp_path_factory.mktemp("relay-attacks")) as swarm:
        for name, ip in (("relay1", natlab.RELAY_IP), ("relay2", natlab.RELAY2_IP)):
            swarm.start(name, *LAB_LIMITS, command="bootstrap", wrap=lab.exec_argv("inet", []),
                        listen=f"/ip4/{ip}/tcp/4201", timeout=60)
        yield swarm


@pytest.fixture(scope="module")
def model_c(tmp_path_factory, model_path):
    """The donor's own file (the demo model plus 1 MiB: another model id), so an ask by its id
    reaches that donor and nobody else."""
    path = tmp_path_factory.mktemp("model-c") / "home-c.gguf"
    path.write_bytes(model_path.read_bytes() + b"\0" * (1 << 20))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _flood(lab, home: str, swarm: LocalSwarm, *args: str, timeout: float = 120) -> dict:
    cmd = lab.exec_argv(home, [sys.executable, "-m", "gputorrent.lab.relayflood", *args])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=swarm.env)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ask(lab, swarm: LocalSwarm, model_id: str, key: str) -> subprocess.CompletedProcess:
    cmd = lab.exec_argv("home-a", [sys.executable, "-m", "gputorrent.cli", "ask", "Name three colours.",
                                   "--bootstrap", swarm.peers["relay1"].addr, "--no-mdns", "--model", model_id,
                                   "--max-tokens", "8", "--temperature", "0", "--json", "--spot-check", "0",
                                   "--identity", str(swarm.workdir / key)])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=swarm.env)


def test_a_relay_emptied_by_forged_reservations_still_takes_a_new_donor(lab, relays, model_c):
    path, model_id = model_c
    floods = [_flood(lab, "home-b", relays, "reserve", relays.peers[name].addr, "--keys", "16", "--forged", "200")
              for name in ("relay1", "relay2")]
    donor = relays.start("donor-c", "--bootstrap", relays.peers["relay1"].addr, "--bootstrap",
                         relays.peers["relay2"].addr, "--model", str(path), "--alias", "homec",
                         wrap=lab.exec_argv("home-c", []), listen=f"/ip4/{lab.homes['c'].ip}/tcp/4201")
    assert donor.info["reachability"] == "private"
    assert donor.info["addrs"], donor.stderr()[-2000:]  # it holds reservations: circuit addresses
    assert "no relay took a reservation" not in donor.stderr()
    asked = _ask(lab, relays, model_id, "asker-1.key")
    assert asked.returncode == 0, asked.stderr[-2000:]
    answer = json.loads(asked.stdout)
    assert answer["peer_id"] == donor.peer_id and answer["attempts"][-1]["path"] == "relayed", answer
    for got in floods:
        assert got["reserved"] <= 8, got  # 8 reservations per source network
        assert set(got["forged"]) == {"202"}, got  # made-up ids: PERMISSION_DENIED, before any slot


def test_a_circuit_flood_from_one_address_leaves_room_for_an_honest_ask(lab, relays, model_c):
    _, model_id = model_c
    donor = relays.peers["donor-c"]
    attacker = subprocess.Popen(lab.exec_argv("home-b", [sys.executable, "-m", "gputorrent.lab.relayflood",
                                                         "circuits", *donor.info["addrs"], "--keys", "16"]),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=relays.env,
                                start_new_session=True)
    try:
        held = json.loads(attacker.stdout.readline())
        asked = _ask(lab, relays, model_id, "asker-2.key")
        assert asked.returncode == 0, f"{held}: {asked.stderr[-2000:]}"
        assert json.loads(asked.stdout)["peer_id"] == donor.peer_id
        assert held.get("held", 0) <= 4 * len(donor.info["addrs"]), held  # 4 per source network per relay
    finally:
        attacker.kill()
        attacker.wait(10)
