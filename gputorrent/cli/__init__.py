"""The ``gputorrent`` command: one module per subcommand, each holding its flags, their checks
and its handler (``register`` and ``run``).

Each command imports what it needs when it runs: ``import libp2p`` alone costs ~0.8 s and
llama.cpp more, and ``gputorrent id`` or ``--help`` should not pay for them.
Exit codes: 0 done, 1 the work failed (the message says what to do), 2 bad usage (before any
work), 130 Ctrl-C, 141 stdout closed early (``| head``).
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from . import (
    agent,
    ask,
    bootstrap,
    chat,
    completion,
    gateway,
    keys,
    models,
    peerid,
    peers,
    serve,
    status,
    tui,
)
from .common import GputorrentError, Parents, Parser, UsageError, err

COMMANDS = (peerid, models, keys, serve, bootstrap, peers, status, tui, gateway, ask, chat, agent, completion)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="gputorrent",
        description="Torrent-style volunteer compute for language models: donate a GPU or CPU with "
                    "'serve', ask the swarm with 'ask'.",
        epilog="Quick start:\n  gputorrent models pull smollm2\n  gputorrent serve --model smollm2 "
               "--ready-file /tmp/peer.json\n  gputorrent ask \"What is the capital of France?\" "
               "--peer /ip4/127.0.0.1/tcp/PORT/p2p/PEER_ID\n\nRun 'gputorrent COMMAND --help' for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"gputorrent {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    parents = Parents()
    for command in COMMANDS:
        command.register(sub, parents)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from ..config import ConfigError

    try:
        from .. import trace

        if trace.enabled():
            trace.mark("process start", trace.process_start())
            trace.mark("command", cmd=" ".join(sys.argv[1:3]))
        with trace.span("main"):
            code = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe can still be told apart from a failure
        return code
    except (UsageError, ConfigError) as exc:
        err(str(exc))
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `gputorrent models info x | head`: the reader left; say nothing
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (GputorrentError, ValueError, OSError) as exc:
        err(str(exc))
        return 1


def entry() -> None:
    """The ``gputorrent`` command (and ``python -m gputorrent``): ``main``, then out at once.

    When ``main`` returns, the work is done, its output written and every store closed (the
    reputation writer is joined by ``Swarm.close``). What Python does after that, tearing down
    the module graph libp2p brings and joining library threads, took 1.3-2.1 s on a busy machine
    between a printed answer and the process's exit (benchmarks/loaded.py); scripts and shells
    wait for the exit, so the process leaves without it."""
    import logging

    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`) or stream: nothing more to say
            pass
    logging.shutdown()
    os._exit(code)


__all__ = ["build_parser", "entry", "main"]
