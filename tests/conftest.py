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

# Commands join in-process unless a test asks for the agent (the ``cli`` fixture's "agent"
# mode, tests/test_agent.py): an agent outlives its command, and only a test that stops it
# may start one.
os.environ["GPUTORRENT_AGENT"] = "off"


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


def agent_env(tmp_path: Path) -> dict[str, str]:
    """Environment for commands that use an agent of the test's own (stop it with stop_agents)."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700, exist_ok=True)
    return {"GPUTORRENT_AGENT": "on", "XDG_RUNTIME_DIR": str(run), "GPUTORRENT_MDNS": "0"}


def stop_agents(run_dir: Path, timeout: float = 10.0) -> list[int]:
    """Stop every agent whose files are in the runtime dir ``run_dir`` (SIGTERM, then SIGKILL
    after ``timeout``); the pids that were running."""
    from gputorrent.agent.client import stop_all

    return stop_all(run_dir, timeout)


@pytest.fixture
def cli(tmp_path, request):
    """`gputorrent …` with a throwaway identity and data dir (reputation store), so tests never
    touch the user's; the model cache stays shared. Parametrized indirectly with "agent", the
    commands go through an agent of the test's own, stopped after the test."""
    env = {"XDG_DATA_HOME": str(tmp_path / "data"), "GPUTORRENT_IDENTITY": str(tmp_path / "asker.key")}
    through_agent = getattr(request, "param", "in-process") == "agent"
    if through_agent:
        env |= agent_env(tmp_path)

    def _run(*args: str, **kw) -> subprocess.CompletedProcess:
        return run_cli(*args, env=env | kw.pop("env", {}), **kw)

    yield _run
    if through_agent:
        stop_agents(tmp_path / "run")


BOTH_WAYS = pytest.mark.parametrize("cli", ["in-process", "agent"], indirect=True)


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
