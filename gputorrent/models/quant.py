"""How much memory a model needs to serve, and which quantization of it to serve.

A peer given a directory of several quantizations of one model serves the best one that fits
the memory it offers: quality first (by tier, then by the order within a tier), because a peer
that fits Q8_0 but serves Q2_K gives worse answers for no gain.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .catalog import ModelError
from .gguf_info import ModelInfo

# Best first. The tiers are what users compare; the order inside a tier breaks ties.
TIERS: tuple[tuple[str, ...], ...] = (
    ("F32", "BF16", "F16"),
    ("Q8_0", "Q6_K"),
    ("Q5_K_M", "Q4_K_M", "Q5_1", "Q5_K_S", "Q5_0", "Q4_1", "IQ4_NL", "Q4_K_S", "Q4_0"),
    ("IQ4_XS", "Q3_K_L", "Q3_K_M", "IQ3_M", "IQ3_S", "Q3_K_S", "IQ3_XS", "IQ3_XXS"),
    ("Q2_K", "Q2_K_S", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"),
)
_RANK = {q: i for i, q in enumerate(q for tier in TIERS for q in tier)}
_TIER = {q: t for t, tier in enumerate(TIERS) for q in tier}

KV_BYTES = 2  # f16 K and V cells, llama.cpp's default cache type
N_BATCH = 512  # the engine's batch: it sizes the logits and compute buffers
MB = 1 << 20


def tier(quantization: str) -> int:
    """0 is full precision; larger is coarser. Unknown types sort after every known one."""
    return _TIER.get(quantization.upper(), len(TIERS))


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """Memory to serve a model: weights, the KV cache of every slot's window, and buffers."""

    weights_mb: int
    kv_cache_mb: int
    buffers_mb: int

    @property
    def total_mb(self) -> int:
        return self.weights_mb + self.kv_cache_mb + self.buffers_mb


def estimate_memory(info: ModelInfo, n_ctx: int, slots: int) -> MemoryEstimate:
    """Weights are the file; each slot holds ``n_ctx`` KV cells (one window per slot).

    A cell stores K and V for every layer: ``2 x blocks x kv_heads x head_dim`` values. The
    buffers are the logits of a full batch plus llama.cpp's compute graph, which scales with
    the batch and the hidden size. It is what llama.cpp reserves, an upper bound: pages of the
    KV cache that no answer has reached yet do not count in a process's resident memory.
    """
    ctx = min(n_ctx, info.context_length) if info.context_length > 0 else n_ctx
    head_dim = info.embedding_length // max(1, info.head_count)
    kv_heads = info.head_count_kv or info.head_count
    kv = 2 * info.blocks * kv_heads * head_dim * KV_BYTES * ctx * slots
    logits = N_BATCH * info.vocab_size * 4
    graph = N_BATCH * info.embedding_length * 4 * 16
    return MemoryEstimate(weights_mb=-(-info.size_bytes // MB), kv_cache_mb=-(-kv // MB),
                          buffers_mb=-(-(logits + graph) // MB))


@dataclass(frozen=True, slots=True)
class QuantChoice:
    chosen: ModelInfo
    candidates: list[tuple[ModelInfo, MemoryEstimate]]  # every file considered, with its need
    offered_mb: int


def gguf_files(directory: Path) -> list[Path]:
    files = sorted(p for p in Path(directory).iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if not files:
        raise ModelError(f"{directory} holds no .gguf files; put the quantizations of one model there")
    return files


def choose_quantization(candidates: list[ModelInfo], offered_mb: int, n_ctx: int, slots: int) -> QuantChoice:
    """The best-quality candidate whose estimate fits ``offered_mb``.

    Raises ``ModelError`` naming the smallest need when none fits, or when the files are not
    all one model (mixing models would make "best quantization" meaningless).
    """
    if not candidates:
        raise ModelError("no model files to choose from")
    names = {(c.architecture, c.blocks, c.embedding_length, c.vocab_size) for c in candidates}
    if len(names) > 1:
        raise ModelError("the directory mixes different models; keep one model's quantizations per directory")
    estimates = {c.path: estimate_memory(c, n_ctx, slots) for c in candidates}
    fits = [c for c in candidates if estimates[c.path].total_mb <= offered_mb]
    if not fits:
        least = min(candidates, key=lambda c: estimates[c.path].total_mb)
        raise ModelError(
            f"no quantization fits the {offered_mb} MB offered: the smallest, {least.quantization} "
            f"({Path(least.path).name}), needs {estimates[least.path].total_mb} MB; offer more memory "
            "(--max-vram-mb), or lower --ctx or --slots")
    best = min(fits, key=lambda c: (_RANK.get(c.quantization.upper(), len(_RANK)), -c.size_bytes))
    return QuantChoice(best, [(c, estimates[c.path]) for c in candidates], offered_mb)
