"""What ``gputorrent serve`` shows while it runs: a live status line on a terminal, a line per
answer, or, with ``--log-format json``, one JSON object per event for log collectors.

Everything goes to stderr; stdout carries only the peer's addresses, which scripts read.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TextIO

import trio

from .identity import short_id

STATUS_EVERY_S = 10.0  # a "status" event in the JSON log
REFRESH_S = 0.5  # the live line on a terminal


def status_line(st: dict[str, Any]) -> str:
    return (f"{st['active']}/{st['slots']} slots busy, {st['queued']} queued · {st['tokens_per_s_now']:.0f} tok/s "
            f"now, {st['tokens_per_s']:.0f}/stream · {st['served']} served, {st['refused']} refused, "
            f"{st['failed']} failed · {st['tokens']} tokens")


def event_line(ev: dict[str, Any]) -> str | None:
    """One readable line for the events an operator cares about; None for the rest."""
    who = short_id(ev.get("requester") or "?")
    kind = ev["event"]
    if kind == "done":
        if ev.get("finish_reason") == "deadline":
            return f"deadline reached for {who}"
        tokens, rate = ev.get("completion_tokens", 0), ev.get("tokens_per_s", 0)
        speed = f"{rate:.0f} tokens/s, " if tokens > 1 and rate > 0 else ""  # one token has no rate
        return (f"answered {who}: {tokens} token{'s' * (tokens != 1)}, {speed}"
                f"first token {ev.get('ttft_ms', 0):.0f} ms ({ev.get('finish_reason')})")
    if kind == "busy":
        return f"busy for {who}: {ev.get('reason')}"
    if kind == "refused":
        return f"refused {who}: {ev.get('code')}: {ev.get('reason')}"
    if kind == "failed":
        return f"failed for {who}: {ev.get('reason')}"
    return None


class StatusView:
    def __init__(self, *, json_log: bool, live: bool, out: TextIO | None = None) -> None:
        self.json_log = json_log
        self.live = live and not json_log
        self.out = out or sys.stderr
        self._console = None
        if not json_log:
            from rich.console import Console

            self._console = Console(file=self.out, highlight=False)

    def _json(self, obj: dict[str, Any]) -> None:
        self.out.write(json.dumps(obj, separators=(",", ":")) + "\n")
        self.out.flush()

    def ready(self, info: dict[str, Any], text: str) -> None:
        if self.json_log:
            self._json({"event": "ready"} | info)
        else:
            self._console.print(text)  # type: ignore[union-attr]

    def event(self, ev: dict[str, Any]) -> None:
        if self.json_log:
            self._json(ev)
        elif (line := event_line(ev)) is not None:
            self._console.print(line, markup=False)  # type: ignore[union-attr]  # requesters' text

    async def watch(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        """Runs alongside the server until it stops."""
        if self.json_log:
            while True:
                await trio.sleep(STATUS_EVERY_S)
                self._json({"event": "status"} | snapshot())
        if not self.live:
            await trio.sleep_forever()
        from rich.live import Live
        from rich.text import Text

        def line() -> Text:  # one line, cut rather than wrapped on a narrow terminal
            return Text(status_line(snapshot()), no_wrap=True, overflow="ellipsis")

        with Live(line(), console=self._console, auto_refresh=False, transient=True) as live:
            while True:
                await trio.sleep(REFRESH_S)
                live.update(line(), refresh=True)
