"""Where an agent's socket, api file, lock and log live (stdlib only).

One agent per user and per swarm presence: its files are named by a hash of the data dir, the
requester key and the swarm key, so a second config (tests, a private swarm) gets its own agent
and never another's identity. The directory is the user's runtime dir (``$XDG_RUNTIME_DIR``) or
``/tmp/gputorrent-UID``, 0700 and owned by the user: checked, not assumed, since anyone can
create a name in /tmp first.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..config import Settings
from ..errors import GputorrentError


class AgentDirError(GputorrentError):
    """The runtime dir cannot be trusted (another owner, or open to others)."""


def runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base) / "gputorrent" if base and Path(base).is_dir() else Path(f"/tmp/gputorrent-{os.getuid()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise AgentDirError(f"{path} must be a directory of yours that nobody else can open (mode 0700); "
                            "remove it, or set XDG_RUNTIME_DIR to one")
    return path


@dataclass(frozen=True)
class AgentFiles:
    socket: Path  # where the agent listens
    api: Path  # JSON: socket, pid, version; written once the agent answers
    life: Path  # flock held by the running agent for its whole life
    start: Path  # flock held by whoever is starting one, so two commands start one agent
    log: Path

    @classmethod
    def from_lock(cls, life: Path) -> AgentFiles:
        """The files of the agent whose life lock is ``life`` (``agent-TAG.lock``)."""
        return cls(*(life.with_suffix(s) for s in (".sock", ".json", ".lock", ".start", ".log")))

    @classmethod
    def of(cls, settings: Settings) -> AgentFiles:
        who = "\0".join(str(p) for p in (settings.data_dir.resolve(), settings.requester_identity_path.resolve(),
                                         settings.swarm_key.resolve() if settings.swarm_key else ""))
        tag = hashlib.sha256(who.encode()).hexdigest()[:12]
        d = runtime_dir()
        return cls(d / f"agent-{tag}.sock", d / f"agent-{tag}.json", d / f"agent-{tag}.lock",
                   d / f"agent-{tag}.start", d / f"agent-{tag}.log")
