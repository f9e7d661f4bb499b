"""Raw logits of a loaded model, step by step: to check that a row's numbers do not depend on
how it was computed (thread count, batch neighbours), and to time prefill and decode alone."""

from __future__ import annotations

from typing import Any

from ..wire import chunk_end


def decode(rt: Any, items: list[tuple[int, list[int], int]]) -> list[Any]:
    """One llama_decode of ``(sequence, tokens, first position)`` items; the logits of each
    item's last row (numpy arrays, copied)."""
    import numpy as np

    b = rt._batch.batch
    n, rows = 0, []
    for seq, toks, p0 in items:
        for j, t in enumerate(toks):
            b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = t, p0 + j, 1, False
            b.seq_id[n][0] = seq
            n += 1
        b.logits[n - 1] = True
        rows.append(n - 1)
    b.n_tokens = n
    rt._ctx.decode(rt._batch)
    return [np.ctypeslib.as_array(rt._ll.llama_get_logits_ith(rt._ctx.ctx, r), shape=(rt.n_vocab,)).copy()
            for r in rows]


def prefill(rt: Any, seq: int, ids: list[int]) -> Any:
    """Empty ``seq``'s cache and feed ``ids`` on the engine's chunk borders; the last row's logits."""
    rt._ctx.kv_cache_seq_rm(seq, 0, -1)
    pos, out = 0, None
    while pos < len(ids):
        end = chunk_end(pos, len(ids))
        out = decode(rt, [(seq, ids[pos:end], pos)])[0]
        pos = end
    return out


def greedy_steps(rt: Any, prompts: list[list[int]], threads: int, steps: int = 6) -> list[Any]:
    """Greedy steps of every prompt (sequence i holds prompt i), all decoded together in one
    batch per step at ``threads`` threads; the first prompt's logits at each step."""
    rt._ll.llama_set_n_threads(rt._ctx.ctx, threads, threads)
    last = [prefill(rt, seq, ids) for seq, ids in enumerate(prompts)]
    pos = [len(ids) for ids in prompts]
    seen = []
    for _ in range(steps):
        seen.append(last[0])
        last = decode(rt, [(s, [int(lg.argmax())], pos[s]) for s, lg in enumerate(last)])
        pos = [p + 1 for p in pos]
    return seen
