"""Where a command's time goes, step by step: ``GPUTORRENT_TRACE=FILE`` appends one JSON line
per span (``{"span", "start", "end", "pid", ...}``, wall-clock seconds) to FILE.

For the cold path across real delay (issue #35): which waits run one after another, and how
many round trips each costs. ``lab/tracing.py`` reads the file back as a timeline. With the
variable unset a span costs one attribute test; nothing is written and nothing else changes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_PATH = os.environ.get("GPUTORRENT_TRACE") or None


def enabled() -> bool:
    return _PATH is not None


@contextmanager
def span(name: str, **attrs: Any) -> Iterator[None]:
    """Time the block as ``name`` (its attributes alongside); an error is recorded too."""
    if _PATH is None:
        yield
        return
    start = time.time()
    error = ""
    try:
        yield
    except BaseException as exc:
        error = type(exc).__name__
        raise
    finally:
        _write({"span": name, "start": start, "end": time.time(), "pid": os.getpid(), **attrs,
                **({"error": error} if error else {})})


def mark(name: str, at: float | None = None, **attrs: Any) -> None:
    """A moment (``at``, default now) rather than a span."""
    if _PATH is not None:
        t = time.time() if at is None else at
        _write({"span": name, "start": t, "end": t, "pid": os.getpid(), **attrs})


def process_start() -> float:
    """When this process started (wall clock), from /proc: the interpreter's own start is part
    of a command's time too."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


def _write(obj: dict[str, Any]) -> None:
    assert _PATH is not None
    with open(_PATH, "a") as f:  # a line per write: O_APPEND keeps lines of several processes whole
        f.write(json.dumps(obj, default=str) + "\n")
