"""The README's "By hand" path, literally: one machine, default identities, no flags beyond it.

Each test gets its own user dirs (XDG_*), so the default keys are created fresh, as on a new
machine; the model cache is shared so nothing is fetched twice. mDNS is turned off through the
environment (GPUTORRENT_MDNS=0), not a flag: the commands stay the README's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gputorrent.config import load_settings
from gputorrent.lab.localswarm import PeerProcess

from .conftest import QUESTION, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture
def user(tmp_path, model_path):
    """A fresh user: own data and config dirs, the shared model cache, mDNS off."""
    cache = load_settings().cache_dir
    return {"XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CONFIG_HOME": str(tmp_path / "config"),
            "XDG_CACHE_HOME": str(cache.parent), "GPUTORRENT_MDNS": "0", "GPUTORRENT_BOOTSTRAP": "",
            "PYTHONUNBUFFERED": "1"}


def _spawn(tmp_path: Path, name: str, env: dict, *args: str) -> PeerProcess:
    log = tmp_path / f"{name}.stderr"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "gputorrent.cli", *args], stdout=subprocess.PIPE, stderr=err,
                                stdin=subprocess.DEVNULL, text=True, env={**os.environ, **env})
    return PeerProcess(name, proc, tmp_path / f"{name}.none", Path(), log)


def test_serve_and_ask_on_one_machine_with_the_default_identity(tmp_path, user):
    server = _spawn(tmp_path, "serve", user, "serve", "--model", "smollm2")
    try:
        server.wait_ready(180)
        addr = server.addr
        peers = run_cli("peers", "--bootstrap", addr, "--json", env=user)
        assert peers.returncode == 0, peers.stderr
        assert [p["peer_id"] for p in json.loads(peers.stdout)] == [addr.rsplit("/p2p/", 1)[1]]
        done = run_cli("ask", QUESTION, "--bootstrap", addr, env=user)  # as written: sampled, so any words
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip()
        greedy = run_cli("ask", QUESTION, "--bootstrap", addr, "--temperature", "0", env=user)
        assert greedy.returncode == 0 and "Paris" in greedy.stdout, greedy.stderr
        # Two keys in the user's data dir: the node's and the requester's.
        keys = sorted(p.name for p in (tmp_path / "data" / "gputorrent").glob("*.key"))
        assert keys == ["identity.key", "requester.key"]

        # One key for both, by hand: the serve holds it, so the ask takes a key of its own for the
        # session (linked to that serving key for credit) and is answered, never a duplicate id.
        same = run_cli("ask", QUESTION, "--bootstrap", addr, "--temperature", "0", "--identity",
                       str(tmp_path / "data" / "gputorrent" / "identity.key"), env=user)
        assert same.returncode == 0 and "Paris" in same.stdout, same.stderr

        # A second serve on the port the first one holds: a one-line usage error, before any work.
        port = addr.split("/tcp/")[1].split("/")[0]
        t0 = time.monotonic()
        taken = run_cli("serve", "--model", "smollm2", "--listen", f"/ip4/127.0.0.1/tcp/{port}", env=user, timeout=60)
        assert taken.returncode == 2
        assert f"port {port}" in taken.stderr and "in use" in taken.stderr
        assert len(taken.stderr.strip().splitlines()) == 1
        assert time.monotonic() - t0 < 10  # no model load first
    finally:
        server.stop()


def test_no_two_live_processes_of_a_machine_present_one_peer_id(tmp_path, user, swarm):
    """#33: ask, the TUI, the gateway and the API shared requester.key, so one ask beside a running
    gateway was the same peer id twice and knocked the gateway out. A requester whose key another
    live process holds now gets a key of its own for the session; a second serve on one key is
    refused, saying what to do."""
    import trio

    from gputorrent import Swarm

    peer = swarm.start("one-key-peer", "--ctx", "512", "--log-format", "json")
    data = Path(user["XDG_DATA_HOME"]) / "gputorrent"

    async def main() -> None:
        async with Swarm(peers=[peer.addr], mdns=False, data_dir=data) as first:
            # A CLI ask with the same default key, while the first holds it, and the first again.
            asked = await trio.to_thread.run_sync(lambda: run_cli("ask", QUESTION, "--peer", peer.addr,
                                                                  "--max-tokens", "4", env=user))
            assert asked.returncode == 0, asked.stderr
            async with Swarm(peers=[peer.addr], mdns=False, data_dir=data) as second:
                assert second.peer_id != first.peer_id
                assert (await second.generate(QUESTION, max_tokens=4, temperature=0)).text
            assert (await first.generate(QUESTION, max_tokens=4, temperature=0)).text

    trio.run(main)
    requesters = [json.loads(line).get("requester") for line in peer.log.read_text().splitlines()
                  if line.startswith("{") and '"accepted"' in line]
    assert len(requesters) == 3 and len(set(requesters)) == 3, requesters  # three processes, three ids
    # Two serves on one key: the second says so, before it loads anything.
    first = _spawn(tmp_path, "serve-1", user, "serve", "--model", "smollm2", "--ctx", "512")
    try:
        first.wait_ready(120)
        second = run_cli("serve", "--model", "smollm2", "--ctx", "512", env=user, timeout=60)
        assert second.returncode == 2 and "using the key" in second.stderr and "--identity" in second.stderr
    finally:
        first.stop()
