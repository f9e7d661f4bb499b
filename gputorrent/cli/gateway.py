"""``gputorrent gateway``: an OpenAI- and Ollama-compatible HTTP API to the swarm."""

from __future__ import annotations

import argparse
import os
from functools import partial
from pathlib import Path
from typing import Any

from . import types
from .common import Parents, UsageError, note, swarm_of, use_agent


def register(sub: Any, parents: Parents) -> None:
    s = sub.add_parser("gateway", parents=[parents.swarm, parents.agent],
                       help="an OpenAI- and Ollama-compatible HTTP API to the swarm",
                       description="Serve the swarm over HTTP so existing clients work unchanged: OpenAI "
                                   "(/v1/chat/completions, /v1/completions, /v1/models; SSE streaming) and Ollama "
                                   "(/api/chat, /api/generate, /api/tags; NDJSON streaming). Prints its URL. "
                                   "/metrics gives Prometheus metrics of the requester side (failovers, attempts, "
                                   "peer choice time).",
                       epilog="examples:\n  gputorrent gateway --bootstrap /ip4/…/p2p/…\n"
                              "  OPENAI_BASE_URL=http://127.0.0.1:11434/v1 OPENAI_API_KEY=none python my_app.py\n"
                              "  OLLAMA_HOST=http://127.0.0.1:11434 ollama run smollm2 'Hello'",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=types.port, default=11434, help="port (default: 11434, Ollama's; 0 picks a free one)")
    s.add_argument("--api-key", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (or set GPUTORRENT_API_KEY); needed beyond loopback")
    s.add_argument("--model", help="model for requests that name none (default: what most peers serve)")
    s.add_argument("--ready-file", type=Path, help="write the URL as JSON here once listening")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import ipaddress

    import trio

    from ..gateway import run_gateway
    from ..serving.node import write_ready_file

    api_key = args.api_key or os.environ.get("GPUTORRENT_API_KEY") or None
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError as exc:
        raise UsageError(f"--host must be an IP address (or localhost): {exc}") from exc
    if not loopback and not api_key:
        note("gputorrent: warning: listening beyond this machine without --api-key: anyone who reaches this port "
             "can use the swarm through you")
    swarm = swarm_of(args, agent=use_agent(args))

    def on_ready(urls: list[str]) -> None:
        url = urls[0]
        if args.ready_file:
            write_ready_file(args.ready_file, {"url": url, "peer_id": swarm.peer_id})
        note(f"gateway to the swarm on {url}")
        note(f"  OpenAI clients: base_url={url}/v1" + (" with api_key=<your key>" if api_key else ""))
        note(f"  Ollama clients: OLLAMA_HOST={url}")
        note(f"  metrics: {url}/metrics")
        note("press Ctrl-C to stop")
        print(url, flush=True)

    trio.run(partial(run_gateway, swarm, host=args.host, port=args.port, api_key=api_key,
                     default_model=args.model, on_ready=on_ready))
    if args.ready_file:
        Path(args.ready_file).unlink(missing_ok=True)
    note("gateway stopped")
    return 0
