"""The command's contracts: usage errors exit 2 in one line before any work, a strict config
file, models of one's own under a chosen name (local file, Hugging Face, URL), metrics a real
Prometheus parser reads, JSON-only logs, completion, and ``python -m gputorrent``."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gputorrent.api.swarm import params_from
from gputorrent.identity import Identity
from gputorrent.lab.localswarm import LocalSwarm

from .conftest import QUESTION
from .test_devices import write_gguf

PEER = f"/ip4/127.0.0.1/tcp/9/p2p/{Identity.generate().peer_id}"
NO_SUCH_MODEL = "/nonexistent/model.gguf"  # reached only if the flags were accepted: proves the order


@pytest.mark.parametrize("args, says", [
    (("ask", "hi", "--bootstrap", "foo"), "--bootstrap: 'foo' is not a multiaddr"),
    (("ask", "hi", "--peer", "127.0.0.1:4001"), "--peer: '127.0.0.1:4001' is not a multiaddr"),
    (("ask", "hi", "--peer", "/ip4/127.0.0.1/tcp/4001"), "lacks the peer id"),
    (("ask", "hi", "--peer", PEER, "--attempts", "0"), "--attempts: must be 1 or more"),
    (("ask", "hi", "--peer", PEER, "--stall-timeout", "0"), "--stall-timeout: must be a positive number"),
    (("ask", "hi", "--peer", PEER, "--max-tokens", "1048576"), "--max-tokens: must be between 1 and 131,072"),
    (("ask", "hi", "--peer", PEER, "--spot-check", "2"), "--spot-check: is a probability"),
    (("serve", "--model", NO_SUCH_MODEL, "--listen", "garbage"), "--listen: 'garbage' is not a listen address"),
    (("serve", "--model", NO_SUCH_MODEL, "--ctx", "0"), "--ctx: must be between 16"),
    (("serve", "--model", NO_SUCH_MODEL, "--rate-limit", "-1"), "--rate-limit: must be 0 or more"),
    (("serve", "--model", NO_SUCH_MODEL, "--announce-interval", "0"), "--announce-interval: must be a positive"),
    (("serve", "--model", NO_SUCH_MODEL, "--slots", "0"), "--slots: must be between 1 and 64"),
    (("serve", "--model", NO_SUCH_MODEL, "--allow", "bob"), "--allow: 'bob' is not a peer id"),
    (("serve", "--model", NO_SUCH_MODEL, "--metrics", "9464"), "--metrics: '9464' is not HOST:PORT"),
    (("serve", "--model", NO_SUCH_MODEL, "--alias", "Bad Name"), "--alias: alias 'Bad Name'"),
    (("id", "--identity", "/dev/zero"), "/dev/zero is not a regular file"),
    (("models", "info", "x", "--identity", "k"), "unrecognized arguments: --identity"),
    (("keys", "new-swarm-key", "--identity", "k"), "unrecognized arguments: --identity"),
    (("gateway", "--port", "70000"), "--port: must be between 0 and 65,535"),
    (("peers", "--reset", "nobody"), "--reset: 'nobody' is not a peer id"),
])
def test_usage_errors_exit_2_in_one_line_before_any_work(args, says, cli):
    done = cli(*args)
    assert done.returncode == 2, done.stderr
    assert says in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_a_taken_metrics_port_is_a_usage_error_before_the_model_loads(cli):
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = cli("serve", "--model", NO_SUCH_MODEL, "--metrics", f"127.0.0.1:{port}")
    assert done.returncode == 2 and "--metrics: cannot listen on 127.0.0.1" in done.stderr


@pytest.mark.parametrize("toml, says", [
    ("bootstrap = 5", "bootstrap: expected array, got int"),
    ('mdns = "maybe"', "mdns: expected bool, got str"),
    ("listn = '/ip4/127.0.0.1/tcp/0'", "unknown field listn"),
])
def test_a_wrong_config_key_is_named(toml, says, cli, tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text(toml + "\n")
    done = cli("peers", "--no-mdns", "--bootstrap", PEER, env={"GPUTORRENT_CONFIG": str(cfg)})
    assert done.returncode == 2 and says in done.stderr.replace("`", ""), done.stderr
    assert str(cfg) in done.stderr and "Traceback" not in done.stderr


def test_env_mdns_must_be_a_boolean(cli):
    done = cli("peers", "--bootstrap", PEER, env={"GPUTORRENT_MDNS": "maybe"})
    assert done.returncode == 2 and "GPUTORRENT_MDNS='maybe'" in done.stderr


def test_unknown_generation_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="temprature.*did you mean 'temperature'"):
        params_from(temprature=0)
    assert params_from(temperature=0).temperature == 0


def test_a_closed_pipe_ends_quietly(cli, model_path):
    env = {**os.environ, "GPUTORRENT_IDENTITY": "/dev/null/none"}
    proc = subprocess.Popen([sys.executable, "-m", "gputorrent", "models", "info", str(model_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader is gone before the first line, as `| head -0` would be
    try:
        err = proc.stderr.read().decode()
        assert proc.wait(60) == 141
    finally:
        proc.kill()
    assert "Broken pipe" not in err and "Traceback" not in err and "Exception ignored" not in err


def test_python_dash_m_and_shell_completion(tmp_path):
    done = subprocess.run([sys.executable, "-m", "gputorrent", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("gputorrent ")
    script = subprocess.run([sys.executable, "-m", "gputorrent", "completion", "bash"], capture_output=True,
                            text=True, check=True).stdout
    (tmp_path / "c.bash").write_text(script)

    def complete(*words: str) -> list[str]:
        line = " ".join(words)
        probe = (f"source {tmp_path / 'c.bash'}; COMP_WORDS=(gputorrent {line}); "
                 f"COMP_CWORD={len(words)}; _gputorrent; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
        return subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True).stdout.split()

    assert complete("mo") == ["models"]
    assert {"add", "pull", "list", "info", "remove"} <= set(complete("models", ""))
    assert "--metrics" in complete("serve", "--me") and "--alias" in complete("serve", "--model", "x", "--al")
    zsh = subprocess.run([sys.executable, "-m", "gputorrent", "completion", "zsh"], capture_output=True, text=True)
    assert zsh.stdout.startswith("#compdef gputorrent")


# --- models of one's own ---------------------------------------------------------------------------


class _Hub(http.server.BaseHTTPRequestHandler):
    """A stand-in for the Hugging Face hub's file endpoints: ``/{repo}/resolve/{rev}/{file}``
    with the LFS sha256 as ETag, and ranges (for resume)."""

    files: dict[str, bytes] = {}
    etag: dict[str, str] = {}
    ranges: list[str] = []

    def _file(self) -> tuple[bytes, str] | None:
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return None
        name = "/".join(parts[:2] + parts[4:])
        return (self.files[name], self.etag[name]) if name in self.files else None

    def _head(self, data: bytes, etag: str, status: int = 200, start: int = 0) -> None:
        self.send_response(status)
        self.send_header("ETag", f'"{etag}"')
        self.send_header("X-Repo-Commit", "0" * 40)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(data) - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()

    def do_HEAD(self) -> None:
        found = self._file()
        if found is None:
            self.send_error(404)
            return
        self._head(*found)

    def do_GET(self) -> None:
        found = self._file()
        if found is None:
            self.send_error(404)
            return
        data, etag = found
        rng = self.headers.get("Range")
        start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
        if rng:
            self.ranges.append(rng)
        self._head(data, etag, 206 if rng else 200, start)
        self.wfile.write(data[start:])

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hub(tmp_path):
    _Hub.files, _Hub.etag, _Hub.ranges = {}, {}, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield _Hub, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _cli_env(tmp_path: Path, endpoint: str) -> dict:
    return {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1",
            "XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "0", "NO_PROXY": "127.0.0.1"}


def test_pull_from_a_hub_verifies_resumes_and_names_it(hub, tmp_path, cli):
    files, endpoint = hub
    data = write_gguf(tmp_path / "src.gguf", __import__("gguf").LlamaFileType.MOSTLY_Q4_K_M, 2).read_bytes()
    files.files["me/tiny-GGUF/tiny-Q4_K_M.gguf"] = data
    files.etag["me/tiny-GGUF/tiny-Q4_K_M.gguf"] = hashlib.sha256(data).hexdigest()
    env = _cli_env(tmp_path, endpoint)
    models_dir = tmp_path / "cache" / "gputorrent" / "models"
    models_dir.mkdir(parents=True)
    (models_dir / "tiny-Q4_K_M.gguf.part").write_bytes(data[:100_000])  # a pull cut off earlier

    done = cli("models", "pull", "hf://me/tiny-GGUF/tiny-Q4_K_M.gguf", "--alias", "tiny", "--json", env=env)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["alias"] == "tiny" and out["fetched"] and out["verified"]
    assert Path(out["path"]).read_bytes() == data and out["model_id"] == hashlib.sha256(data).hexdigest()
    assert files.ranges == ["bytes=100000-"]  # resumed, not started over
    listed = json.loads(cli("models", "list", "--json", env=env).stdout)
    assert any(r["alias"] == "tiny" and r["path"] == out["path"] for r in listed)

    again = cli("models", "pull", "hf://me/tiny-GGUF/tiny-Q4_K_M.gguf", "--json", env=env)
    assert again.returncode == 0 and not json.loads(again.stdout)["fetched"]


def test_a_download_that_does_not_match_the_published_sha256_is_not_kept(hub, tmp_path, cli):
    files, endpoint = hub
    data = write_gguf(tmp_path / "src.gguf", __import__("gguf").LlamaFileType.MOSTLY_Q4_K_M, 1).read_bytes()
    files.files["me/r/x.gguf"] = data
    files.etag["me/r/x.gguf"] = "ab" * 32
    done = cli("models", "pull", "hf://me/r/x.gguf", env=_cli_env(tmp_path, endpoint))
    assert done.returncode == 1 and "checksum mismatch for x.gguf" in done.stderr
    assert not list((tmp_path / "cache" / "gputorrent" / "models").glob("x.gguf*"))
    missing = cli("models", "pull", "hf://me/r/absent.gguf", env=_cli_env(tmp_path, endpoint))
    assert missing.returncode == 1 and "cannot fetch" in missing.stderr and "Traceback" not in missing.stderr


def test_pull_of_an_unknown_name_says_what_works(cli):
    done = cli("models", "pull", "llama3")
    assert done.returncode == 2  # a usage error, before any work
    assert "hf://OWNER/REPO/FILE.gguf" in done.stderr and "models add PATH.gguf --alias NAME" in done.stderr
    malformed = cli("models", "pull", "hf://only-an-owner")
    assert malformed.returncode == 2 and "hf://OWNER/REPO/FILE.gguf" in malformed.stderr
    served = cli("serve", "--model", "llama3")
    assert served.returncode == 2 and "llama3" in served.stderr, served.stderr


@pytest.mark.slow
def test_serve_own_gguf_by_alias_scrape_metrics_and_json_log(model_path, tmp_path, cli):
    """A newcomer's path: name a GGUF of their own, serve it by that name with metrics and a
    JSON log, ask for it by name, then scrape the peer with Prometheus' own parser."""
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    mine = tmp_path / "my-model.gguf"
    os.symlink(model_path, mine)
    added = cli("models", "add", str(mine), "--alias", "mine", "--json", env=env)
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["alias"] == "mine"

    with LocalSwarm(model="mine", env={**os.environ, **env}, workdir=tmp_path / "swarm") as swarm:
        peer = swarm.start("a", "--metrics", "127.0.0.1:0", "--log-format", "json", "--ctx", "512",
                           "--slots", "2")
        assert peer.info["models"][0]["alias"] == "mine"
        done = cli("ask", QUESTION, "--peer", peer.addr, "--model", "mine", "--temperature", "0", "--max-tokens",
                   "8", "--json")
        assert done.returncode == 0, done.stderr
        assert "Paris" in json.loads(done.stdout)["text"]
        refused = cli("ask", QUESTION, "--peer", peer.addr, "--model", "smollm2", "--json")
        assert refused.returncode == 1  # by its own name it is "mine" now

        with urllib.request.urlopen(peer.info["metrics"], timeout=10) as resp:
            text = resp.read().decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(text) for s in fam.samples}

        def value(name: str, **labels: str) -> float:
            return samples.get((name, tuple(sorted(labels.items()))), 0.0)

        assert sum(v for (n, _), v in samples.items() if n == "gputorrent_requests_total") >= 2
        assert value("gputorrent_requests_total", outcome="refused") == 1
        assert value("gputorrent_refused_total", code="unknown_model") == 1
        assert value("gputorrent_generated_tokens_total") >= 1
        assert value("gputorrent_prompt_tokens_total") >= 10
        answered = sum(v for (n, labels), v in samples.items()
                       if n == "gputorrent_requests_total" and dict(labels)["outcome"] in ("stop", "eog", "length"))
        assert answered >= 1  # (a spot check may have added one)
        assert value("gputorrent_time_to_first_token_seconds_count") == answered
        assert value("gputorrent_inter_token_latency_seconds_count") == answered
        assert value("gputorrent_request_duration_seconds_count") == answered
        assert value("gputorrent_slots") == 2 and value("gputorrent_requests_running") == 0
        assert value("gputorrent_announce_seconds_count") >= 1
        assert not any("peer" in k for (_, labels), _ in samples.items() for k, _ in labels)  # no peer-id labels

        status = cli("status", peer.info["metrics"].split("//")[1].removesuffix("/metrics"), "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["served"] == answered and json.loads(status.stdout)["slots"] == 2
    log = peer.stderr().splitlines()
    events = [json.loads(line) for line in log]  # every line on stderr is JSON
    kinds = [e["event"] for e in events]
    assert "ready" in kinds and "done" in kinds and "refused" in kinds and kinds[-1] == "stopped"


def test_status_with_no_serve_says_how_to_start_one(cli):
    done = cli("status", "127.0.0.1:1")
    assert done.returncode == 1 and "serve --model M --metrics 127.0.0.1:1" in done.stderr


def test_the_systemd_unit_verifies_and_keeps_its_key_where_it_says(tmp_path):
    import shutil

    unit = Path(__file__).parent.parent / "docs" / "deploy" / "gputorrent-serve.service"
    text = unit.read_text()
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here, so the unit cannot be verified")
    exe = Path(sys.executable).parent / "gputorrent"
    local = tmp_path / unit.name
    local.write_text(text.replace("/usr/local/bin/gputorrent", str(exe)))
    done = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    broken = tmp_path / "broken" / unit.name
    broken.parent.mkdir()
    broken.write_text(text.replace("/usr/local/bin/gputorrent", str(tmp_path / "missing")))
    assert subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True).returncode != 0
    # The unit points XDG_DATA_HOME at %S (/var/lib): the key is then where its comment says.
    state = tmp_path / "var-lib"
    env = {**os.environ, "XDG_DATA_HOME": str(state), "XDG_CACHE_HOME": str(tmp_path / "var-cache")}
    env.pop("GPUTORRENT_IDENTITY", None)
    ident = subprocess.run([str(exe), "id", "--json"], capture_output=True, text=True, env=env, check=True)
    assert json.loads(ident.stdout)["identity_file"] == str(state / "gputorrent" / "identity.key")
    assert "/var/lib/gputorrent/identity.key" in text and "XDG_DATA_HOME=%S" in text


