"""The resident agent (gputorrent/agent/): started by the first ask, shared by the next,
replaced when it crashed or is of another version, told of a client's Ctrl-C, serving its own
user only, and gone when idle. Real processes: a bootstrap node, a serve, the CLI, the agent."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import QUESTION, agent_env, stop_agents

PY = [sys.executable, "-m", "gputorrent.cli"]


@pytest.fixture(scope="module")
def boot(swarm):
    b = swarm.bootstrap()
    swarm.start("p1", "--bootstrap", b.addr)
    return b.addr


@pytest.fixture
def env(tmp_path):
    """Default key and data dirs of a user of their own (no --identity), and their runtime dir."""
    e = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"), **agent_env(tmp_path)}
    e.pop("GPUTORRENT_IDENTITY", None)
    yield e
    stop_agents(tmp_path / "run")


def gt(env, *args, timeout=120, py=PY):
    return subprocess.run([*py, *args], env=env, capture_output=True, text=True, timeout=timeout)


def status(env) -> dict:
    done = gt(env, "agent", "status", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def ask(boot: str, *extra: str) -> tuple[str, ...]:
    return ("ask", QUESTION, "--bootstrap", boot, "--temperature", "0", "--max-tokens", "8", *extra)


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_the_first_ask_starts_the_agent_the_next_ones_reuse_it_and_stop_ends_it(boot, env):
    assert status(env)["running"] is False
    first = gt(env, *ask(boot, "--json"))
    assert first.returncode == 0, first.stderr
    st = status(env)
    assert st["running"] and st["requests"] == 1 and Path(st["socket"]).exists()
    assert oct(Path(st["socket"]).stat().st_mode & 0o777) == "0o600"
    # A warm ask is thin: it imports neither trio nor py-libp2p.
    second = gt(env, *ask(boot, "--json"), py=[sys.executable, "-X", "importtime", "-m", "gputorrent.cli"])
    assert second.returncode == 0, second.stderr
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in second.stderr.splitlines()
                if line.startswith("import time:")}
    assert "gputorrent" in imported and not imported & {"trio", "libp2p", "multiaddr", "llama_cpp"}
    again = status(env)
    assert again["pid"] == st["pid"] and again["requests"] == 2
    in_process = gt(env, *ask(boot, "--json", "--no-agent"))
    assert in_process.returncode == 0, in_process.stderr
    texts = {json.loads(d.stdout)["text"] for d in (first, second, in_process)}
    assert len(texts) == 1 and "Paris" in texts.pop()
    assert status(env)["requests"] == 2  # --no-agent did not go through it
    stopped = gt(env, "agent", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert _gone(st["pid"], 5) and not Path(st["socket"]).exists() and status(env)["running"] is False


def test_two_asks_at_once_start_one_agent(boot, env):
    procs = [subprocess.Popen([*PY, *ask(boot)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1] for o in outs]
    assert all("Paris" in o[0] for o in outs)
    st = status(env)
    assert st["requests"] == 3
    assert Path(st["log"]).read_text().count(" serves ") == 1  # one agent ever started


def test_a_crashed_agent_leaves_a_stale_socket_and_the_next_ask_replaces_it(boot, env):
    assert gt(env, *ask(boot)).returncode == 0
    st = status(env)
    os.kill(st["pid"], signal.SIGKILL)
    assert _gone(st["pid"], 10)
    assert Path(st["socket"]).exists()  # nobody listens on it any more
    done = gt(env, *ask(boot))
    assert done.returncode == 0 and "Paris" in done.stdout, done.stderr
    assert status(env)["pid"] not in (st["pid"], None)


def test_an_agent_of_another_version_is_replaced(boot, env):
    old = subprocess.Popen([*PY, "agent", "run", "--bootstrap", boot], env={**env, "GPUTORRENT_AGENT_CLAIM": "0.0.1/0"},
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        ready, _, _ = select.select([old.stdout], [], [], 60)
        said = json.loads(old.stdout.readline()) if ready else {}
        assert said.get("ready") and said["version"] == "0.0.1/0", said
        done = gt(env, *ask(boot))
        assert done.returncode == 0 and "Paris" in done.stdout, done.stderr
        assert old.wait(15) == 0  # told to stop, it stopped
        st = status(env)
        assert st["pid"] != said["pid"] and st["version"] != "0.0.1/0"
    finally:
        old.kill()


def test_ctrl_c_on_a_thin_ask_cancels_its_answer_in_the_agent(boot, env):
    assert gt(env, *ask(boot)).returncode == 0  # the agent runs
    proc = subprocess.Popen([*PY, "ask", "Write a very long story about the sea.", "--bootstrap", boot,
                             "--max-tokens", "1500"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready and proc.stdout.read1(64), "no text streamed"
        assert status(env)["in_flight"] == 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 130
        deadline = time.monotonic() + 10  # 1,500 tokens would take ~20 s more here
        while status(env)["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status(env)["in_flight"] == 0
    finally:
        proc.kill()
        proc.wait(10)


def test_an_idle_agent_exits_and_the_next_ask_starts_another(boot, env):
    env["GPUTORRENT_AGENT_IDLE"] = "1"
    assert gt(env, *ask(boot)).returncode == 0
    (log,) = (Path(env["XDG_RUNTIME_DIR"]) / "gputorrent").glob("agent-*.log")
    pid = int(log.read_text().split()[1])  # "agent PID (VERSION) serves ...": it may be gone already
    assert _gone(pid, 20)
    assert "stops: 1 s without a request" in log.read_text()
    assert status(env)["running"] is False
    assert gt(env, *ask(boot)).returncode == 0


OTHER_PYTHON = shutil.which("python3", path="/usr/bin:/bin")  # one another user may run


@pytest.mark.skipif(os.getuid() != 0 or not OTHER_PYTHON, reason="connecting as another user needs root and a "
                                                                  "system python3")
def test_another_user_is_refused_even_with_the_socket_open_to_all(boot, env):
    run = Path(tempfile.mkdtemp(prefix="gt-run-"))  # under /tmp: another user can walk to it once opened
    try:
        env["XDG_RUNTIME_DIR"] = str(run)
        assert gt(env, *ask(boot)).returncode == 0
        st = status(env)
        os.chmod(run, 0o711)
        os.chmod(run / "gputorrent", 0o711)
        os.chmod(st["socket"], 0o666)
        # The refusal comes at connect, before any request is read: the client only listens (a
        # request written first could meet the closed socket: BrokenPipe, seen on CI).
        hello = ("import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
                 "print(s.recv(4096).decode())")
        other = subprocess.run([OTHER_PYTHON, "-c", hello, st["socket"]], user=65534, cwd="/", capture_output=True,
                               text=True, timeout=30)
        assert "its own user only" in other.stdout, other.stderr
        os.chmod(run / "gputorrent", 0o700)
        assert status(env)["refused"] == 1
    finally:
        stop_agents(run)
        shutil.rmtree(run, ignore_errors=True)


def test_a_runtime_dir_others_can_open_is_refused(tmp_path, env):
    (tmp_path / "run" / "gputorrent").mkdir(mode=0o755)
    os.chmod(tmp_path / "run" / "gputorrent", 0o755)
    done = gt(env, "ask", "hi", "--bootstrap", "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWA8p5zrKnzJKJ69KvSdQDhGvDKFeHRiAfcKFu2H2yVLh6")
    assert done.returncode == 1 and "nobody else can open" in done.stderr and done.stderr.count("\n") == 1


def test_peers_ban_and_reset_reach_the_running_agent(boot, env, swarm):
    assert gt(env, *ask(boot)).returncode == 0
    p1 = swarm.peers["p1"].peer_id
    assert gt(env, "peers", "--ban", p1).returncode == 0
    banned = gt(env, *ask(boot))  # the agent's own breakers, not only the file beside it
    assert banned.returncode == 1 and "breaker open" in banned.stderr, banned.stderr
    assert gt(env, "peers", "--reset", p1).returncode == 0
    again = gt(env, *ask(boot))
    assert again.returncode == 0 and "Paris" in again.stdout, again.stderr
    assert status(env)["requests"] == 3


def test_a_stuck_agent_fails_a_thin_ask_in_bounded_time_and_stop_ends_it(boot, env):
    assert gt(env, *ask(boot)).returncode == 0
    st = status(env)
    os.kill(st["pid"], signal.SIGSTOP)  # it still accepts connections (the kernel does), answers nothing
    try:
        t0 = time.monotonic()
        stuck = status(env)
        assert stuck["running"] and stuck["pid"] == st["pid"] and "requests" not in stuck
        done = gt(env, *ask(boot, "--deadline", "1"), timeout=60)
        assert done.returncode == 1 and "sent nothing for 16 s" in done.stderr, done.stderr
        assert gt(env, "agent", "stop").returncode == 0
        assert _gone(st["pid"], 5) and time.monotonic() - t0 < 45
    finally:
        try:
            os.kill(st["pid"], signal.SIGCONT)
        except ProcessLookupError:
            pass


# A Python program on the user's machine: Swarm() with its defaults while the agent runs.
_API = """
import json, sys, trio
from gputorrent import AskFailed, Finished, Swarm, Text
async def main():
    out = {}
    async with Swarm([sys.argv[1]]) as s:
        out.update(through=s.through_agent, peer_id=s.peer_id, text="")
        async for ev in s.stream(sys.argv[2], model="smollm2", max_tokens=8, temperature=0):
            if isinstance(ev, Text):
                out["text"] += ev.text
            elif isinstance(ev, Finished):
                out.update(answer=ev.answer.text, verified=ev.answer.receipt_verified, served_by=ev.answer.peer_id,
                           attempts=len(ev.answer.attempts))
        out["peers"] = [p.peer_id for p in await s.peers(ping=True)]
        out["plan"] = [ad.peer_id for ad in (await s.rank("smollm2")).order]
        try:
            await s.generate("hi", model="no-such-model")
        except AskFailed as exc:
            out["unknown"] = exc.kind
        try:
            await s.generate("hi", max_tokens=0)
        except ValueError as exc:
            out["bad"] = str(exc)
    async with Swarm([sys.argv[1]], agent=False) as s:
        out.update(own_through=s.through_agent, own_id=s.peer_id)
    print(json.dumps(out))
