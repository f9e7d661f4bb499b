"""Made tokenizer-smollm2.json.gz (run once, where the model file is; needs the gguf package):
copies the tokenizer.* metadata of the SmolLM2-135M-Instruct GGUF into a small gzipped JSON that
gen_model.py reads, so no model weights travel.

usage: extract_tokenizer.py SmolLM2-135M-Instruct.Q4_1.gguf tokenizer-smollm2.json.gz"""
import gzip
import json
import sys

from gguf import GGUFReader

src, dst = sys.argv[1], sys.argv[2]
r = GGUFReader(src)
out = {}
for k, f in r.fields.items():
    if k.startswith("tokenizer.") or k in ("llama.vocab_size", "llama.block_count", "llama.context_length",
                                           "llama.embedding_length", "llama.feed_forward_length",
                                           "llama.attention.head_count", "llama.attention.head_count_kv",
                                           "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon",
                                           "llama.rope.dimension_count"):
        v = f.contents()
        out[k] = v
out["_source"] = src.rsplit("/", 1)[-1]
with gzip.open(dst, "wt", encoding="utf-8") as fh:
    json.dump(out, fh, ensure_ascii=False)
print({k: (v if not isinstance(v, list) else f"list[{len(v)}]") for k, v in out.items() if k != "tokenizer.chat_template"})
