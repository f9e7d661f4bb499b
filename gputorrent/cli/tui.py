"""``gputorrent tui``: the swarm live in the terminal, with a chat."""

from __future__ import annotations

import argparse
from typing import Any

from . import types
from .common import Parents, swarm_of, use_agent


def register(sub: Any, parents: Parents) -> None:
    s = sub.add_parser("tui", parents=[parents.swarm, parents.agent],
                       help="watch the swarm live and chat with it, in the terminal",
                       description="A live view of the swarm: totals, a peers table (device, VRAM, models, load, "
                                   "RTT, your reputation and breaker for each), the selected peer's details, a chat "
                                   "pane that streams answers and shows who served them, and a log of joins, "
                                   "leaves, breaker changes and failovers. Keys: a ask, r refresh, b ban/unban the "
                                   "selected peer, m filter by model, q quit.")
    s.add_argument("--model", help="show and ask only this model (m cycles through the swarm's models)")
    s.add_argument("--interval", type=types.positive_float, default=2.0,
                   help="seconds between DHT crawls (default: 2)")
    s.add_argument("--temperature", type=float, default=0.7, help="sampling temperature for the chat (0: greedy)")
    s.add_argument("--max-tokens", type=types.int_range(1, 32768), default=256,
                   help="most tokens per answer in the chat")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..tui import SwarmApp

    params = {"temperature": args.temperature, "max_tokens": args.max_tokens}
    SwarmApp(swarm_of(args, agent=use_agent(args), watch_interval=args.interval), model=args.model, params=params).run()
    return 0