trio.run(main)
"""


def test_the_api_uses_the_running_agent_and_agent_false_joins_in_process(boot, env, swarm):
    assert gt(env, *ask(boot)).returncode == 0
    st = status(env)
    done = subprocess.run([sys.executable, "-c", _API, boot, QUESTION], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    p1 = swarm.peers["p1"].peer_id
    assert got["through"] and got["peer_id"] == st["peer_id"]
    assert "Paris" in got["text"] and got["answer"] == got["text"] and got["verified"] and got["served_by"] == p1
    assert got["peers"] == [p1] and got["plan"] == [p1]
    assert got["unknown"] == "unknown_model" and "max_tokens" in got["bad"]
    assert not got["own_through"] and got["own_id"] != st["peer_id"]  # the agent holds the key: one of its own
    after = status(env)
    assert after["pid"] == st["pid"] and after["requests"] >= st["requests"] + 5


def test_the_gateway_starts_the_agent_and_answers_through_it(boot, env, tmp_path):
    import httpx

    serving = gt(env, "id", "--json")  # this machine serves too: its asks are credited to that key
    assert serving.returncode == 0, serving.stderr
    ready = tmp_path / "gw.json"
    gw = subprocess.Popen([*PY, "gateway", "--port", "0", "--ready-file", str(ready), "--bootstrap", boot], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and gw.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), gw.stderr.read() if gw.poll() is not None else "no ready file"
        url = json.loads(ready.read_text())["url"]
        st = status(env)
        assert st["running"] and json.loads(ready.read_text())["peer_id"] == st["peer_id"]
        assert st["credited_to"] == json.loads(serving.stdout)["peer_id"] != st["peer_id"]
        models = httpx.get(f"{url}/v1/models", timeout=30).json()
        assert [m["id"] for m in models["data"]] == ["smollm2"]
        body = {"model": "smollm2", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8,
                "temperature": 0}
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert answer.status_code == 200 and "Paris" in answer.json()["choices"][0]["message"]["content"]
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as sse:
            chunks = [line for line in sse.iter_lines() if line.startswith("data: {")]
        assert len(chunks) >= 2 and "Paris" in "".join(json.loads(c[6:])["choices"][0]["delta"].get("content", "")
                                                      for c in chunks)
        missing = httpx.post(f"{url}/v1/chat/completions", json={**body, "model": "no-such-model"}, timeout=60)
        assert missing.status_code == 404
        assert gt(env, *ask(boot)).returncode == 0  # a thin ask beside it: the same agent, no knock-out
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 200
        after = status(env)
        assert after["pid"] == st["pid"] and after["requests"] >= st["requests"] + 4
        gw.send_signal(signal.SIGINT)
        assert gw.wait(15) == 0
        assert status(env)["pid"] == st["pid"]  # the agent outlives its clients (until idle)
    finally:
        gw.kill()
        gw.wait(10)


def test_the_tui_watches_asks_and_bans_through_the_agent(boot, env, swarm, monkeypatch):
    import asyncio

    from gputorrent import Swarm
    from gputorrent.tui import SwarmApp
    from gputorrent.tui.app import Answer

    from .test_tui import until

    for key in ("GPUTORRENT_AGENT", "XDG_RUNTIME_DIR", "XDG_DATA_HOME", "GPUTORRENT_MDNS"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.delenv("GPUTORRENT_IDENTITY", raising=False)
    p1 = swarm.peers["p1"].peer_id
    app = SwarmApp(Swarm([boot], agent=True), params={"temperature": 0, "max_tokens": 8})

    async def scenario() -> None:
        async with app.run_test(size=(150, 42)) as pilot:
            table = app.query_one("#peers")
            await until(pilot, lambda: table.row_count == 1, what="the peer in the table")
            assert app.swarm.through_agent and app.swarm.peer_id == status(env)["peer_id"]
            await pilot.press("a", *QUESTION, "enter")
            await until(pilot, lambda: "receipt verified" in str(app.query_one(".meta").render()),
                        what="a finished answer")
            assert "Paris" in str(app.query_one(Answer).render())
            table.focus()
            await pilot.press("home", "b")
            await until(pilot, lambda: app.peers[p1].banned, what="the ban")
            assert status(env)["in_flight"] >= 1  # the TUI's watch keeps the agent busy, so never idle
            await pilot.press("b")
            await until(pilot, lambda: not app.peers[p1].banned, what="the unban")

    asyncio.run(asyncio.wait_for(scenario(), 90))
    banned = gt(env, *ask(boot))  # the ban and its lifting were the agent's own
    assert banned.returncode == 0 and "Paris" in banned.stdout, banned.stderr


def test_peers_through_a_warm_agent_come_from_its_view_and_fresh_looks_again(boot, env, swarm):
    assert gt(env, *ask(boot)).returncode == 0  # ranks from an overview of the swarm: the view has one
    p1 = swarm.peers["p1"].peer_id
    before = status(env)["lookups"]
    for _ in range(2):
        done = gt(env, "peers", "--bootstrap", boot, "--json")
        assert done.returncode == 0, done.stderr
        rows = json.loads(done.stdout)
        assert [r["peer_id"] for r in rows] == [p1] and rows[0]["rtt_ms"] is not None
    models = gt(env, "models", "list", "--swarm", "--bootstrap", boot, "--json")
    assert [m["alias"] for m in json.loads(models.stdout)] == ["smollm2"]
    assert status(env)["lookups"] == before  # no lookup waited for: all from the warm view
    fresh = gt(env, "peers", "--bootstrap", boot, "--json", "--fresh")
    assert [r["peer_id"] for r in json.loads(fresh.stdout)] == [p1]
    assert status(env)["lookups"] == before + 1


def test_a_traced_cold_ask_says_where_its_time_went(boot, env, tmp_path):
    from gputorrent.lab import tracing

    path = tmp_path / "ask.trace"
    done = gt({**env, "GPUTORRENT_TRACE": str(path)}, *ask(boot, "--no-agent"))
    assert done.returncode == 0, done.stderr
    spans = tracing.read(path)
    names = [s.name for s in spans]
    assert {"process start", "main", "join", "rank", "lookup", "dial", "ping", "infer stream", "first token"} <= set(names)
    # Naming no model, it lists the swarm to choose one, and walks no more for the model it
    # chose, whole or in shards (the list has every peer that serves it).
    keys = [s.attrs["key"] for s in spans if s.name == "lookup"]
    assert keys == ["overview"], keys
    # Its own streams carry the request with their negotiation: no round trip before it.
    ours = [s.attrs for s in spans if s.name == "new stream" and s.attrs["protocol"].startswith("/gputorrent/")]
    assert {a["protocol"] for a in ours} == {"/gputorrent/ping/1", "/gputorrent/infer/3"} and all(a["lazy"] for a in ours)
    at = tracing.phases(spans)
    assert 0 < at["join"][0] < at["rank"][0] < at["infer stream"][0] < at["first token"][0]
    assert "| join |" in tracing.table(spans, rtt_ms=1.0)
    size = path.stat().st_size
    quiet = gt(env, *ask(boot, "--no-agent"))  # without the variable, nothing is written
    assert quiet.returncode == 0 and path.stat().st_size == size and list(tmp_path.glob("*.trace")) == [path]
