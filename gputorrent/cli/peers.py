"""``gputorrent peers``: the swarm's peers, from their signed adverts."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from . import types
from .common import Parents, agent_rows, console, note, run_trio, settings_of, swarm_of, use_agent


def register(sub: Any, parents: Parents) -> None:
    s = sub.add_parser("peers", parents=[parents.swarm, parents.agent], help="list the peers of the swarm",
                       description="List the peers the DHT knows, from their signed adverts: device, VRAM, "
                                   "models, load, tokens/s and the age of each advert.")
    s.add_argument("--model", help="only peers serving this model (alias or model id)")
    s.add_argument("--json", action="store_true",
                   help="print the verified adverts as JSON (with --watch: one JSON array per line, per refresh)")
    s.add_argument("--watch", action="store_true", help="keep the table up to date until Ctrl-C")
    s.add_argument("--no-ping", action="store_true", help="do not ping each peer for its RTT (no dials)")
    s.add_argument("--fresh", action="store_true",
                   help="look the swarm up now, not from the agent's view (which it keeps at most 15 s old)")
    s.add_argument("--interval", type=types.positive_float, default=2.0,
                   help="seconds between refreshes with --watch")
    s.add_argument("--reset", action="append", metavar="PEER_ID", type=types.peer_id,
                   help="close PEER_ID's circuit breaker (and lift a ban); repeatable; no network needed")
    s.add_argument("--ban", action="append", metavar="PEER_ID", type=types.peer_id,
                   help="never choose PEER_ID again (until --reset)")
    s.set_defaults(func=run)


def _table(rows: list[dict[str, Any]], model: str | None) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"{len(rows)} peers" + (f" serving {model}" if model else ""))
    for col in (*(rows[0]["cells"] if rows else _columns()), "advert age"):
        table.add_column(col)
    now = time.time()
    for row in rows:
        age = now - row["issued_at"]
        # Text, not str: names come from other peers' adverts and must not be read as markup.
        table.add_row(*(Text(v) for v in row["cells"].values()), f"{age:.0f}s" if age < 120 else f"{age / 60:.0f}m")
    return table


def _columns() -> tuple[str, ...]:
    from ..api.rows import COLUMNS

    return COLUMNS


def _show(rows: list[dict[str, Any]], args: argparse.Namespace, live: Any = None) -> None:
    if args.json:
        print(json.dumps([r["json"] for r in rows]), flush=True)
    elif live is not None:
        live.update(_table(rows, args.model), refresh=True)
    else:
        console(stderr=False).print(_table(rows, args.model))


def _through_agent_loop(args: argparse.Namespace) -> int:
    """The table (or JSON) from the agent's view, once or every ``--interval`` with ``--watch``."""
    def rows() -> list[dict[str, Any]]:
        from ..agent.protocol import LISTING_FRESH_S

        max_age = 0.0 if args.fresh else min(LISTING_FRESH_S, args.interval) if args.watch else LISTING_FRESH_S
        return agent_rows(args, "peers", model=args.model, ping=not args.no_ping, max_age=max_age)

    if not args.watch:
        _show(rows(), args)
        return 0
    if args.json:
        while True:
            _show(rows(), args)
            time.sleep(args.interval)
    from rich.live import Live

    with Live(_table([], args.model), console=console(stderr=False), auto_refresh=False) as live:
        while True:
            _show(rows(), args, live)
            time.sleep(args.interval)


def _through_agent(args: argparse.Namespace) -> bool:
    """Reset and ban through the running agent, if one runs: it keeps the breakers it uses in
    memory, and a write to the store beside it would not reach them until it restarts."""
    from ..agent.client import request
    from ..agent.paths import AgentFiles

    events = request(AgentFiles.of(settings_of(args)), {"op": "breakers", "reset": args.reset, "ban": args.ban})
    said = next(iter(events), {}) if events is not None else {}
    if said.get("t") != "breakers":
        return False
    for pid in args.reset or []:
        note(f"{pid}: breaker reset (and unbanned)")
    for pid in args.ban or []:
        note(f"{pid}: banned (its breaker stays open until peers --reset)")
    return True


def run(args: argparse.Namespace) -> int:
    import trio

    if args.reset or args.ban:
        if use_agent(args) and _through_agent(args):
            return 0
        from ..scoring.reputation import ReputationStore

        store = ReputationStore(settings_of(args).data_dir / "reputation.sqlite")
        try:
            for pid in args.reset or []:
                store.reset(pid)
                note(f"{pid}: breaker reset (and unbanned)")
            for pid in args.ban or []:
                store.ban(pid)
                note(f"{pid}: banned (its breaker stays open until peers --reset)")
        finally:
            store.close()
        return 0

    if use_agent(args):
        return _through_agent_loop(args)

    async def once(swarm: Any) -> list:
        from ..agent.ops import peers_rows

        return await peers_rows(swarm, args.model, not args.no_ping)

    async def main() -> None:
        async with swarm_of(args) as swarm:
            if not args.watch:
                _show(await once(swarm), args)
                return
            if args.json:
                while True:
                    _show(await once(swarm), args)
                    await trio.sleep(args.interval)
            from rich.live import Live

            with Live(_table([], args.model), console=console(stderr=False), auto_refresh=False) as live:
                while True:
                    _show(await once(swarm), args, live)
                    await trio.sleep(args.interval)

    run_trio(main)
    return 0
