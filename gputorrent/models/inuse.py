"""Which model files the processes of this machine are using or fetching.

A shard peer that fetched the whole model removes it once its blocks are cut (a shard peer
offers a slice of its disk). Another serve process may be using that same file: serving it
whole (and seeding it), or about to cut blocks of its own. Each holds a shared advisory lock
on the file while it uses it, and the remover takes the lock exclusively, without waiting: if
it cannot, the file stays. The lock lives in a small file beside the model (``.NAME.in-use``),
kept, as removing a lock file others may be opening would race. A fetch takes its own lock
(``.NAME.fetch``): two processes fetching one model at once wrote the same ``.part`` file, and
the first to finish could serve a file the second was still writing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a fetched file is then kept, never removed
    fcntl = None  # type: ignore[assignment]


def _lock_file(path: Path) -> Path:
    return path.with_name(f".{path.name}.in-use")


class InUse:
    """A shared hold on one model file, for as long as this object is open."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        if fcntl is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(_lock_file(path), os.O_CREAT | os.O_RDWR, 0o600)
        except OSError:  # a read-only directory: nothing there is ever removed by us either
            return
        fcntl.flock(self._fd, fcntl.LOCK_SH)

    def remove_unless_shared(self) -> bool:
        """Remove the file if no other process holds it; whether it was removed. Either way
        our own hold ends (a failed conversion to exclusive has already dropped it, on Linux)."""
        if self._fd is None:
            return False
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            return False
        try:
            self.path.unlink()
        finally:
            self.close()
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None

    def __enter__(self) -> InUse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def fetching(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """One fetch of ``path`` at a time on this machine: a second process waits (``on_wait``
    says so first) until the first is done, then finds the file there."""
    if fcntl is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.fetch"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
