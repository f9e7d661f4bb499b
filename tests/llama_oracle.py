"""An independent reference of the llama architecture in torch: the oracle that a chain of
shards computes the model.

Nothing here comes from llama.cpp: weights are read with gguf-py and dequantized with
``gguf.quants.dequantize``, and the block is written from the model card's definition: RMSNorm,
rotary embeddings on adjacent pairs (GGUF's converter permutes q and k so that llama.cpp's
"normal" RoPE applies), grouped-query attention with a causal mask, SwiGLU feed-forward, a final
norm and the (here tied) output head. It runs the whole sequence at once, in float64.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.quants import dequantize


def _field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.get_field(key)
    if f is None:
        return default
    v = f.parts[f.data[0]]
    return v.tobytes().decode() if v.dtype == np.uint8 else v[0].item()


class LlamaOracle:
    def __init__(self, path: Path) -> None:
        r = gguf.GGUFReader(path)
        arch = _field(r, "general.architecture")
        if arch != "llama":
            raise ValueError(f"the oracle implements the llama architecture, not {arch}")
        self.n_layer = int(_field(r, "llama.block_count"))
        self.n_head = int(_field(r, "llama.attention.head_count"))
        self.n_head_kv = int(_field(r, "llama.attention.head_count_kv", self.n_head))
        self.eps = float(_field(r, "llama.attention.layer_norm_rms_epsilon", 1e-5))
        self.rope_base = float(_field(r, "llama.rope.freq_base", 10000.0))
        self.w: dict[str, torch.Tensor] = {}
        for t in r.tensors:
            data = dequantize(t.data, t.tensor_type)
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))
            self.w[t.name] = torch.from_numpy(np.asarray(data, dtype=np.float64).reshape(shape))
        self.head = self.w.get("output.weight", self.w["token_embd.weight"])

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    def _rope(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate adjacent pairs (x[2i], x[2i+1]) of each head by pos * base^(-2i/d)."""
        n, heads, d = x.shape
        inv = self.rope_base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None, :]
        cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
        a, b = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out

    def _block(self, h: torch.Tensor, i: int) -> torch.Tensor:
        w = lambda name: self.w[f"blk.{i}.{name}.weight"]  # noqa: E731
        n = h.shape[0]
        x = self._norm(h, w("attn_norm"))
        q = (x @ w("attn_q").T).view(n, self.n_head, -1)
        k = (x @ w("attn_k").T).view(n, self.n_head_kv, -1)
        v = (x @ w("attn_v").T).view(n, self.n_head_kv, -1)
        q, k = self._rope(q), self._rope(k)
        group = self.n_head // self.n_head_kv
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
        scores = scores.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
        att = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, -1)
        h = h + att @ w("attn_output").T
        x = self._norm(h, w("ffn_norm"))
        return h + (torch.nn.functional.silu(x @ w("ffn_gate").T) * (x @ w("ffn_up").T)) @ w("ffn_down").T

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """Logits at every position of ``ids`` (shape: len(ids) x vocabulary)."""
        h = self.w["token_embd.weight"][torch.tensor(ids)]
        for i in range(self.n_layer):
            h = self._block(h, i)
        return self._norm(h, self.w["output_norm.weight"]) @ self.head.T
