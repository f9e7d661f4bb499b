"""Private files: keys are created 0600 exactly once, and read with a size cap.

Two processes starting at once must not overwrite each other's key (``O_EXCL``), and a path
that is not a key (``/dev/zero``, a 70 GB model) must be refused, not read into memory.
"""

from __future__ import annotations

import os
from pathlib import Path


def create_private(path: Path, data: bytes) -> bool:
    """Write ``data`` to a new file of mode 0600; False (and nothing written) if it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def read_small(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; ``ValueError`` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is not a regular file")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} is larger than a key file ({limit} bytes at most)")
    return data


def readable_by_others(path: Path) -> bool:
    return bool(Path(path).stat().st_mode & 0o077)
