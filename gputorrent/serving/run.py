"""Run a serving peer: load the model, join the swarm, announce, answer, leave cleanly."""

from __future__ import annotations

import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from .. import __version__, protocol
from ..dht import records
from ..identity import Identity
from ..models import ModelInfo
from .device import free_memory_mb
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
    n_threads_batch: int | None = None  # threads for prompt chunks [default: n_threads]
    n_gpu_layers: int | None = None  # None: every layer on the GPU when there is one, else 0
    max_vram_mb: int | None = None  # caps the memory offered and announced
    name: str = ""
    allow: frozenset[str] | None = None
    rate_limit: int = 0
    first_frame_timeout: float = 10.0
    fault: Fault | None = None
    blocks: tuple[int, int] | None = None  # serve only blocks [A, B) of the model (a shard)
    ready_extra: dict[str, Any] = field(default_factory=dict)  # more for the ready file (the metrics URL)
    ledger: Path | None = None  # scoring/ledger.py's file: reciprocity under contention (None: first come first served)
    seed: bool = True  # hand out the model file's pieces to peers fetching it (serving/seeder.py)
    seed_streams: int = 4  # piece streams served at once
    seed_rate: int = 0  # upload cap for pieces, bytes/s (0: none; while answering, seeding slows down anyway)
    cache_dir: Path | None = None  # where the piece list is kept once computed


def pick_model(spec: str, models_dir: Path, cache_dir: Path, offered_mb: int, n_ctx: int, slots: int,
               progress: Callable[[int, int], None] | None = None, alias: str | None = None) -> tuple[ModelInfo, Any]:
    """The model ``--model`` names, identified (hashed once, cached); for a directory, the best
    quantization that fits ``offered_mb``, with the choice (else None) to show. Its alias is
    ``alias``, else the one ``models add`` gave it, else the catalog's or its own name."""
    from dataclasses import replace

    from ..models import read_info, resolve
    from ..models.local import alias_of, check_alias
    from ..models.quant import choose_quantization, gguf_files

    path = resolve(spec, models_dir)
    choice = None
    if path.is_dir():
        choice = choose_quantization([read_info(p, identify=False) for p in gguf_files(path)], offered_mb, n_ctx, slots)
        path = Path(choice.chosen.path)
    info = read_info(path, cache_dir, progress=progress)
    label = check_alias(alias) if alias else alias_of(models_dir, path)
    return (replace(info, label=label) if label else info), choice


def gpu_layers(device: records.Device, opts: ServeOptions) -> int:
    """Layers to offload: all of them (-1) on a GPU unless ``--n-gpu-layers`` says otherwise."""
    if opts.n_gpu_layers is not None:
        return opts.n_gpu_layers
    return -1 if device.kind == "gpu" else 0


def is_shard(info: ModelInfo, opts: ServeOptions) -> bool:
    return opts.blocks is not None and opts.blocks != (0, info.blocks)


def load_engine(info: ModelInfo, opts: ServeOptions, device: records.Device,
                progress: Callable[[float], None] | None = None, cache_dir: Path | None = None):
    """The whole-model engine, or with ``opts.blocks`` a shard engine on a shard file cut from
    the model (cached in ``cache_dir``)."""
    kw: dict[str, Any] = dict(slots=opts.slots, n_ctx=opts.n_ctx, n_threads=opts.n_threads,
                              n_threads_batch=opts.n_threads_batch,
                              n_gpu_layers=gpu_layers(device, opts), progress=progress)
    if is_shard(info, opts):
        from ..engine.shard import ShardEngine
        from ..models.shards import make_shard, remember_source

        first, end = opts.blocks  # type: ignore[misc]
        path = make_shard(Path(info.path), info.model_id, first, end, info.blocks,
                          cache_dir or Path(info.path).parent)
        remember_source(path, info)
        return ShardEngine(path, first=first, end=end, total=info.blocks, **kw)
    from ..engine.llama import LlamaEngine

    return LlamaEngine(Path(info.path), **kw)


def status(server: InferServer, engine) -> dict[str, Any]:
    """A snapshot for the live view and the structured log."""
    import trio

    load = engine.load()
    s = server.stats
    return {"served": s.served, "refused": s.refused, "failed": s.failed, "tokens": s.tokens,
            "active": load.active, "queued": load.queued, "slots": load.slots,
            "tokens_per_s_now": s.recent_tokens_per_s(trio.current_time()), "tokens_per_s": server.tokens_per_s,
            "kv_cache_usage": round(engine.kv_usage(), 4) if hasattr(engine, "kv_usage") else 0.0,
            **({"admissions": asdict(engine.admission)} if hasattr(engine, "admission") else {})}


async def measure_tokens_per_s(engine, n: int = 16) -> float:
    """A short greedy generation: warms llama.cpp's graphs and measures decode speed."""
    from ..engine import Finished
    from ..engine.streaming import EventChannel
    from ..wire import Params

    events = EventChannel()
    job = engine.make_job(engine.encode_prompt("The quick brown fox"), Params(max_tokens=n, temperature=0.0),
                          events.emit)
    engine.submit(job)
    async for ev in events:
        if isinstance(ev, Finished) and ev.completion_tokens > 1 and ev.decode_ms > 0:
            return round((ev.completion_tokens - 1) / (ev.decode_ms / 1000), 1)
    return 0.0


