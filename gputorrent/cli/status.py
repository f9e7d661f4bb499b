"""``gputorrent status``: what a serving peer on this machine is doing (its ``--metrics`` port)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from . import types
from .common import Parents, out

DEFAULT = "127.0.0.1:9464"


def register(sub: Any, parents: Parents) -> None:
    s = sub.add_parser("status", help="what a serving peer is doing: slots, queue, answers, tokens",
                       description="Ask a running 'serve --metrics HOST:PORT' for its live status: slots busy, "
                                   "queue, answers served, refused and failed, tokens, speed and KV cache use.",
                       epilog="example:\n  gputorrent serve --model smollm2 --metrics 127.0.0.1:9464 &\n"
                              "  gputorrent status 127.0.0.1:9464\n",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("address", nargs="?", default=DEFAULT, type=types.host_port, metavar="HOST:PORT",
                   help=f"the serve's --metrics address [default: {DEFAULT}]")
    s.add_argument("--json", action="store_true", help="print the status as JSON")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    from ..liveview import status_line
    from .common import GputorrentError

    host, port = args.address
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/status"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            st = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise GputorrentError(f"no serving peer answers at {url} ({reason}); start one with "
                              f"'gputorrent serve --model M --metrics {host}:{port}'") from None
    if args.json:
        out(st)
    else:
        print(status_line(st) + f" · KV cache {100 * st.get('kv_cache_usage', 0):.0f}% used")
    return 0
