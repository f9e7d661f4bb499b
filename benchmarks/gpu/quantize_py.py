"""Quantize a GGUF with llama-cpp-python's binding of llama_model_quantize (the function
llama-quantize calls): the fallback when the llama-quantize binary is missing.
usage: quantize_py.py IN.gguf OUT.gguf [FTYPE=Q4_K_M] [THREADS]"""
import ctypes
import json
import os
import sys
import time

import llama_cpp

FTYPES = {"Q4_K_M": 15, "Q8_0": 7, "F16": 1, "Q4_0": 2}
src, dst = sys.argv[1], sys.argv[2]
ftype = sys.argv[3] if len(sys.argv) > 3 else "Q4_K_M"
threads = int(sys.argv[4]) if len(sys.argv) > 4 else (os.cpu_count() or 1)
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = FTYPES[ftype]
p.nthread = threads
t = time.perf_counter()
rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))
print(json.dumps({"rc": rc, "ftype": ftype, "bytes": os.path.getsize(dst) if os.path.exists(dst) else 0,
                  "seconds": round(time.perf_counter() - t, 2)}))
sys.exit(0 if rc == 0 else 1)
