"""A ``GPUTORRENT_TRACE`` file (gputorrent/trace.py) read back as a timeline: each span's start
from the process's own start, its length, and both in round trips of a link, so that a cold
path across delay shows which waits run one after another."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Span:
    name: str
    start: float  # seconds from the process's start
    seconds: float
    attrs: dict[str, Any]


def read(path: Path, pid: int | None = None) -> list[Span]:
    """The spans of one process (the first traced one, unless ``pid``), in order of start."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        return []
    pid = rows[0]["pid"] if pid is None else pid
    mine = [r for r in rows if r["pid"] == pid]
    t0 = min((r["start"] for r in mine if r["span"] == "process start"), default=mine[0]["start"])
    skip = {"span", "start", "end", "pid"}
    return sorted((Span(r["span"], r["start"] - t0, r["end"] - r["start"], {k: v for k, v in r.items()
                                                                             if k not in skip})
                   for r in mine), key=lambda s: s.start)


def table(spans: list[Span], rtt_ms: float, *, min_ms: float = 0.0) -> str:
    """A markdown table: start and length in ms and in round trips of ``rtt_ms``."""
    lines = ["| start, ms | length, ms | start, RTTs | length, RTTs | step | detail |", "|---|---|---|---|---|---|"]
    for s in spans:
        if s.seconds * 1000 < min_ms and s.seconds > 0:
            continue
        detail = ", ".join(f"{k}={v}" for k, v in s.attrs.items())
        lines.append(f"| {s.start * 1000:.0f} | {s.seconds * 1000:.0f} | {s.start * 1000 / rtt_ms:.1f} | "
                     f"{s.seconds * 1000 / rtt_ms:.1f} | {s.name} | {detail} |")
    return "\n".join(lines)


def phases(spans: list[Span], names: tuple[str, ...] = ("join", "rank", "infer stream", "first token")) -> dict:
    """When each named step began and how long the first of each took (seconds)."""
    out: dict[str, tuple[float, float]] = {}
    for s in spans:
        if s.name in names and s.name not in out:
            out[s.name] = (s.start, s.seconds)
    return out
