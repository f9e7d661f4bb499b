"""The README's "By hand" block, run as a newcomer would on one machine: default data dirs, no
``--identity``, commands as written (the model cache is shared with the suite, so the pull
finds it there; mDNS is off through the environment, so nothing leaves loopback)."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import agent_env, stop_agents

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parent.parent / "README.md"


def _by_hand() -> list[list[str]]:
    """The gputorrent commands of the README's "By hand" block, ADDR left as it is."""
    text = README.read_text()
    block = text[text.index("## By hand"):]
    block = block[block.index("```sh") + 5:block.index("```", block.index("```sh") + 5)]
    out = []
    for line in block.splitlines():
        line = line.split("  #")[0].strip()
        if line.startswith("gputorrent "):
            import shlex

            out.append(shlex.split(line)[1:])
    return out


def _first_line(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no address within the time"
    return proc.stdout.readline().strip()


def test_the_readme_by_hand_block_answers_on_one_machine(tmp_path, model_path):
    commands = _by_hand()
    assert [c[0] for c in commands] == ["models", "bootstrap", "serve", "peers", "ask"], commands
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "GPUTORRENT_MDNS": "false", "XDG_CACHE_HOME": str(model_path.parent.parent.parent),
           **agent_env(tmp_path)}  # as a newcomer's: ask starts this user's agent
    py = [sys.executable, "-m", "gputorrent.cli"]

    def run(args: list[str], addr: str) -> subprocess.CompletedProcess:
        return subprocess.run([*py, *(addr if a == "ADDR" else a for a in args)], capture_output=True, text=True,
                              env=env, timeout=120)

    assert run(commands[0], "").returncode == 0  # models pull: already in the cache
    started: list[subprocess.Popen] = []
    try:
        boot = subprocess.Popen([*py, *commands[1]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)
        started.append(boot)
        addr = _first_line(boot, 60)
        assert re.match(r"^/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+$", addr), addr
        serve = subprocess.Popen([*py, *(addr if a == "ADDR" else a for a in commands[2])], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env)
        started.append(serve)
        serving = _first_line(serve, 120)
        assert serving.split("/p2p/")[1] != addr.split("/p2p/")[1]  # two keys: two peers
        peers = run([*commands[3], "--json"], addr)
        assert peers.returncode == 0 and serving.split("/p2p/")[1] in peers.stdout, peers.stderr
        asked = run(commands[4], addr)
        assert asked.returncode == 0 and "Paris" in asked.stdout, asked.stderr
        # The bootstrap node keeps its address across restarts: what others wrote down still works.
        boot.send_signal(signal.SIGINT)
        boot.wait(15)
        again = subprocess.Popen([*py, *commands[1]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=env)
        started.append(again)
        assert _first_line(again, 60) == addr
        assert list((tmp_path / "run" / "gputorrent").glob("agent-*.json"))  # the ask went through the agent
    finally:
        stop_agents(tmp_path / "run")
        for p in started:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in started:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
