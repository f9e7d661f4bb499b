"""Run the gateway: a ``Swarm`` joined once, shared by every HTTP request, served by
Hypercorn on trio until SIGINT or SIGTERM (then in-flight requests get a graceful close)."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from functools import partial
from typing import Any

import trio

from ..api import Swarm
from .app import make_app


async def _until_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return


async def run_gateway(swarm: Swarm, *, host: str = "127.0.0.1", port: int = 11434, api_key: str | None = None,
                      default_model: str | None = None, on_ready: Callable[[list[str]], None] = lambda urls: None,
                      shutdown: Callable[[], Any] = _until_signal) -> None:
    """Join the swarm, listen, call ``on_ready`` with the URLs bound, serve until ``shutdown``."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("gputorrent.gateway")
    config.graceful_timeout = 5
    async with swarm:
        app = make_app(swarm, api_key=api_key, default_model=default_model)
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(partial(serve, app, config, shutdown_trigger=shutdown))
            on_ready(list(urls))
