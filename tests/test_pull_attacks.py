"""Hostile seeders and names (#34): real serve processes told to lie, outnumbering an honest one.

- Sybils announce a piece list of their own (a wrong root, more peers than the honest one),
  then refuse every piece as busy: the pull used to wait forever; it ends from the honest seeder.
- Sybils announce 256 MiB pieces of a 4 GiB file and stall: each fetch stream used to allocate
  the whole piece (1.6 GB resident); the piece list is refused before anything is allocated.
- Sybils serve another file under the catalog alias ``smollm2``: the pull used to save their
  junk and asks could land on them; both now go by the catalog's sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gputorrent.models import CATALOG

from .conftest import QUESTION

PEER = ("--slots", "2", "--ctx", "512", "--threads", "1", "--announce-interval", "5")
DEMO = CATALOG["smollm2"]
BOUND_S = 120  # what each pull below must finish within (fetch.STALL_S is 60 s; it needs far less)


def _fresh(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "XDG_DATA_HOME": str(tmp_path / "data"),
            "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_CACHE_DIR": "1", "PIP_FIND_LINKS": "",
            "HF_ENDPOINT": "http://127.0.0.1:9"}


# The pull runs under a wrapper whose only child it is: the wrapper's RUSAGE_CHILDREN is its peak.
_PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
         "print(f'peak_kb={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}', file=sys.stderr); "
         "sys.exit(r.returncode)")


def _pull(boot_addr: str, tmp_path: Path) -> tuple[int, dict, str, int]:
    """(exit code, its JSON, stderr, peak resident KB) of a pull in a process of its own."""
    proc = subprocess.Popen([sys.executable, "-c", _PEAK, sys.executable, "-m", "gputorrent.cli", "models", "pull",
                             "swarm:smollm2", "--bootstrap", boot_addr, "--json", "--identity", str(tmp_path / "k")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_fresh(tmp_path),
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=BOUND_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    peak = int(err.rsplit("peak_kb=", 1)[1].split()[0])
    return proc.returncode, json.loads(out) if out.strip() else {}, err, peak


@pytest.fixture(scope="module")
def junk(tmp_path_factory, model_path) -> Path:
    """Another GGUF file: the demo model with 1 MiB appended (it loads the same; another sha256)."""
    path = tmp_path_factory.mktemp("junk") / "junk.gguf"
    path.write_bytes(model_path.read_bytes() + b"\0" * (1 << 20))
    return path


def _start(swarm, prefix: str, kinds: dict[str, tuple[str, ...]]):
    boot = swarm.bootstrap(f"{prefix}-boot")
    peers = {k: swarm.spawn(f"{prefix}-{k}", "--bootstrap", boot.addr, *PEER, *extra) for k, extra in kinds.items()}
    for p in peers.values():
        p.wait_ready(180)
    return boot, peers


@pytest.fixture(scope="module")
def hostile(swarm, junk, model_path):
    """One honest seeder, two of each kind of lying seeder, and a name no catalog knows
    (``house``) claimed by two files."""
    kinds: dict[str, tuple[str, ...]] = {"honest": ()}
    for i in range(2):
        kinds[f"busy{i}"] = ("--fault", "wrong-root-busy")
        kinds[f"giant{i}"] = ("--fault", "giant-pieces")
    kinds["house-real"] = ("--model", str(model_path), "--alias", "house")
    kinds["house-junk"] = ("--model", str(junk), "--alias", "house")
    boot, peers = _start(swarm, "attack", kinds)
    return boot, peers, junk


@pytest.fixture(scope="module")
def hijacked(swarm, junk):
    """One honest peer, and three that announce the junk file under the catalog alias ``smollm2``."""
    kinds: dict[str, tuple[str, ...]] = {"honest": ()}
    for i in range(3):
        kinds[f"alias{i}"] = ("--model", str(junk), "--alias", f"junk{i}", "--fault", "hijack-alias")
    return _start(swarm, "hijack", kinds)


def test_wrong_roots_busy_and_giant_pieces_end_in_the_honest_file_with_memory_bounded(hostile, tmp_path):
    boot, peers, _ = hostile
    code, got, err, peak_kb = _pull(boot.addr, tmp_path)
    assert code == 0, err
    path = Path(got["path"])
    assert hashlib.sha256(path.read_bytes()).hexdigest() == DEMO.sha256
    honest = {peers["honest"].peer_id, peers["house-real"].peer_id}  # both seed the real file
    assert got["pieces_from"] and set(got["pieces_from"]) <= honest, got
    told = {**got["dropped"], **got["caught"]}
    for name in ("busy0", "busy1", "giant0", "giant1"):
        assert peers[name].peer_id in told, (name, got)  # each named, with why
    # A fetch holds at most streams x piece size (1 MiB pieces here, 2 streams per seeder); the
    # giant pieces were refused before a byte of them was allocated. 2x a 300 MB process budget.
    assert peak_kb < 600_000, f"peak resident {peak_kb} KB"


def test_a_catalog_alias_resolves_to_the_catalog_s_model_in_pull_and_ask(hijacked, junk, cli, tmp_path, model_path):
    boot, peers = hijacked
    junk_id = hashlib.sha256(junk.read_bytes()).hexdigest()
    code, got, err, _ = _pull(boot.addr, tmp_path)
    assert code == 0, err
    assert got["model_id"] == DEMO.sha256 and got["model_id"] != junk_id
    assert Path(got["path"]).read_bytes() == model_path.read_bytes()
    alias_sybils = {peers[f"alias{i}"].peer_id for i in range(3)}
    assert set(got["pieces_from"]) == {peers["honest"].peer_id}
    for _ in range(4):  # the sybils outnumber the honest peer 3 to 1; none of the answers is theirs
        asked = cli("ask", QUESTION, "--model", "smollm2", "--bootstrap", boot.addr, "--max-tokens", "4",
                    "--temperature", "0", "--json", "--spot-check", "0")
        assert asked.returncode == 0, asked.stderr
        answer = json.loads(asked.stdout)
        assert answer["model_id"] == DEMO.sha256 and answer["peer_id"] not in alias_sybils, answer


def test_a_name_two_models_claim_is_not_picked_by_counting(hostile, cli):
    boot, peers, junk = hostile
    junk_id = hashlib.sha256(junk.read_bytes()).hexdigest()
    asked = cli("ask", QUESTION, "--model", "house", "--bootstrap", boot.addr, "--max-tokens", "2",
                "--temperature", "0", "--spot-check", "0")
    assert asked.returncode == 1 and not asked.stdout.strip(), asked.stdout
    assert "2 different models under the name 'house'" in asked.stderr, asked.stderr
    assert junk_id[:16] in asked.stderr and DEMO.sha256[:16] in asked.stderr and "--model " in asked.stderr
    # By id it is a fact: the junk file's peers, and only they, answer to it.
    asked = cli("ask", QUESTION, "--model", junk_id, "--bootstrap", boot.addr, "--max-tokens", "2",
                "--temperature", "0", "--json", "--spot-check", "0")
    assert asked.returncode == 0, asked.stderr
    answer = json.loads(asked.stdout)
    assert answer["model_id"] == junk_id
    assert answer["peer_id"] == peers["house-junk"].peer_id


def test_piece_lists_that_would_make_a_fetcher_allocate_or_reserve_too_much_are_refused(tmp_path):
    import msgspec
    import trio

    from gputorrent.asking.fetch import FetchError, fetch_file
    from gputorrent.models import pieces

    giant = pieces.Manifest(16 << 28, 1 << 28, bytes(32) * 16)  # 256 MiB pieces of a 4 GiB file
    assert not giant.well_formed()  # its size calls for 1 MiB pieces
    assert pieces.Manifest(98_362_432, 1 << 20, bytes(32) * 94).well_formed()
    for size, piece in ((16 << 28, 1 << 28), (128 << 40, 1 << 34)):  # giant pieces; a 128 TiB file
        with pytest.raises(msgspec.ValidationError):
            pieces.reply_decoder.decode(pieces.encoder.encode(pieces.ManifestReply(size, piece, b"")))
    # A file the disk cannot hold is refused in words, before Errno 27 (File too large) can say it.
    huge = pieces.Manifest(pieces.MAX_FILE, pieces.MAX_PIECE, bytes(32) * pieces.MAX_PIECES)
    with pytest.raises(FetchError, match="GB free"):
        trio.run(fetch_file, None, [], "0" * 64, huge, tmp_path / "x.part")
