"""Layer shards: a GGUF holding blocks [first, end) of a model, cut once and cached.

A shard is made with llama.cpp's own quantizer in copy mode (``only_copy``, ``prune_layers``):
tensors are copied unchanged, the kept blocks renumbered from 0 and ``block_count`` rewritten,
so a shard computes its blocks bit for bit as the whole file does. Every shard keeps the token
embedding, the vocabulary and the final norm and head (small next to the blocks).

A shard that is not the last keeps one extra block, ``end``: llama.cpp records the residual
entering a block only for blocks inside the file, and that residual is what the next shard takes.
With no logits requested the extra block costs little (its feed-forward runs for no rows).

Beside each shard lies what the whole file was (its ``ModelInfo``, model id included), so a shard
peer serves again from the shard alone once the whole file is gone: ``serve --blocks`` removes a
whole file it fetched itself as soon as its shard is cut (``--keep-model`` keeps it).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from pathlib import Path

from .catalog import ModelError
from .gguf_info import ModelInfo


def parse_blocks(text: str, total: int) -> tuple[int, int]:
    """``A:B`` as the range [A, B) of a ``total``-block model (``A:`` and ``:B`` work too)."""
    first, sep, end = text.partition(":")
    try:
        if not sep:
            raise ValueError
        a = int(first) if first.strip() else 0
        b = int(end) if end.strip() else total
    except ValueError:
        raise ModelError(f"--blocks takes A:B (blocks A to B-1 of the model), e.g. 0:{total // 2}; "
                         f"got {text!r}") from None
    if not 0 <= a < b <= total:
        raise ModelError(f"--blocks {text}: this model has blocks 0 to {total - 1}; give 0 <= A < B <= {total}")
    return a, b


def thinnest_range(coverage: Sequence[int], width: int) -> tuple[int, int]:
    """The ``width`` consecutive blocks the fewest peers hold (ties: the earliest), as Petals
    places a new server: where the swarm is thinnest is where another peer helps most."""
    total = len(coverage)
    width = max(1, min(width, total))
    best = min(range(total - width + 1), key=lambda a: (sum(coverage[a:a + width]), a))
    return best, best + width


def coverage_of(ranges: Sequence[tuple[int, int]], total: int) -> list[int]:
    """How many of ``ranges`` hold each block."""
    counts = [0] * total
    for a, b in ranges:
        for i in range(max(0, a), min(b, total)):
            counts[i] += 1
    return counts


def shard_path(cache_dir: Path, model_id: str, first: int, end: int) -> Path:
    return cache_dir / "shards" / f"{model_id[:16]}-{first}-{end}.gguf"


def remember_source(shard: Path, info: ModelInfo) -> None:
    """Record beside ``shard`` the whole model it was cut from (written whole, then renamed)."""
    import json
    from dataclasses import asdict

    side = shard.with_suffix(".json")
    tmp = side.with_name(f".{side.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(info)))
    os.replace(tmp, side)


def cut_before(cache_dir: Path, spec: str, blocks: str) -> ModelInfo | None:
    """The model ``spec`` (alias or model id) names when blocks ``A:B`` of it are already cut in
    ``cache_dir``: a shard peer starts again from its shard, without the whole file."""
    import json

    spec = spec.strip().lower()
    for side in sorted((cache_dir / "shards").glob("*.json")):
        try:
            info = ModelInfo(**json.loads(side.read_text()))
        except (OSError, ValueError, TypeError):
            continue  # unreadable or from another version: the shard is cut again if needed
        if not spec or not info.matches(spec):
            continue
        try:
            first, end = parse_blocks(blocks, info.blocks)
        except ModelError:
            continue
        if shard_path(cache_dir, info.model_id, first, end).is_file():
            return info
    return None


def make_shard(source: Path, model_id: str, first: int, end: int, total: int, cache_dir: Path) -> Path:
    """The shard file for blocks [first, end) of ``source``, cut on first use (about 0.2 s for
    the demo model) and reused after. Written to a temporary name and renamed: a crash midway
    never leaves a truncated shard behind."""
    dst = shard_path(cache_dir, model_id, first, end)
    if dst.exists():
        return dst
    import llama_cpp
    from llama_cpp import _logger

    _logger.set_verbose(False)
    keep = set(range(first, min(end + 1, total)))  # one extra block, whose input we export
    prune = [i for i in range(total) if i not in keep]
    arr = (ctypes.c_int32 * (len(prune) + 1))(*prune, -1)
    params = llama_cpp.llama_model_quantize_default_params()
    params.only_copy = True
    params.prune_layers = ctypes.cast(arr, ctypes.POINTER(ctypes.c_int32))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.exists():
            raise ModelError(f"llama.cpp could not cut blocks {first}:{end} out of {source} (code {rc})")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst
