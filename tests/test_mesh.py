"""serve and ask as real processes over libp2p on loopback, with the real demo model."""

import json
import os
import signal

import msgspec
import pytest
import trio

from gputorrent import protocol, wire
from gputorrent.asking.asker import new_request_id
from gputorrent.asking.client import RemoteError, run_attempt
from gputorrent.identity import Identity
from gputorrent.net.host import connect, running_host

from .conftest import BOTH_WAYS, QUESTION


@pytest.fixture(scope="module")
def peers(swarm):
    names = {"good": (), "corrupt": ("--fault", "corrupt-signature"), "dies": ("--fault", "die-after-tokens=5")}
    for name, extra in names.items():
        swarm.spawn(name, *extra)
    for name in names:
        swarm.peers[name].wait_ready(120)
    return swarm.peers


def _ask_json(cli, *args, input=None):
    done = cli("ask", *args, "--json", input=input)
    return done, (json.loads(done.stdout) if done.stdout.strip().startswith("{") else None)


@BOTH_WAYS
def test_ask_answers_paris_with_a_verified_receipt(peers, cli):
    done, out = _ask_json(cli, QUESTION, "--peer", peers["good"].addr, "--temperature", "0")
    assert done.returncode == 0, done.stderr
    assert "Paris" in out["text"] and out["receipt_verified"] is True
    assert out["peer_id"] == peers["good"].peer_id
    assert out["model_id"] == peers["good"].info["models"][0]["model_id"]
    assert out["usage"]["prompt_tokens"] > 0 and out["usage"]["completion_tokens"] > 0
    assert out["ttft_ms"] > 0 and out["tokens_per_s"] > 0
    assert out["attempts"] == [{"peer_id": peers["good"].peer_id, "outcome": "ok",
                                "tokens": out["attempts"][0]["tokens"], "error": "", "path": "direct"}]


@BOTH_WAYS
def test_ask_streams_plain_text_and_reads_stdin(peers, cli):
    done = cli("ask", "-", "--peer", peers["good"].addr, "--temperature", "0", input=QUESTION)
    assert done.returncode == 0 and "Paris" in done.stdout


@BOTH_WAYS
def test_a_peer_that_corrupts_signatures_is_refused(peers, cli):
    done, out = _ask_json(cli, QUESTION, "--peer", peers["corrupt"].addr, "--temperature", "0")
    assert done.returncode == 1
    assert "bad signature" in done.stderr
    assert out["attempts"][0]["outcome"] == "integrity" and out["text"] == ""


@BOTH_WAYS
def test_refused_peer_fails_over_to_an_honest_one(peers, cli):
    done, out = _ask_json(cli, QUESTION, "--peer", peers["corrupt"].addr, "--peer", peers["good"].addr,
                          "--temperature", "0")
    assert done.returncode == 0, done.stderr
    assert [a["outcome"] for a in out["attempts"]] == ["integrity", "ok"]
    assert "Paris" in out["text"] and out["peer_id"] == peers["good"].peer_id


def test_peer_dying_mid_answer_resumes_token_identical(peers, cli):
    q = "List the first ten prime numbers."
    _, healthy = _ask_json(cli, q, "--peer", peers["good"].addr, "--temperature", "0", "--max-tokens", "40")
    done, out = _ask_json(cli, q, "--peer", peers["dies"].addr, "--peer", peers["good"].addr,
                          "--temperature", "0", "--max-tokens", "40")
    assert done.returncode == 0, done.stderr
    assert [a["outcome"] for a in out["attempts"]] == ["dropped", "ok"]
    assert out["attempts"][0]["tokens"] >= 5  # frames may carry several tokens
    assert out["text"] == healthy["text"]
    assert out["usage"]["completion_tokens"] == healthy["usage"]["completion_tokens"]
    assert peers["dies"].proc.wait(10) == 17  # it really died


@BOTH_WAYS
def test_unknown_model_says_what_the_peer_serves(peers, cli):
    done = cli("ask", QUESTION, "--peer", peers["good"].addr, "--model", "llama-70b")
    assert done.returncode == 1
    assert "unknown_model" in done.stderr and "serves smollm2" in done.stderr


def test_prompt_longer_than_the_context_is_a_clear_error(peers, cli):
    done = cli("ask", "-", "--peer", peers["good"].addr, input="word " * 3000)
    assert done.returncode == 1
    assert "context_exceeded" in done.stderr and "shorten the prompt" in done.stderr


