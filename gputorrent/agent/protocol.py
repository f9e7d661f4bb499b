"""What the agent and its clients say to each other (stdlib only).

One JSON object per line over the unix socket. A client sends one request,
``{"op": ..., "version": ..., ...}``, and reads events until one has ``"end": true``. Ops:
``hello`` (who runs: pid, version, peer id, counts); ``ask`` (the events ``ask`` prints:
``text``, ``note``, then ``done`` or ``error``); ``peers`` and ``models`` (the rows of
``peers`` and ``models list --swarm``); ``breakers`` (``peers --reset/--ban``: the agent's
store caches what it wrote); ``stop``. An agent answers ``mismatch`` to a client of another
version, except for ``stop``, so that the client can replace it. Closing the socket cancels the
request: that is how Ctrl-C reaches the agent.

The agent trusts its clients only as far as its own user: the socket is 0600 in a 0700 dir and
the agent checks each connection's uid (SO_PEERCRED). A client may ask anything the user's own
``ask`` could; an ask's flags are checked in the agent as in-process.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .. import __version__

PROTOCOL = 1
# A client that finds an agent of another version restarts it. GPUTORRENT_AGENT_CLAIM makes a
# process claim another version: an older agent, for tests of that restart.
VERSION = os.environ.get("GPUTORRENT_AGENT_CLAIM") or f"{__version__}/{PROTOCOL}"
LISTING_FRESH_S = 15.0  # a listing through the agent may come from its view this old (peers --fresh: 0)
MAX_LINE = 16 << 20  # a request or event line; a prompt is bounded well below (limits.py)


def dump(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"


def load(line: bytes) -> dict[str, Any]:
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise ValueError("an agent message is a JSON object")
    return obj
