"""Run a serving peer: load the model, listen, answer, stop cleanly on SIGINT/SIGTERM."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ..identity import Identity
from ..models import ModelInfo
from . import protocol
from .faults import Fault
from .host import full_addrs, running_host
from .server import InferServer


@dataclass(slots=True)
class ServeOptions:
    listen: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    slots: int = 4
    queue: int = 8
    n_ctx: int = 2048
    n_threads: int | None = None
    n_gpu_layers: int = 0
    ready_file: Path | None = None
    fault: Fault | None = None


@dataclass(frozen=True, slots=True)
class Ready:
    peer_id: str
    addrs: list[str]
    models: list[dict]
    tokens_per_s: float


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


def write_ready_file(path: Path, ready: Ready) -> None:
    """Atomically: a watcher never reads half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"peer_id": ready.peer_id, "addrs": ready.addrs, "models": ready.models,
                               "tokens_per_s": ready.tokens_per_s}))
    os.replace(tmp, path)


async def serve(
    identity: Identity,
    info: ModelInfo,
    engine,
    opts: ServeOptions,
    on_ready: Callable[[Ready], None] = lambda r: None,
) -> InferServer:
    """Serve ``engine`` until SIGINT or SIGTERM; returns the server (for its stats)."""
    tps = await measure_tokens_per_s(engine)
    server = InferServer(identity, engine, info, queue_limit=opts.queue, fault=opts.fault)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with running_host(identity, opts.listen) as host:
            host.set_stream_handler(protocol.INFER, server.handle)
            ready = Ready(identity.peer_id, full_addrs(host), [info.to_dict()], tps)
            if opts.ready_file:
                write_ready_file(opts.ready_file, ready)
            on_ready(ready)
            async for _ in signals:
                break
    if opts.ready_file:
        Path(opts.ready_file).unlink(missing_ok=True)
    return server

