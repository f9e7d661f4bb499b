"""llama.cpp's shared libraries, loaded in one place, before anything can load numpy.

On an H100 with llama.cpp built for CUDA from llama-cpp-python's sdist, ``serve`` died with a
segmentation fault inside ``llama_model_load_from_file`` whenever numpy (directly, or through
``gguf`` or ``libp2p``) had been imported before ``llama_cpp``; with ``llama_cpp`` first, the
same load worked (bisected in fresh interpreters, gpu-kit run of 2026-11). Both bring native
runtimes into the process (numpy its OpenBLAS and threads, llama.cpp's CPU backend OpenMP and
its CPU-variant libraries), and the first loaded wins symbol resolution for the second; the
exact clash could not be pinned down without the GPU machine, so the order is fixed instead:
every entry point that loads a model calls :func:`load_llama` before it imports anything that
pulls numpy in (tests/test_native_order.py checks each in a fresh interpreter).

A program that imported numpy (or torch) itself before ``gputorrent.Peer`` cannot be reordered
from here; :func:`load_llama` then says so once, with what to do, when the build offloads to a GPU.
"""

from __future__ import annotations

import logging
import sys
from types import ModuleType
from typing import Any

log = logging.getLogger("gputorrent.engine")

_warned = False


def load_llama() -> ModuleType:
    """Import ``llama_cpp`` (which loads libllama and ggml's backends); idempotent and cheap
    after the first call."""
    global _warned
    numpy_first = "numpy" in sys.modules and "llama_cpp" not in sys.modules
    import llama_cpp

    if numpy_first and not _warned and gpu_offload(llama_cpp):
        _warned = True
        log.warning("numpy was loaded before llama.cpp; on CUDA builds that order has crashed model loads. "
                    "Import gputorrent.Peer (or call gputorrent.engine.native.load_llama()) before numpy or torch.")
    return llama_cpp


def gpu_offload(llama_cpp: Any | None = None) -> bool:
    """Whether this llama-cpp-python build can put layers on a GPU (CUDA, Metal, HIP, Vulkan)."""
    ll = llama_cpp or load_llama()
    return bool(ll.llama_supports_gpu_offload())


def build_info() -> dict[str, Any]:
    """What the installed llama.cpp can do: for ``gputorrent id --json`` and ``models info``."""
    ll = load_llama()
    try:
        system = ll.llama_print_system_info().decode(errors="replace").strip()
    except Exception:  # noqa: BLE001 (an older binding without it: the rest still says enough)
        system = ""
    return {"llama_cpp_python": getattr(ll, "__version__", "?"), "gpu_offload": gpu_offload(ll),
            "system_info": system}


GPU_INSTALL_HINT = ("reinstall llama.cpp with GPU offload: `make install GPU=cuda` in a checkout, or "
                    "CMAKE_ARGS=-DGGML_CUDA=on PIP_CACHE_DIR=~/.cache/pip-cuda pip install --force-reinstall "
                    "--no-deps llama-cpp-python==0.3.36 (see docs/gpu.md)")
