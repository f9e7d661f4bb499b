"""Shared fixtures: the real demo model, real serve processes, the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gputorrent.config import load_settings
from gputorrent.lab.localswarm import LocalSwarm
from gputorrent.models import pull

QUESTION = "What is the capital of France? Answer in one word."


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The demo GGUF, pulled into the user cache once (a no-op when `make` already did)."""
    path, _ = pull("smollm2", load_settings().models_dir)
    return path


def run_cli(*args: str, input: str | None = None, timeout: float = 120,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `gputorrent` command in a fresh process."""
    return subprocess.run([sys.executable, "-m", "gputorrent.cli", *args], capture_output=True, text=True,
                          input=input, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture
def cli(tmp_path):
    """`gputorrent …` with a throwaway identity and data dir (reputation store), so tests never
    touch the user's; the model cache stays shared."""
    env = {"XDG_DATA_HOME": str(tmp_path / "data"), "GPUTORRENT_IDENTITY": str(tmp_path / "asker.key")}

    def _run(*args: str, **kw) -> subprocess.CompletedProcess:
        return run_cli(*args, env=env | kw.pop("env", {}), **kw)

    return _run


@pytest.fixture(scope="module")
def swarm(model_path):
    """Serve processes for one test module; all stopped (bounded) when the module ends."""
    with LocalSwarm() as s:
        yield s


@pytest.fixture(scope="module")
def lab():
    """A NAT lab of network namespaces (gputorrent/lab/natlab.py), torn down after the module,
    even on failure; modules that use it skip themselves where it cannot be built."""
    from gputorrent.lab import natlab

    with natlab.NatLab() as built:
        yield built
    assert not built.leftovers()
