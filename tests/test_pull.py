"""Models fetched from the swarm (``models pull swarm:MODEL``): real serve processes seed the
demo model's file; one sends corrupt pieces, one a wrong piece list, one does not seed. A
fresh machine (empty model cache, no package index: only loopback) pulls from them and serves."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import trio

from gputorrent import protocol, wire
from gputorrent.identity import Identity
from gputorrent.models import CATALOG, pieces
from gputorrent.net.host import connect, finish_stream, running_host

from .conftest import BOTH_WAYS, QUESTION

PEER = ("--slots", "2", "--ctx", "512", "--threads", "1", "--announce-interval", "5")
DEMO = CATALOG["smollm2"]


@pytest.fixture(scope="module")
def seeders(swarm):
    boot = swarm.bootstrap("pull-boot")
    kinds = {"seed0": ("--seed-streams", "1"), "seed1": (), "seed2": (), "corrupt": ("--fault", "corrupt-pieces"),
             "liar": ("--fault", "wrong-manifest"), "quiet": ("--no-seed",)}
    peers = {k: swarm.spawn(f"pull-{k}", "--bootstrap", boot.addr, *PEER, *extra) for k, extra in kinds.items()}
    for p in peers.values():
        p.wait_ready(180)
    return boot, peers


def _fresh(tmp_path: Path) -> dict[str, str]:
    """A machine with nothing cached, whose package index is unreachable."""
    return {"XDG_CACHE_HOME": str(tmp_path / "cache"), "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
            "PIP_NO_CACHE_DIR": "1", "PIP_FIND_LINKS": "", "HF_ENDPOINT": "http://127.0.0.1:9"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@BOTH_WAYS
def test_a_fresh_machine_pulls_the_model_from_several_peers_and_serves_it(seeders, swarm, cli, tmp_path, model_path):
    boot, peers = seeders
    env = _fresh(tmp_path)
    done = cli("models", "pull", "swarm:smollm2", "--bootstrap", boot.addr, "--json", env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    path = Path(got["path"])
    assert path == tmp_path / "cache" / "gputorrent" / "models" / DEMO.filename
    assert _sha256(path) == DEMO.sha256 and path.read_bytes() == model_path.read_bytes()
    honest = {peers[k].peer_id for k in ("seed0", "seed1", "seed2")}
    assert set(got["pieces_from"]) <= honest | {peers["liar"].peer_id} and len(got["pieces_from"]) >= 3
    assert set(got["caught"]) == {peers["corrupt"].peer_id, peers["liar"].peer_id}, got
    assert "sha256" in got["caught"][peers["corrupt"].peer_id]
    assert peers["quiet"].peer_id not in got["pieces_from"]
    assert peers["seed0"].peer_id in got["pieces_from"]  # one stream at a time there, but not dropped
    assert set(got["direct"]) == set(got["pieces_from"])  # plain TCP with a ticket, on loopback
    assert not list(path.parent.glob("*.part"))
    # The machine now serves what it pulled, with no hub in reach.
    me = swarm.start("pull-fresh", "--bootstrap", boot.addr, *PEER, env=env)
    try:
        asked = cli("ask", QUESTION, "--peer", me.addr, "--max-tokens", "8", "--temperature", "0", "--json")
        assert asked.returncode == 0 and "Paris" in json.loads(asked.stdout)["text"], \
            asked.stderr + me.log.read_text()[-3000:]
        again = cli("models", "pull", "swarm:smollm2", "--bootstrap", boot.addr, "--json", env=env)
        assert json.loads(again.stdout)["fetched"] is False
    finally:
        me.stop()  # a seeder the module's other tests do not expect


def test_a_cut_off_pull_resumes_from_its_verified_pieces(seeders, cli, tmp_path, model_path):
    boot, _ = seeders
    env = _fresh(tmp_path)
    models = tmp_path / "cache" / "gputorrent" / "models"
    models.mkdir(parents=True)
    data = model_path.read_bytes()
    half = len(data) // 2
    part = bytearray(data[:half]) + bytes(len(data) - half)
    part[10] ^= 0xFF  # a piece spoiled on disk is fetched again, not trusted
    (models / (DEMO.filename + ".part")).write_bytes(part)
    done = cli("models", "pull", "swarm:smollm2", "--bootstrap", boot.addr, "--json", env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    size = pieces.piece_size_for(len(data))
    assert got["resumed_pieces"] == half // size - 1  # every whole piece of the first half but the spoiled one
    assert sum(got["pieces_from"].values()) == -(-len(data) // size) - got["resumed_pieces"]
    assert _sha256(Path(got["path"])) == DEMO.sha256


@BOTH_WAYS
def test_no_seed_and_unknown_models_say_so(seeders, cli, tmp_path):
    boot, _ = seeders
    env = _fresh(tmp_path)
    done = cli("models", "pull", "swarm:no-such-model", "--bootstrap", boot.addr, env=env)
    assert done.returncode == 1 and "no peer in the swarm serves 'no-such-model'" in done.stderr
    assert cli("models", "pull", "swarm:", env=env).returncode == 2


async def test_a_seeder_refuses_bad_requests_and_keeps_seeding(seeders):
    _, peers = seeders
    seeder, quiet = peers["seed0"], peers["quiet"]
    async with running_host(Identity.generate()) as host:
        pid = await connect(host, seeder.addr)
        from libp2p.peer.id import ID

        async def ask(payload: bytes) -> object:
            stream = await host.new_stream(ID.from_base58(pid), [protocol.PIECES])
            try:
                await stream.write(wire.frame(payload))
                return pieces.reply_decoder.decode(await wire.FrameReader(stream).read_frame())
            finally:
                await finish_stream(stream)

        used = False
        with trio.fail_after(30):
            for bad in (b"\x93garbage", pieces.encoder.encode(pieces.PieceAsk("ab" * 32, 0)),
                        pieces.encoder.encode(pieces.PieceAsk(DEMO.sha256, 8000))):
                reply = await ask(bad)
                assert isinstance(reply, pieces.PieceRefused), reply
            manifest = await ask(pieces.encoder.encode(pieces.PieceAsk(DEMO.sha256, -1)))
            assert isinstance(manifest, pieces.ManifestReply) and len(manifest.hashes) == 94 * 32
            # The direct path: a ticket opens one connection; a made-up or used token gets nothing.
            ticket = await ask(pieces.encoder.encode(pieces.TicketAsk(DEMO.sha256)))
            assert isinstance(ticket, pieces.Ticket) and ticket.port and len(ticket.token) == pieces.TOKEN
            for token in (os.urandom(pieces.TOKEN), ticket.token, ticket.token):
                conn = await trio.open_tcp_stream("127.0.0.1", ticket.port)
                async with conn:
                    await conn.send_all(token + pieces.INDEX.pack(0))
                    got = bytearray()
                    try:
                        while len(got) < pieces.LENGTH.size + (1 << 20) and (chunk := await conn.receive_some(1 << 20)):
                            got += chunk
                    except trio.BrokenResourceError:  # closed with our bytes unread: a reset
                        pass
                if token is ticket.token and not used:
                    m = pieces.Manifest(manifest.size, manifest.piece_size, manifest.hashes)
                    assert m.check(0, bytes(got[pieces.LENGTH.size:]))
                    used = True
                else:
                    assert got == b""
            qid = await connect(host, quiet.addr)
            with pytest.raises(Exception):  # --no-seed: the protocol is not even offered
                await host.new_stream(ID.from_base58(qid), [protocol.PIECES])


def test_piece_lists_and_roots():
    data = os.urandom(3 * pieces.MIN_PIECE + 5)
    hashes = b"".join(hashlib.sha256(data[i:i + pieces.MIN_PIECE]).digest()
                      for i in range(0, len(data), pieces.MIN_PIECE))
    m = pieces.Manifest(len(data), pieces.MIN_PIECE, hashes)
    assert m.count == 4 and m.well_formed() and m.span(3) == (3 * pieces.MIN_PIECE, 5)
    assert m.check(3, data[-5:]) and not m.check(3, data[-5:-1] + b"x") and not m.check(4, b"")
    swapped = pieces.Manifest(m.size, m.piece_size, hashes[32:64] + hashes[:32] + hashes[64:])
    assert swapped.root != m.root  # the order of pieces is part of the root
    assert not pieces.Manifest(m.size, m.piece_size, hashes[:-32]).well_formed()
    assert pieces.piece_size_for(98_362_432) == 1 << 20 and pieces.piece_size_for(70 << 30) == 16 << 20


def test_a_private_swarm_pulls_inside_its_key_over_libp2p_streams(swarm, cli, tmp_path):
    """A private swarm's pieces never leave Noise (no direct path), and nobody without its key
    gets them."""
    from gputorrent.swarmkey import write_new

    key = str(write_new(tmp_path / "swarm.key"))
    boot = swarm.start("priv-boot", "--swarm-key", key, command="bootstrap")
    seeds = [swarm.spawn(f"priv-seed{i}", "--bootstrap", boot.addr, "--swarm-key", key, *PEER) for i in range(2)]
    try:
        for s in seeds:
            s.wait_ready(180)
        env = _fresh(tmp_path)
        outsider = cli("models", "pull", "swarm:smollm2", "--bootstrap", boot.addr, "--json", env=env, timeout=120)
        assert outsider.returncode != 0
        done = cli("models", "pull", "swarm:smollm2", "--bootstrap", boot.addr, "--swarm-key", key, "--json",
                   env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        got = json.loads(done.stdout)
        assert got["direct"] == [] and set(got["pieces_from"]) == {s.peer_id for s in seeds}
        assert _sha256(Path(got["path"])) == DEMO.sha256
    finally:
        for s in (*seeds, boot):
            s.stop()
