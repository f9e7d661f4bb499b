"""Private swarms: a libp2p pre-shared key (PSK).

Every connection of a host with a swarm key is wrapped in a cipher keyed by it (libp2p "pnet"),
below Noise, so a peer without the key cannot complete a connection at all, let alone read an
advert or ask. The file format is go-libp2p's and IPFS's ``swarm.key``, so keys are
interchangeable with other libp2p private networks::

    /key/swarm/psk/1.0.0/
    /base16/
    <64 hex digits>
"""

from __future__ import annotations

import secrets
from pathlib import Path

from .errors import GputorrentError
from .files import create_private, read_small, readable_by_others

HEADER = "/key/swarm/psk/1.0.0/\n/base16/\n"


class SwarmKeyError(GputorrentError, ValueError):
    """A swarm key file that cannot be made or used."""


def write_new(path: Path) -> Path:
    """Create a new random swarm key file (mode 0600); never overwrites an existing one."""
    path = Path(path)
    if not create_private(path, (HEADER + secrets.token_hex(32) + "\n").encode()):
        raise SwarmKeyError(f"{path} already exists; remove it first or choose another path")
    return path


def load(path: Path) -> str:
    """The key as 64 hex digits (what py-libp2p's ``psk`` takes)."""
    try:
        lines = read_small(path, 4096).decode("ascii", "replace").split()
    except OSError as exc:
        raise SwarmKeyError(f"cannot read swarm key {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise SwarmKeyError(f"{exc}; make one with: gputorrent keys new-swarm-key") from exc
    if lines[:2] != ["/key/swarm/psk/1.0.0/", "/base16/"] or len(lines) != 3:
        raise SwarmKeyError(f"{path} is not a swarm key file; make one with: gputorrent keys new-swarm-key")
    key = lines[2].lower()
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise SwarmKeyError(f"{path}: the key must be 64 hex digits")
    if readable_by_others(path):
        raise SwarmKeyError(f"{path} is readable by other users; run: chmod 600 {path}")
    return key
