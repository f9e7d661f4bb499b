"""In-process llama-cpp-python single stream: load with every layer offloaded, generate N tokens
greedily from a chat prompt; prints one JSON line (tokens, decode tok/s, ttft ms, a text sample).
usage: inproc_bench.py MODEL.gguf [N_TOKENS=160] [N_GPU_LAYERS=-1]"""
import json
import os
import sys
import time

import llama_cpp

path = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 160
ngl = int(sys.argv[3]) if len(sys.argv) > 3 else -1
THREADS = len(os.sched_getaffinity(0))  # as gputorrent's engine (all usable cores)
t = time.perf_counter()
fa = True  # gputorrent's engine leaves flash attention on 'auto' (on for CUDA); Llama() defaults it off
try:
    llm = llama_cpp.Llama(model_path=path, n_gpu_layers=ngl, n_ctx=2048, n_batch=512, verbose=False, seed=1, n_threads=THREADS,
                          flash_attn=True)
except Exception:
    fa = False
    llm = llama_cpp.Llama(model_path=path, n_gpu_layers=ngl, n_ctx=2048, n_batch=512, verbose=False, seed=1, n_threads=THREADS)
load_s = time.perf_counter() - t
msgs = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
res = []
for rnd in range(3):  # round 0 warms up (CUDA kernels, graphs)
    llm.reset()  # no prompt reuse across rounds: each TTFT includes the whole prompt
    t0 = time.perf_counter(); first = None; k = 0; text = ""
    for chunk in llm.create_chat_completion(messages=msgs, max_tokens=n, temperature=0.0, stream=True):
        d = chunk["choices"][0].get("delta", {})
        if "content" in d and d["content"] is not None:
            if first is None:
                first = time.perf_counter()
            k += 1; text += d["content"]
    end = time.perf_counter()
    first = first or end
    res.append({"chunks": k, "ttft_ms": round((first - t0) * 1000, 1),
                "decode_tok_s": round((k - 1) / (end - first), 1) if k > 1 and end > first else None,
                "total_tok_s": round(k / (end - t0), 1)})
print(json.dumps({"model": path, "n_gpu_layers": ngl, "flash_attn": fa, "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
                  "load_s": round(load_s, 2), "rounds": res, "sample": text[:60]}))
