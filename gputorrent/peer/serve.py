"""Run a serving peer: load the model, join the swarm, announce, answer, leave cleanly."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..dht import records
from ..identity import Identity
from ..models import ModelInfo
from . import protocol
from .device import detect_device
from .faults import Fault
from .node import NodeOptions, run_node
from .server import InferServer


@dataclass(slots=True)
class ServeOptions:
    node: NodeOptions = field(default_factory=NodeOptions)
    slots: int = 4
    queue: int = 8
    n_ctx: int = 2048
    n_threads: int | None = None
    n_gpu_layers: int = 0
    name: str = ""
    allow: frozenset[str] | None = None
    rate_limit: int = 0
    first_frame_timeout: float = 10.0
    fault: Fault | None = None


def load_engine(info: ModelInfo, opts: ServeOptions, progress: Callable[[float], None] | None = None):
    from ..engine.llama import LlamaEngine

    return LlamaEngine(
        Path(info.path), slots=opts.slots, n_ctx=opts.n_ctx, n_threads=opts.n_threads,
        n_gpu_layers=opts.n_gpu_layers, progress=progress,
    )


async def measure_tokens_per_s(engine, n: int = 16) -> float:
    """A short greedy generation: warms llama.cpp's graphs and measures decode speed."""
    from ..engine import Finished
    from ..engine.streaming import EventChannel
    from ..wire import Params

    events = EventChannel()
    job = engine.make_job(engine.encode_prompt("The quick brown fox"), Params(max_tokens=n, temperature=0.0), events.emit)
    engine.submit(job)
    async for ev in events:
        if isinstance(ev, Finished) and ev.completion_tokens > 1 and ev.decode_ms > 0:
            return round((ev.completion_tokens - 1) / (ev.decode_ms / 1000), 1)
    return 0.0


def served_model(info: ModelInfo, n_ctx: int) -> records.ServedModel:
    return records.ServedModel(model_id=info.model_id, alias=info.alias, quantization=info.quantization,
                               context_length=n_ctx, first_block=0, end_block=info.blocks,
                               total_blocks=info.blocks)


async def serve(
    identity: Identity,
    info: ModelInfo,
    engine,
    opts: ServeOptions,
    on_ready: Callable[[dict[str, Any]], None] = lambda r: None,
) -> InferServer:
    """Serve ``engine`` until SIGINT or SIGTERM; returns the server (for its stats)."""
    tps = await measure_tokens_per_s(engine)
    server = InferServer(identity, engine, info, queue_limit=opts.queue, fault=opts.fault, tokens_per_s=tps,
                         allow=opts.allow, rate_limit=opts.rate_limit, first_frame_timeout=opts.first_frame_timeout)
    device = detect_device()
    model = served_model(info, engine.n_ctx)
    name = opts.name or socket.gethostname()

    def make_advert(node, leaving: bool) -> records.Advert:
        now = time.time()
        load = engine.load()
        from .host import full_addrs

        return records.Advert(
            peer_id=identity.peer_id, seq=int(now * 1000), issued_at=now,
            expires_at=now + opts.node.advert_ttl, addrs=full_addrs(node.host), name=name, device=device,
            models=[model], load=records.Load(active=load.active, queued=load.queued, slots=load.slots),
            tokens_per_s=tps, version=__version__, leaving=leaving,
        )

    await run_node(
        identity, opts.node, handlers={protocol.INFER: server.handle, protocol.PING: server.handle_ping},
        make_advert=make_advert,
        ready_info=lambda node: {"models": [info.to_dict()], "tokens_per_s": tps}, on_ready=on_ready,
    )
    return server
