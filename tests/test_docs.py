"""Every Python example in docs/api.md runs as written against a real local swarm."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

API_DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", API_DOC.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def env(swarm, tmp_path_factory):
    boot = swarm.bootstrap("docs-boot")
    swarm.start("docs-peer", "--bootstrap", boot.addr, "--ctx", "1024", "--rate-limit", "0")
    home = tmp_path_factory.mktemp("docs")
    return {**os.environ, "GPUTORRENT_BOOTSTRAP": boot.addr, "GPUTORRENT_MDNS": "0",
            "XDG_DATA_HOME": str(home / "data"), "PYTHONUNBUFFERED": "1"}


def test_the_examples_were_found():
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("code", EXAMPLES[1:], ids=lambda c: c.strip().splitlines()[-1][:40])
def test_example_runs(code, env):
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    if "capital of France" in code:
        assert "Paris" in done.stdout
    if "gputorrent.Peer(" in code:
        assert "serving smollm2" in done.stdout