_HANGING_CLEANUP = """
import sys, trio
from gputorrent.cli.common import run_trio
async def work():
    print("working", flush=True)
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await trio.sleep(60)  # a close that waits on a peer that never answers
try:
    run_trio(work, grace=float(sys.argv[1]))
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
"""


@pytest.mark.parametrize("grace, presses", [(1.0, 1), (60.0, 2)])
def test_ctrl_c_ends_a_command_within_its_grace_even_when_cleanup_hangs(grace, presses):
    """Ctrl-C cancels the work; cleanup gets ``grace`` seconds, a second Ctrl-C none. With a
    plain trio.run this process would sit out its 60 s cleanup."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", _HANGING_CLEANUP, str(grace)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "working"
        started = time.monotonic()
        for _ in range(presses):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.2)
        _, err = proc.communicate(timeout=20)
        took = time.monotonic() - started
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130 and err.strip().endswith("interrupted") and "Traceback" not in err
    assert took < 10, took


def test_a_listen_port_a_live_node_holds_is_a_usage_error(swarm, cli):
    """py-libp2p listens with SO_REUSEPORT, so a second node would bind it too and steal half its
    connections; the check refuses it (while a port left in TIME_WAIT passes)."""
    boot = swarm.bootstrap("port-holder")
    held = boot.addr.split("/p2p/")[0]
    done = cli("bootstrap", "--listen", held, "--identity", str(swarm.workdir / "other.key"))
    assert done.returncode == 2 and "cannot listen on 127.0.0.1" in done.stderr, done.stderr


def test_models_remove_deletes_what_was_pulled_here_unless_a_serve_uses_it(tmp_path, cli):
    from gputorrent.models import CATALOG
    from gputorrent.models.inuse import InUse

    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    models = tmp_path / "cache" / "gputorrent" / "models"
    models.mkdir(parents=True)
    pulled = models / CATALOG["smollm2"].filename
    pulled.write_bytes(b"GGUF as pulled")
    listed = cli("models", "list", "--json", env=env)
    assert [r["alias"] for r in json.loads(listed.stdout)] == ["smollm2"]
    with InUse(pulled):  # a serve process of this machine serving it
        busy = cli("models", "remove", "smollm2", env=env)
    assert busy.returncode == 1 and "in use" in busy.stderr and pulled.exists()
    done = cli("models", "remove", "smollm2", env=env)
    assert done.returncode == 0 and not pulled.exists(), done.stderr
    assert json.loads(cli("models", "list", "--json", env=env).stdout) == []
    mine = tmp_path / "mine.gguf"  # a file of the user's own, named once: only the name goes
    write_gguf(mine, __import__("gguf").LlamaFileType.MOSTLY_Q4_K_M, 2)
    assert cli("models", "add", str(mine), "--alias", "mine", env=env).returncode == 0
    forgot = cli("models", "remove", "mine", env=env)
    assert forgot.returncode == 0 and "forgotten" in forgot.stderr and mine.exists()
    unknown = cli("models", "remove", "nothing", env=env)
    assert unknown.returncode == 2 and "models list" in unknown.stderr