def served_model(info: ModelInfo, n_ctx: int, blocks: tuple[int, int] | None = None,
                 seed_root: str = "") -> records.ServedModel:
    first, end = blocks or (0, info.blocks)
    return records.ServedModel(model_id=info.model_id, alias=info.alias, quantization=info.quantization,
                               context_length=n_ctx, first_block=first, end_block=end,
                               total_blocks=info.blocks, seed_root=seed_root)


async def make_seeder(info: ModelInfo, opts: ServeOptions, engine, allow: frozenset[str] | None) -> Any:
    """The seeder of the model file (its piece list computed once, then cached), or None with
    ``--no-seed``."""
    import trio

    from ..models.pieces import manifest_of
    from .seeder import Seeder

    if not opts.seed:
        return None
    manifest = await trio.to_thread.run_sync(manifest_of, Path(info.path), info.model_id, opts.cache_dir)

    def busy() -> bool:
        load = engine.load()
        return load.active + load.queued > 0

    return Seeder({info.model_id: (Path(info.path), manifest)}, busy=busy, streams=opts.seed_streams,
                  rate=opts.seed_rate, allow=allow, fault=opts.fault)


async def serve(
    identity: Identity,
    info: ModelInfo,
    engine,
    opts: ServeOptions,
    device: records.Device,
    on_ready: Callable[[dict[str, Any]], None] = lambda r: None,
    on_event: Callable[[dict[str, Any]], None] = lambda e: None,
    watch: Callable[[Callable[[], dict[str, Any]]], Awaitable[None]] | None = None,
    stop: Any = None,
) -> InferServer:
    """Serve ``engine`` until SIGINT or SIGTERM; returns the server (for its stats).

    ``on_event`` gets each request's structured events; ``watch``, when given, runs alongside
    with a function that snapshots the live status (for a live view). With a ``stop`` event
    it serves until that is set instead of until a signal.
    """
    import trio

    from ..net.host import direct_ip

    if opts.fault and opts.fault.kind == "hijack-alias":  # whatever it serves, it calls smollm2
        import dataclasses

        info = dataclasses.replace(info, label="smollm2")
    shard = is_shard(info, opts)
    if shard:
        from .shard_server import ShardServer

        tps = await trio.to_thread.run_sync(engine.measure)  # steps/s: the shard's share of a token
        cls: type[InferServer] = ShardServer
    else:
        tps = await measure_tokens_per_s(engine)
        cls = InferServer
    ledger = None
    if opts.ledger is not None:
        from ..scoring.ledger import Ledger

        ledger = await trio.to_thread.run_sync(Ledger, opts.ledger)
    server = cls(identity, engine, info, queue_limit=opts.queue, fault=opts.fault, tokens_per_s=tps,
                 allow=opts.allow, rate_limit=opts.rate_limit, first_frame_timeout=opts.first_frame_timeout,
                 free_memory=lambda: free_memory_mb(device, opts.max_vram_mb), on_event=on_event, ledger=ledger)
    handlers = {protocol.SHARD: server.handle_shard} if shard else {protocol.INFER: server.handle}  # type: ignore[attr-defined]
    handlers[protocol.PING] = server.handle_ping
    seeder = None if shard else await make_seeder(info, opts, engine, opts.allow)
    if seeder is not None:
        handlers[protocol.PIECES] = seeder.handle
    model = served_model(info, engine.n_ctx, opts.blocks if shard else None,
                         seed_root=seeder.root(info.model_id) if seeder is not None else "")
    name = opts.name or socket.gethostname()

    def make_advert(node, leaving: bool) -> records.Advert:
        now = time.time()
        load = engine.load()
        from ..net.host import full_addrs

        addrs = node.reach.addrs(node.host) if node.reach is not None else full_addrs(node.host)
        return records.Advert(
            peer_id=identity.peer_id, seq=int(now * 1000), issued_at=now,
            expires_at=now + opts.node.advert_ttl, addrs=addrs, name=name, device=device,
            models=[model], load=records.Load(active=load.active, queued=load.queued, slots=load.slots),
            tokens_per_s=server.tokens_per_s, version=__version__, leaving=leaving,
            reachability=node.reach.status if node.reach is not None else "unknown",
        )

    try:
        async with trio.open_nursery() as nursery:
            if watch is not None:
                nursery.start_soon(watch, lambda: status(server, engine))
            ip = direct_ip(opts.node.listen)  # where libp2p listens
            if seeder is not None and ip is not None and not opts.node.psk:  # a private swarm's bytes stay in Noise
                await nursery.start(seeder.run_direct, ip)
            await run_node(
                identity, opts.node, handlers=handlers,
                make_advert=make_advert,
                ready_info=lambda node: {"models": [info.to_dict()], "tokens_per_s": tps,
                                         "blocks": [model.first_block, model.end_block],
                                         "device": msgspec.to_builtins(device)} | opts.ready_extra,
                on_ready=on_ready, stop=stop,
            )
            nursery.cancel_scope.cancel()
    finally:
        if ledger is not None:  # an embedded Peer may serve and stop many times in one process
            ledger.close()
    return server
