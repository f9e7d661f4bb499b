"""One logging set-up for the whole program: readable lines, or JSON lines for collectors.

Everything goes to stderr (stdout carries only what scripts read: addresses, answers, JSON).
With ``json=True`` every line on stderr is one JSON object: log records become
``{"event": "log", "level": ..., "logger": ..., "message": ...}`` beside the server's own events.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO


class _Text(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            msg += "\n" + self.formatException(record.exc_info)
        return f"gputorrent: {record.levelname.lower()}: {msg}"


class _Json(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {"ts": round(record.created, 3), "event": "log", "level": record.levelname.lower(),
                               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, separators=(",", ":"))


def configure(*, json_lines: bool = False, level: int = logging.WARNING, stream: TextIO | None = None) -> None:
    """Replace whatever handlers libraries installed (py-libp2p calls ``basicConfig``-style
    set-ups of its own) with ours, on the root logger."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_Json() if json_lines else _Text())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.captureWarnings(True)


def json_event(event: str, stream: TextIO | None = None, **fields: Any) -> None:
    """One JSON event line (``ready``, ``stopped``, ...) in the same format as the log."""
    out = stream or sys.stderr
    out.write(json.dumps({"ts": round(time.time(), 3), "event": event} | fields, separators=(",", ":")) + "\n")
    out.flush()
