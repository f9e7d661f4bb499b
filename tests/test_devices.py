"""Devices, memory and quantization choice, speed learned from traffic, and the serve log.

No GPU is lent to these tests, so a GPU host is a real serve process whose ``nvidia-smi`` is a
script that prints what the real one prints (NVML finds no driver here and is skipped).
"""

import json
import os
import stat

import msgspec
import numpy as np
import pytest
import trio
from gguf import GGUFWriter, LlamaFileType

from gputorrent import wire
from gputorrent.asking.asker import new_request_id
from gputorrent.asking.client import ping, run_attempt
from gputorrent.dht.records import Device
from gputorrent.identity import Identity
from gputorrent.models import ModelError, read_info
from gputorrent.models.quant import choose_quantization, estimate_memory, tier
from gputorrent.net.host import connect, running_host
from gputorrent.serving.device import computing_device, detect_device, parse_smi

from .conftest import QUESTION

SMI_LINE = "NVIDIA H100 80GB HBM3, 81559, 80000, 9.0"


def write_gguf(path, quant: LlamaFileType, size_mb: int, *, blocks: int = 30, vocab: int = 49152):
    """A GGUF shaped like the demo model (same architecture and sizes), of a chosen weight size."""
    w = GGUFWriter(str(path), "llama")
    w.add_name("demo-shaped")
    w.add_block_count(blocks)
    w.add_context_length(8192)
    w.add_embedding_length(576)
    w.add_head_count(9)
    w.add_head_count_kv(3)
    w.add_file_type(quant)
    w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_tensor("weights", np.zeros(size_mb << 20, dtype=np.int8))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def fake_smi(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    smi = bindir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho '{SMI_LINE}'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    return {"PATH": f"{bindir}:{os.environ['PATH']}"}


def test_nvidia_smi_output_is_read_and_the_offer_capped(fake_smi, monkeypatch):
    assert parse_smi(SMI_LINE + "\n")[0].total_mb == 81559
    assert parse_smi("garbage") is None
    monkeypatch.setenv("PATH", fake_smi["PATH"])
    dev = detect_device(max_vram_mb=3000)
    assert (dev.kind, dev.name, dev.compute) == ("gpu", "NVIDIA H100 80GB HBM3", "9.0")
    assert dev.vram_total_mb == 3000 and dev.vram_free_mb == 3000
    assert detect_device().vram_free_mb == 80000


def test_memory_estimate_counts_weights_kv_cache_per_slot_and_buffers(model_path):
    info = read_info(model_path, identify=False)
    one, four = estimate_memory(info, 2048, 1), estimate_memory(info, 2048, 4)
    # 30 blocks x 3 KV heads x 64 dims x K and V x 2 bytes = 23,040 bytes per cell
    assert four.kv_cache_mb == -(-23040 * 2048 * 4 // (1 << 20)) == 180
    assert four.kv_cache_mb > 3 * one.kv_cache_mb and four.weights_mb == one.weights_mb == 94
    assert four.total_mb == four.weights_mb + four.kv_cache_mb + four.buffers_mb


def test_the_best_quantization_that_fits_is_chosen(tmp_path):
    files = {q: write_gguf(tmp_path / f"m-{q.name}.gguf", q, mb) for q, mb in
             ((LlamaFileType.MOSTLY_Q8_0, 60), (LlamaFileType.MOSTLY_Q4_K_M, 30), (LlamaFileType.MOSTLY_Q2_K, 12))}
    infos = [read_info(p, identify=False) for p in files.values()]
    need = {i.quantization: estimate_memory(i, 512, 1).total_mb for i in infos}
    assert tier("Q8_0") < tier("Q4_K_M") < tier("IQ4_XS") < tier("Q2_K") < tier("whatever")
    assert choose_quantization(infos, 10_000, 512, 1).chosen.quantization == "Q8_0"
    assert choose_quantization(infos, need["Q8_0"] - 1, 512, 1).chosen.quantization == "Q4_K_M"
    assert choose_quantization(infos, need["Q4_K_M"] - 1, 512, 1).chosen.quantization == "Q2_K"
    with pytest.raises(ModelError, match=f"needs {need['Q2_K']} MB"):
        choose_quantization(infos, need["Q2_K"] - 1, 512, 1)
    other = read_info(write_gguf(tmp_path / "other.gguf", LlamaFileType.MOSTLY_Q6_K, 1, blocks=12), identify=False)
    with pytest.raises(ModelError, match="mixes different models"):
        choose_quantization(infos + [other], 10_000, 512, 1)


def test_models_info_shows_the_choice_for_a_directory(cli, tmp_path):
    write_gguf(tmp_path / "m-Q6_K.gguf", LlamaFileType.MOSTLY_Q6_K, 40)
    write_gguf(tmp_path / "m-IQ4_XS.gguf", LlamaFileType.MOSTLY_IQ4_XS, 20)
    small = cli("models", "info", str(tmp_path), "--ctx", "512", "--slots", "1", "--max-vram-mb", "160", "--json")
    assert small.returncode == 0, small.stderr
    out = json.loads(small.stdout)
    assert out["quantization"] == "IQ4_XS" and out["memory"]["offered_mb"] == 160
    assert {c["quantization"]: c["fits"] for c in out["candidates"]} == {"Q6_K": False, "IQ4_XS": True}
    roomy = cli("models", "info", str(tmp_path), "--ctx", "512", "--slots", "1")
    assert roomy.returncode == 0 and "* Q6_K" in roomy.stdout and "memory" in roomy.stdout
    none = cli("models", "info", str(tmp_path), "--max-vram-mb", "50")
    assert none.returncode == 1 and "no quantization fits the 50 MB offered" in none.stderr


@pytest.fixture(scope="module")
def peers(swarm, model_path, tmp_path_factory):
    """'gpu': a host whose nvidia-smi reports an H100, offering 3000 MB, logging JSON.
    'shelf': serves a directory holding the demo model and a bigger 'Q8_0' that does not fit."""
    d = tmp_path_factory.mktemp("gpu")
    bindir = d / "bin"
    bindir.mkdir()
    (bindir / "nvidia-smi").write_text(f"#!/bin/sh\necho '{SMI_LINE}'\n")
    (bindir / "nvidia-smi").chmod(0o755)
    shelf = d / "shelf"
    shelf.mkdir()
    (shelf / model_path.name).symlink_to(model_path)
    write_gguf(shelf / "demo-Q8_0.gguf", LlamaFileType.MOSTLY_Q8_0, 150)
    swarm.spawn("gpu", "--ctx", "1024", "--slots", "2", "--max-vram-mb", "3000", "--log-format", "json",
                env={"PATH": f"{bindir}:{os.environ['PATH']}"})
    swarm.spawn("shelf", "--ctx", "512", "--slots", "1", "--max-vram-mb", "250", "--model", str(shelf))
    for name in ("gpu", "shelf"):
        swarm.peers[name].wait_ready(120)
    return swarm.peers


def test_a_gpu_host_with_a_cpu_build_says_so_before_loading_and_announces_its_cpu(peers):
    """This machine's llama-cpp-python is a CPU build: a host with a GPU says so, with the command
    that fixes it, before it loads the model, and its advert is a CPU's (requesters rank by it)."""
    gpu = peers["gpu"]
    dev = gpu.info["device"]
    assert (dev["kind"], dev["vram_total_mb"], dev["vram_free_mb"], dev["gpu_layers"]) == ("cpu", 0, 0, 0)
    assert dev["cores"] == os.cpu_count() and dev["name"] != "NVIDIA H100 80GB HBM3"
    err = gpu.stderr()
    assert "computes on the CPU only" in err and "make install GPU=cuda" in err
    assert err.index("computes on the CPU only") < err.index('"event":"ready"'), err[:3000]


def test_the_advert_offers_a_gpu_only_when_layers_run_on_it():
    card = Device(kind="gpu", name="NVIDIA H100 80GB HBM3", cores=16, ram_mb=128000, vram_total_mb=3000,
                  vram_free_mb=3000, compute="9.0")
    assert computing_device(card, 31) == msgspec.structs.replace(card, gpu_layers=31)
    on_cpu = computing_device(card, 0)
    assert (on_cpu.kind, on_cpu.vram_total_mb, on_cpu.vram_free_mb, on_cpu.ram_mb) == ("cpu", 0, 0, 128000)


def test_id_json_says_what_this_build_can_offload(cli):
    done = cli("id", "--json")
    assert done.returncode == 0, done.stderr
    build = json.loads(done.stdout)["build"]
    assert build["gpu_offload"] is False and "CPU" in build["system_info"]


async def test_tokens_per_s_follows_real_answers_and_each_answer_is_logged(peers):
    gpu = peers["gpu"]
    async with running_host(Identity.generate()) as host:
        pid = await connect(host, gpu.addr)
        _, before = await ping(host, pid)
        req = wire.InferRequest(request_id=new_request_id(), prompt="Count upwards: 1, 2, 3,",
                                params=wire.Params(max_tokens=40, temperature=0.0))
        await run_attempt(host, pid, req, lambda i, t: None)
        with trio.fail_after(5):
            while not any(e["event"] == "done" for e in _events(gpu)):
                await trio.sleep(0.05)  # the log line is written just after the receipt is sent
        _, after = await ping(host, pid)
    ready, accepted, done = (next(e for e in _events(gpu) if e["event"] == k) for k in ("ready", "accepted", "done"))
    assert before.tokens_per_s == ready["tokens_per_s"]
    assert accepted["request_id"] == done["request_id"] == req.request_id.hex()
    assert done["completion_tokens"] == 40 and done["finish_reason"] == "length"
    assert after.tokens_per_s == pytest.approx(0.7 * before.tokens_per_s + 0.3 * done["tokens_per_s"], abs=0.2)
    assert after.tokens_per_s != before.tokens_per_s
    assert after.free_memory_mb == 3000  # the cap, not the card's 80,000 MB


def _events(peer) -> list[dict]:
    return [json.loads(line) for line in peer.stderr().splitlines() if line.startswith("{")]


async def test_a_directory_serves_the_best_quantization_that_fits(peers):
    shelf = peers["shelf"]
    (served,) = shelf.info["models"]
    assert served["quantization"] == "Q4_1"  # the 'Q8_0' needs more than the 250 MB offered
    assert "* Q4_1" in shelf.stderr() and "Q8_0" in shelf.stderr()
    async with running_host(Identity.generate()) as host:
        pid = await connect(host, shelf.addr)
        req = wire.InferRequest(request_id=new_request_id(), messages=[wire.ChatMessage("user", QUESTION)],
                                params=wire.Params(max_tokens=16, temperature=0.0))
        assert "Paris" in (await run_attempt(host, pid, req, lambda i, t: None)).text
