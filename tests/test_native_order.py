"""Every entry point that loads a model loads llama.cpp's libraries before numpy.

On a CUDA build the other order crashed model loads (engine/native.py says what was measured).
There is no GPU here, so the order itself is checked: a fresh interpreter with an audit hook
reports which came first, the dlopen of libllama/libggml or the import of numpy, and exits at
once (nothing else of the entry point needs to run)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HOOK = r"""
import os, sys
def _order(event, args):
    if event == "ctypes.dlopen" and args and args[0] and ("libllama" in str(args[0]) or "libggml" in str(args[0])):
        print("ORDER llama-first", flush=True); os._exit(0)
    if event == "import" and args and args[0] == "numpy":
        print("ORDER numpy-first", flush=True); os._exit(0)
sys.addaudithook(_order)
"""


def first_loaded(code: str, tmp_path) -> str:
    done = subprocess.run([sys.executable, "-c", HOOK + code], capture_output=True, text=True, timeout=120,
                          env={"XDG_DATA_HOME": str(tmp_path / "data"), "GPUTORRENT_MDNS": "no",
                               "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    lines = [line for line in done.stdout.splitlines() if line.startswith("ORDER ")]
    assert lines, f"neither llama.cpp nor numpy was loaded (exit {done.returncode}):\n{done.stderr[-2000:]}"
    return lines[0].removeprefix("ORDER ")


def serve_cli(path, *extra: str) -> str:
    args = ["serve", "--model", str(path), "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", *extra]
    return f"from gputorrent.cli import main\nmain({args!r})\n"


@pytest.mark.parametrize("entry", ["serve", "serve-blocks", "api-peer"])
def test_model_loading_entry_points_load_llama_before_numpy(entry, model_path, tmp_path):
    code = {
        "serve": serve_cli(model_path),
        "serve-blocks": serve_cli(model_path, "--blocks", "0:10"),
        "api-peer": f"import gputorrent\ngputorrent.Peer({str(model_path)!r})\n",
    }[entry]
    assert first_loaded(code, tmp_path) == "llama-first"


def test_the_probe_sees_the_wrong_order(tmp_path):
    """The check can fail: numpy imported first is reported as such."""
    assert first_loaded("import numpy\nimport llama_cpp\n", tmp_path) == "numpy-first"
