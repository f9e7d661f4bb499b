"""``gputorrent agent``: this machine's one presence in the swarm, which thin commands use."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from . import types
from .common import Parents, out, settings_of

IDLE_S = 600.0  # an agent nobody asked for this long exits; the next command starts another


def register(sub: Any, parents: Parents) -> None:
    s = sub.add_parser(
        "agent", help="this machine's resident peer, which ask uses (started on demand)",
        description="The agent holds this user's requester identity, its DHT node, the warm view of the "
                    "swarm's adverts and pongs, open connections, reputation, breakers and the ledger, so that "
                    "'ask' needs no join of its own: a warm ask is a process start and one round trip. The first "
                    "'ask' starts it; it listens only on a unix socket in the user's runtime dir (0600) and "
                    "serves this user only; it exits after --idle-exit seconds without a request.",
        epilog="examples:\n  gputorrent agent status\n  gputorrent agent stop\n"
               "  gputorrent ask 'Hi' --no-agent     # join the swarm in-process instead\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = s.add_subparsers(dest="verb", metavar="VERB", required=True)
    st = verbs.add_parser("status", help="whether an agent runs, its pid, peer id, uptime and requests")
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    st.set_defaults(func=status)
    sp = verbs.add_parser("stop", help="stop the agent (it finishes nothing in flight: asks are cancelled)")
    sp.set_defaults(func=stop)
    rn = verbs.add_parser("run", parents=[parents.swarm], help="run the agent in the foreground (what 'ask' starts)")
    rn.add_argument("--idle-exit", type=types.positive_float, metavar="S",
                    default=float(os.environ.get("GPUTORRENT_AGENT_IDLE", IDLE_S)),
                    help="exit after this many seconds without a request (also GPUTORRENT_AGENT_IDLE)")
    rn.add_argument("--data-dir", type=Path, metavar="DIR",
                    help="its reputation, ledger and keys [default: the user's data dir; GPUTORRENT_DATA_DIR]")
    rn.set_defaults(func=run)
    for p in (st, sp):
        p.set_defaults(identity=None, bootstrap=None, no_mdns=False, swarm_key=None)


def _files(args: argparse.Namespace) -> Any:
    from ..agent.paths import AgentFiles

    return AgentFiles.of(settings_of(args))


def status(args: argparse.Namespace) -> int:
    from ..agent.client import AgentError, request, running_pid

    files = _files(args)
    events = request(files, {"op": "hello"})
    try:
        info = next(iter(events), {}) if events is not None else {}
    except AgentError:  # it listens but is stuck: said below, with its pid
        info = {}
    if info.get("t") != "hello":
        pid = running_pid(files)
        st = {"running": pid is not None, "pid": pid, "socket": str(files.socket), "log": str(files.log)}
        if args.json:
            out(st)
        elif pid:
            print(f"an agent (pid {pid}) holds {files.life} but does not answer at {files.socket}; see {files.log}")
        else:
            print("no agent runs; the next 'gputorrent ask' starts one")
        return 0
    info = {"running": True, **{k: v for k, v in info.items() if k not in ("t", "end")}, "log": str(files.log)}
    if args.json:
        out(info)
    else:
        print(f"agent pid {info['pid']} · peer {info['peer_id']} · up {info['uptime_s']:.0f} s · "
              f"{info['requests']} requests, {info['in_flight']} in flight · exits after {info['idle_exit_s']:.0f} s "
              f"idle · {info['socket']}")
    return 0


def stop(args: argparse.Namespace) -> int:
    from ..agent.client import stop as stop_agent

    if not stop_agent(_files(args)):
        print("no agent runs")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..agent.paths import AgentFiles
    from ..agent.server import run as run_agent

    settings = settings_of(args)
    if args.data_dir:
        settings = settings.with_overrides(data_dir=args.data_dir)
    return run_agent(settings, AgentFiles.of(settings), args.idle_exit)
