"""Real distance in the NAT lab: every home's access link delayed in user space
(gputorrent/lab/delay.py, "intercontinental": 150 ms between a home and the internet, 300 ms
between homes, 0.5 % loss, 50 Mbit/s). A donor at home A, a relay in the internet, asks from
home C through the agent and in-process. At this distance a relayed circuit takes longer to
open than the ranking's pings may wait, and every cold ask failed "unreachable" until ranking
kept a far relayed peer as a candidate. The lab, the delay programs and the agents are gone after the module, even on
failure. benchmarks/wan.py measures the full matrix."""

from __future__ import annotations

import sys

import pytest

from gputorrent.lab import natlab
from gputorrent.lab.localswarm import LocalSwarm
from gputorrent.lab.wan import gputorrent, tcp_rtt_ms

from .conftest import agent_env, stop_agents

pytestmark = pytest.mark.slow

_reason = natlab.unavailable_reason()
if _reason:
    pytest.skip(f"NAT lab unavailable: {_reason}", allow_module_level=True)

LINK = natlab.LINKS["intercontinental"]


@pytest.fixture(scope="module")
def wan(model_path, tmp_path_factory):
    work = tmp_path_factory.mktemp("wan")
    with natlab.NatLab() as lab:
        try:
            lab.shape(LINK)
        except natlab.LabUnavailable as exc:
            pytest.skip(str(exc))
        with LocalSwarm(workdir=work) as swarm:
            relay = swarm.start("relay", command="bootstrap", wrap=lab.exec_argv("inet", []),
                                listen=f"/ip4/{natlab.RELAY_IP}/tcp/4001", timeout=60)
            swarm.start("donor", "--bootstrap", relay.addr, "--model", str(model_path),
                        wrap=lab.exec_argv("home-a", []), listen=f"/ip4/{lab.homes['a'].ip}/tcp/4001")
            yield lab, swarm, relay.addr
    assert not lab.leftovers() and not lab.shapers


def test_asks_from_a_home_an_ocean_away_from_the_internet_are_answered_and_agree(wan, tmp_path):
    lab, swarm, relay = wan
    rtt = tcp_rtt_ms(lab, "home-c", natlab.RELAY_IP, 4001)
    assert LINK.rtt_ms <= rtt <= LINK.rtt_ms + 25, rtt
    env = {**swarm.env, **agent_env(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data")}
    env.pop("GPUTORRENT_IDENTITY", None)
    ask = ("ask", "Name three colours.", "--bootstrap", relay, "--max-tokens", "8", "--temperature", "0", "--json")
    try:
        cold = gputorrent(lab, "home-c", *ask, "--no-agent", env=env)
        first = gputorrent(lab, "home-c", *ask, env=env)  # starts the agent inside home C
        warm = gputorrent(lab, "home-c", *ask, env=env)
    finally:
        stopped = stop_agents(tmp_path / "run")
    for t in (cold, first, warm):
        assert t.rc == 0, t.stderr
    assert len(stopped) == 1
    assert cold.out["text"] == first.out["text"] == warm.out["text"] and cold.out["text"]
    assert all(a["path"] == "relayed" or a["path"] == "hole-punched" for a in warm.out["attempts"]), warm.out
    # The warm ask has joined nothing: fewer of the link's round trips than the cold one.
    assert warm.round_trips(rtt) < cold.round_trips(rtt), (warm.seconds, cold.seconds)
    print(f"\nRTT {rtt:.1f} ms; cold {cold.seconds:.2f} s ({cold.round_trips(rtt):.0f} RTT beyond the model), "
          f"first through the agent {first.seconds:.2f} s, warm {warm.seconds:.2f} s "
          f"({warm.round_trips(rtt):.0f} RTT)", file=sys.stderr)
