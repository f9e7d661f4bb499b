"""Serve from code: ``async with Peer(model="smollm2", bootstrap=[...]) as peer:``.

The same path as ``gputorrent serve`` (device detection, quantization choice, the batched
engine, adverts, admission) without signal handling or console output: the program that
embeds it decides when it stops.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

from ..config import load_settings
from ..identity import Identity
from ..limits import check_options
from ..models import CATALOG, ModelError, ModelInfo, pull
from ..serving.device import computing_device, detect_device, offered_memory_mb
from ..serving.node import NodeOptions
from ..serving.run import ServeOptions, load_engine, pick_model, serve
from .guest import Hosted


class Peer(Hosted):
    """A serving peer inside this process. ``addrs``, ``peer_id`` and ``model`` are set once
    it is entered. Keywords mirror ``gputorrent serve``."""

    def __init__(self, model: str = "smollm2", *, bootstrap: Sequence[str] | None = None,
                 mdns: bool | None = None, identity: Identity | str | Path | None = None,
                 swarm_key: str | Path | None = None, listen: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
                 name: str = "", slots: int = 4, queue: int = 8, ctx: int = 2048, threads: int | None = None,
                 max_vram_mb: int | None = None, n_gpu_layers: int | None = None,
                 allow: Sequence[str] | None = None, rate_limit: int = 120,
                 announce_interval: float = 30.0, seed: bool = True) -> None:
        from ..engine.native import load_llama

        load_llama()  # before this module's own work can import numpy: engine/native.py says why
        check_options(slots=slots, queue=queue, ctx=ctx, rate_limit=rate_limit, announce_interval=announce_interval)
        self._settings = load_settings().with_overrides(
            bootstrap=list(bootstrap) if bootstrap else None, mdns=mdns,
            identity=None if isinstance(identity, Identity) else identity, swarm_key=swarm_key)
        self._identity = identity if isinstance(identity, Identity) else None
        self._spec = model
        self._max_vram_mb = max_vram_mb
        node = NodeOptions(listen=list(listen), bootstrap=list(self._settings.bootstrap), mdns=self._settings.mdns,
                           announce_interval=announce_interval, advert_ttl=max(120.0, 4 * announce_interval))
        self._opts = ServeOptions(node=node, slots=slots, queue=queue, n_ctx=ctx, n_threads=threads, name=name,
                                  allow=frozenset(allow) if allow else None, rate_limit=rate_limit,
                                  n_gpu_layers=n_gpu_layers, max_vram_mb=max_vram_mb,
                                  ledger=self._settings.data_dir / "ledger.sqlite", seed=seed,
                                  cache_dir=self._settings.cache_dir)
        self.addrs: list[str] = []
        self.peer_id = ""
        self.model: ModelInfo | None = None
        self._engine: Any = None
        self._stop: trio.Event | None = None
        self._stack: AsyncExitStack | None = None

    async def _open(self) -> None:
        from ..swarmkey import load

        s = self._settings
        ident = self._identity or Identity.load_or_create(s.identity_path)
        self._opts.node.psk = load(s.swarm_key) if s.swarm_key else None
        if self._spec.lower() in CATALOG:
            await trio.to_thread.run_sync(pull, self._spec, s.models_dir)
        device = detect_device(self._max_vram_mb)
        info, _ = await trio.to_thread.run_sync(
            lambda: pick_model(self._spec, s.models_dir, s.cache_dir, offered_memory_mb(device, self._max_vram_mb),
                               self._opts.n_ctx, self._opts.slots))
        try:
            self._engine = await trio.to_thread.run_sync(load_engine, info, self._opts, device)
        except Exception as exc:
            raise ModelError(str(exc)) from exc
        device = computing_device(device, self._engine.offloaded_layers)
        self.model = info
        self._stop = trio.Event()
        ready = trio.Event()

        def on_ready(r: dict[str, Any]) -> None:
            self.peer_id, self.addrs = r["peer_id"], list(r["addrs"])
            ready.set()

        async def run() -> None:
            await serve(ident, info, self._engine, self._opts, device, on_ready, stop=self._stop)

        # The nursery stays open until _close, in the same task (which Hosted guarantees).
        self._stack = AsyncExitStack()
        nursery = await self._stack.enter_async_context(trio.open_nursery())
        nursery.start_soon(run)
        try:
            await ready.wait()
        except BaseException:
            await self._close()
            raise

    async def _close(self) -> None:
        if self._stop is not None:
            self._stop.set()  # serve publishes a "leaving" advert and returns
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()  # bounded by serve: the leaving advert gets 5 s at most
        if self._engine is not None:
            await trio.to_thread.run_sync(self._engine.close)
            self._engine = None
