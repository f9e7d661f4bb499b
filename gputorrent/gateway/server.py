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
from ..errors import GputorrentError
from .app import make_app


class GatewayError(GputorrentError):
    """The gateway cannot start; the message says what to change."""


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
    _check_bind(config, host, port)  # before joining the swarm: fail fast, and without a traceback
    async with swarm:
        app = make_app(swarm, api_key=api_key, default_model=default_model)
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(partial(serve, app, config,  # type: ignore[arg-type]
                                               shutdown_trigger=shutdown))
            on_ready(list(urls))


def _check_bind(config: Any, host: str, port: int) -> None:
    import errno

    try:
        sockets = config.create_sockets()
    except OSError as exc:
        hint = (" (an Ollama server, or another gateway, may be running there)" if port == 11434 else "")
        if exc.errno == errno.EADDRINUSE:
            raise GatewayError(f"port {port} on {host} is already in use{hint}; choose another with --port, "
                               "or --port 0 for any free one") from exc
        raise GatewayError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    for sock in sockets.insecure_sockets + sockets.secure_sockets + sockets.quic_sockets:
        sock.close()
