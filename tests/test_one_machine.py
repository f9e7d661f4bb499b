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


SOAK_S = 120.0


def test_a_gateway_a_tui_cli_asks_and_an_api_program_share_one_machine(tmp_path, user, swarm, monkeypatch):
    """#33's day on one machine: a gateway, the TUI under its pilot, CLI asks and a Python API
    program, all with the default keys, side by side for two minutes, all through the one agent
    the first of them starts. Every request is answered (no 404, no 503), and the TUI sees no
    live peer leave."""
    import asyncio
    import threading
    import urllib.request

    from gputorrent import Swarm
    from gputorrent.tui import SwarmApp
    from gputorrent.tui.app import Answer

    from .conftest import agent_env, stop_agents
    from .test_tui import until

    boot = swarm.bootstrap("soak-boot")
    for name in ("soak-a", "soak-b"):
        swarm.spawn(name, "--bootstrap", boot.addr, "--slots", "4", "--rate-limit", "0")
    for name in ("soak-a", "soak-b"):
        swarm.peers[name].wait_ready(120)
    env = {**user, **agent_env(tmp_path), "GPUTORRENT_BOOTSTRAP": boot.addr}
    data = Path(user["XDG_DATA_HOME"]) / "gputorrent"
    gateway = _spawn(tmp_path, "gateway", env, "gateway", "--port", "0")
    api: subprocess.Popen | None = None
    failures: list[str] = []
    counts = {"cli": 0, "http": 0}
    stop_at = time.monotonic() + SOAK_S

    def cli_asks() -> None:
        while time.monotonic() < stop_at or counts["cli"] < 20:
            done = run_cli("ask", QUESTION, "--max-tokens", "8", env=env)
            counts["cli"] += 1
            if done.returncode != 0:
                failures.append(f"cli: {done.stderr.strip()}")

    def http_asks() -> None:
        body = json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": QUESTION}],
                           "max_tokens": 8}).encode()
        while time.monotonic() < stop_at:
            req = urllib.request.Request(f"{gateway.addr}/v1/chat/completions", body,
                                         {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    counts["http"] += resp.status == 200 and bool(json.loads(resp.read())["choices"])
            except Exception as exc:  # every failure is the finding
                failures.append(f"gateway: {exc}")

    for key, value in env.items():  # the TUI runs in this process, as the user's
        monkeypatch.setenv(key, value)
    app = SwarmApp(Swarm([boot.addr], mdns=False, data_dir=data, watch_interval=1.0, agent=True),
                   params={"temperature": 0, "max_tokens": 8})
    tui_answers = 0

    async def tui() -> None:
        nonlocal tui_answers
        async with app.run_test(size=(150, 42)) as pilot:
            table = app.query_one("#peers")
            await until(pilot, lambda: table.row_count == 2, timeout=60, what="both peers in the table")
            while time.monotonic() < stop_at:
                await pilot.press("a", *QUESTION, "enter")
                await until(pilot, lambda: not app.asking and len(app.query(Answer)) > tui_answers, timeout=60,
                            what="the TUI's answer")
                tui_answers += 1
                await pilot.pause(2.0)
            log = "\n".join(str(line.text) for line in app.query_one("#log").lines)
            assert "peer left" not in log, log
            metas = [str(m.render()) for m in app.query(".meta")]
            assert all("receipt verified" in m for m in metas), metas

    try:
        gateway.wait_ready(60)  # the gateway started the agent: Swarm() below finds it running
        api = subprocess.Popen([sys.executable, "-c", _API_PROGRAM, str(SOAK_S)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
        workers = [threading.Thread(target=f, daemon=True) for f in (cli_asks, cli_asks, http_asks)]
        for w in workers:
            w.start()
        asyncio.run(asyncio.wait_for(tui(), SOAK_S + 120))
        for w in workers:
            w.join(SOAK_S + 120)
        out, err = api.communicate(timeout=120)
    finally:
        if api is not None:
            api.kill()
        gateway.stop()
        stop_agents(tmp_path / "run")
    logs = "".join(p.read_text() for p in (tmp_path / "run" / "gputorrent").glob("agent-*.log"))
    assert logs.count(" serves ") == 1, logs  # one agent all along: none stopped or replaced mid-way
    api_rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert api.returncode == 0 and api_rows and all(r["ok"] for r in api_rows), err[-2000:]
    assert all(r["through_agent"] for r in api_rows) and app.swarm.through_agent
    assert not failures, failures[:5]
    # Each face kept asking throughout (the TUI waits for each answer and 2 s more; on a CI
    # machine's loaded cores it got 9 to 25 in the two minutes).
    assert counts["cli"] >= 20 and counts["http"] >= 20 and tui_answers >= 3, (counts, tui_answers)


# The Python API program of the soak test: Swarm() with every default (its key, the user's),
# asking until its time is up; one JSON line per answer.
_API_PROGRAM = """
import json, sys, time, trio
from gputorrent import Swarm, AskFailed
async def main():
    stop = time.monotonic() + float(sys.argv[1])
    async with Swarm() as swarm:
        while time.monotonic() < stop:
            try:
                a = await swarm.generate("Name a colour.", max_tokens=8)
                print(json.dumps({"ok": bool(a.text), "peer": a.peer_id, "through_agent": swarm.through_agent}),
                      flush=True)
            except AskFailed as exc:
                print(json.dumps({"ok": False, "error": str(exc)}), flush=True)
            await trio.sleep(1.0)
trio.run(main)
"""