@BOTH_WAYS
@pytest.mark.parametrize("flags, fragment", [
    (("--max-tokens", "-1"), "--max-tokens"), (("--temperature", "9"), "--temperature"),
    (("--top-p", "0"), "--top-p"),
])
def test_absurd_parameters_exit_2_before_any_network(flags, fragment, cli):
    done = cli("ask", QUESTION, "--peer", f"/ip4/127.0.0.1/tcp/9/p2p/{Identity.generate().peer_id}", *flags)
    assert done.returncode == 2
    assert fragment in done.stderr and done.stderr.count("\n") == 1


@BOTH_WAYS
def test_unreachable_and_malformed_peer_addresses(cli):
    dead = Identity.generate().peer_id
    done = cli("ask", QUESTION, "--peer", f"/ip4/127.0.0.1/tcp/1/p2p/{dead}")
    assert done.returncode == 1 and "cannot reach peer" in done.stderr
    done = cli("ask", QUESTION, "--peer", "localhost:8080")  # a usage error: exit 2, one line
    assert done.returncode == 2 and "not a multiaddr" in done.stderr and done.stderr.count("\n") == 1


async def _raw(host, peer_id, data: bytes) -> wire.Reply | None:
    """Send raw bytes on a fresh infer stream; return the first reply, its signature verified.
    (A refusal of a frame that never decoded is signed over an empty request id.)"""
    from libp2p.peer.id import ID

    stream = await host.new_stream(ID.from_base58(peer_id), [protocol.INFER])
    await stream.write(data)
    with trio.fail_after(10):
        payload = await wire.FrameReader(stream).read_frame()
    await stream.reset()
    verifier = wire.ReplyVerifier(peer_id, protocol.INFER, b"", b"")
    return None if payload is None else verifier.open(payload)


async def test_malformed_and_oversized_frames_leave_the_server_serving(peers):
    good = peers["good"]
    async with running_host(Identity.generate()) as host:
        peer_id = await connect(host, good.addr)
        garbage = await _raw(host, peer_id, wire.frame(b"\xc1\xff not msgpack"))
        assert isinstance(garbage, wire.Error) and garbage.code == protocol.BAD_REQUEST
        oversized = await _raw(host, peer_id, (wire.MAX_FRAME + 1).to_bytes(4, "big") + b"x" * 100)
        assert isinstance(oversized, wire.Error) and "cap" in oversized.message
        # A request as another client might build it, with temperature out of range.
        bad_params = msgspec.msgpack.encode(["req", b"x" * 16, "", None, "hi", {"temperature": 9.0}, [], 1000])
        refused = await _raw(host, peer_id, wire.frame(bad_params))
        assert isinstance(refused, wire.Error) and "temperature" in refused.message

        # ...and the same process still answers, with a verified receipt.
        req = wire.InferRequest(request_id=new_request_id(), messages=[wire.ChatMessage("user", QUESTION)],
                                params=wire.Params(temperature=0.0, max_tokens=16))
        res = await run_attempt(host, peer_id, req, lambda ids, text: None)
        assert "Paris" in res.text and res.done.finish_reason == "stop"
        with pytest.raises(RemoteError, match="unknown_model"):
            await run_attempt(host, peer_id, wire.InferRequest(request_id=new_request_id(), prompt="x", model="nope"),
                              lambda ids, text: None)
    assert good.proc.poll() is None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_cleanly_on_signals(swarm, sig):
    peer = swarm.start(f"stopper-{sig.name}")
    assert peer.ready_file.exists()
    assert peer.stop(sig, timeout=15) == 0
    assert not peer.ready_file.exists()


def test_ctrl_c_stops_ask_cleanly_and_frees_the_peer(peers, tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")}
    ask = subprocess.Popen([sys.executable, "-m", "gputorrent.cli", "ask", "Write a very long story about the sea.",
                            "--peer", peers["good"].addr, "--max-tokens", "2000", "--identity", str(tmp_path / "k")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert ask.stdout.read(20)  # text is streaming
        ask.send_signal(signal.SIGINT)
        _, err = ask.communicate(timeout=20)
    finally:
        ask.kill()
    assert ask.returncode == 130 and err.strip().endswith("interrupted") and "Traceback" not in err
