"""``gputorrent serve``: donate this machine, serving a model (or a shard of one) to the swarm."""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..limits import MAX_CTX, MAX_SLOTS, MIN_CTX
from . import types
from .common import (
    ByteBar,
    Help,
    Parents,
    UsageError,
    console,
    identity_of,
    listening,
    node_options,
    note,
    print_addrs,
    settings_of,
    swarm_of,
)
from .models import describe_choice, offered, pick

if TYPE_CHECKING:
    from ..models import ModelInfo
    from ..models.inuse import InUse


def register(sub: Any, parents: Parents) -> None:
    s = sub.add_parser("serve", parents=[parents.swarm], help="donate this machine: serve a model to the swarm",
                       description="Load a GGUF model, join the swarm, announce it in the DHT and answer "
                                   "requests until Ctrl-C. Prints this peer's full addresses.",
                       epilog="examples:\n  gputorrent serve --model smollm2\n"
                              "  gputorrent serve --model ~/models/my-model.Q4_K_M.gguf --alias mine\n"
                              "  gputorrent serve --model smollm2 --blocks auto --metrics 127.0.0.1:9464\n",
                       formatter_class=type("H", (Help, argparse.RawDescriptionHelpFormatter), {}))
    s.add_argument("--model", required=True,
                   help="alias (smollm2, fetched on first use, or one named with 'models add'), path to a .gguf, "
                        "or a directory of one model's quantizations (the best that fits the memory offered is served)")
    s.add_argument("--alias", metavar="NAME",
                   help="the name requesters may ask for [default: the one 'models add' gave it, else its own]")
    listening(s)
    s.add_argument("--name", help="a name for this peer in listings [default: the host name]")
    s.add_argument("--announce-interval", type=types.positive_float, default=30.0, help="seconds between adverts")
    s.add_argument("--advert-ttl", type=types.positive_float,
                   help="seconds an advert stays valid [default: max(120, 4 x interval)]")
    s.add_argument("--slots", type=types.int_range(1, MAX_SLOTS), default=4,
                   help="answers generated at once (continuous batching)")
    s.add_argument("--queue", type=types.int_range(0, 4096), default=8,
                   help="requests waiting beyond the slots before 'busy'")
    s.add_argument("--ctx", type=types.int_range(MIN_CTX, MAX_CTX), default=2048,
                   help="context window per slot, in tokens")
    s.add_argument("--threads", type=types.int_range(1, 256), help="decode threads [default: all usable cores]")
    s.add_argument("--batch-threads", type=types.int_range(1, 256), metavar="N",
                   help="threads for prompts and batched steps [default: --threads]; e.g. --threads 1 "
                        "--batch-threads 2 for shards sharing a machine with other hops")
    s.add_argument("--max-vram-mb", type=types.int_range(1), metavar="MB",
                   help="most memory to offer (VRAM on a GPU, RAM on a CPU); caps what is announced and which "
                        "quantization a --model DIR serves [default: all that is free]")
    s.add_argument("--n-gpu-layers", type=types.int_range(-1), metavar="N",
                   help="layers to offload to the GPU; -1 for all [default: all when a GPU is found, else 0]")
    s.add_argument("--blocks", metavar="A:B|auto",
                   help="serve only blocks A to B-1 of the model (a shard); requesters chain shards that "
                        "together hold every block. 'auto' takes as many as fit in the memory offered, where "
                        "the swarm holds the fewest copies [default: the whole model]. Once its blocks are cut, "
                        "a model file serve fetched itself is removed: the shard alone is kept and served again "
                        "on the next start")
    s.add_argument("--keep-model", action="store_true",
                   help="with --blocks: keep the whole model file serve fetched (to serve other blocks later "
                        "without fetching it again)")
    s.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="'json': stderr carries only JSON lines, one per event (ready, accepted, done, busy, "
                        "refused, failed, a status every 10 s, log records, stopped), for log collectors")
    s.add_argument("--metrics", type=types.host_port, metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics and a JSON status at /status "
                        "(e.g. 127.0.0.1:9464; see 'gputorrent status')")
    s.add_argument("--allow", action="append", metavar="PEER_ID", type=types.peer_id,
                   help="serve only these requesters (repeatable); others get a signed refusal")
    s.add_argument("--rate-limit", type=types.int_range(0), default=120, metavar="N",
                   help="requests per minute from one requester before 'busy' (0: no limit)")
    s.add_argument("--no-seed", dest="seed", action="store_false",
                   help="do not hand out the model file's pieces to peers fetching it (models pull swarm:MODEL); "
                        "seeding is on by default, bounded, and slows down while this peer answers")
    s.add_argument("--seed-streams", type=types.int_range(1, 64), default=4, metavar="N",
                   help="piece streams served at once")
    s.add_argument("--seed-rate", type=types.positive_float, metavar="MB/s",
                   help="cap on upload for pieces, in MB/s [default: no cap while idle; 4 MB/s, one stream, "
                        "while answering]")
    s.add_argument("--fault", help=argparse.SUPPRESS)  # test-only misbehaviour, see serving/faults.py
    s.add_argument("--first-frame-timeout", type=types.positive_float, default=10.0,
                   help=argparse.SUPPRESS)  # for tests
    s.set_defaults(func=run)


def blocks_of(args: argparse.Namespace, info: ModelInfo, offered_mb: int) -> tuple[int, int] | None:
    """``--blocks A:B``, or for ``auto`` as many blocks as fit in the memory offered, placed
    where the swarm holds the fewest copies (None: the whole model fits, serve it whole)."""
    from ..models import ModelError
    from ..models.quant import estimate_memory
    from ..models.shards import coverage_of, parse_blocks, thinnest_range

    if info.blocks < 2:
        raise ModelError(f"{info.alias} has {info.blocks} block(s): nothing to shard")
    if args.blocks != "auto":
        return parse_blocks(args.blocks, info.blocks)
    per_block = estimate_memory(info, args.ctx, args.slots).total_mb / info.blocks
    width = int(offered_mb // max(per_block, 1e-9))
    if width >= info.blocks:
        note(f"--blocks auto: the whole model fits in the {offered_mb} MB offered; serving it whole")
        return None
    if width < 1:
        raise ModelError(f"not even one block of {info.alias} (~{per_block:.0f} MB with this context) fits in the "
                         f"{offered_mb} MB offered; offer more (--max-vram-mb) or lower --ctx / --slots")
    held: list[tuple[int, int]] = []
    settings = settings_of(args)
    if settings.bootstrap or settings.mdns:
        import trio

        async def lookup() -> None:
            async with swarm_of(args) as swarm:
                for st in await swarm.peers(info.model_id):
                    held.extend((m.first_block, m.end_block) for m in st.advert.models
                                if m.model_id == info.model_id)

        try:
            trio.run(lookup)
        except Exception as exc:  # noqa: BLE001 (no swarm yet is fine: start from block 0)
            note(f"--blocks auto: could not look at the swarm ({exc}); placing blocks from the start")
    first, end = thinnest_range(coverage_of(held, info.blocks), width)
    note(f"--blocks auto: serving blocks {first}:{end} of {info.blocks} ({width} fit in {offered_mb} MB; "
         f"the swarm's thinnest, from {len(held)} range(s) seen)")
    return first, end


def _metrics_server(args: argparse.Namespace) -> Any:
    """Bind the metrics port before any work, so a taken port is a usage error, not a late failure."""
    if not args.metrics:
        return None, None
    from ..metrics import MetricsServer, ServeMetrics

    host, port = args.metrics
    metrics = ServeMetrics()
    try:
        server = MetricsServer(metrics.registry, host, port)
    except OSError as exc:
        raise UsageError(f"--metrics: cannot listen on {host} port {port}: {exc.strerror or exc}") from None
    return metrics, server


def run(args: argparse.Namespace) -> int:
    from ..engine.native import load_llama

    load_llama()  # before anything imports numpy (gguf, libp2p): engine/native.py says why
    import trio

    from ..logs import configure, json_event
    from ..models import CATALOG, ModelError, pull
    from ..models.catalog import cached_path
    from ..models.inuse import InUse
    from ..serving.faults import Fault
    from ..serving.run import ServeOptions, serve

    json_log = args.log_format == "json"
    configure(json_lines=json_log)
    settings = settings_of(args)
    node_opts = node_options(args, settings)  # a bad or taken --listen fails here, before any work
    try:
        fault = Fault.parse(args.fault) if args.fault else None
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.alias:
        from ..models.local import check_alias

        try:
            check_alias(args.alias)
        except ModelError as exc:
            raise UsageError(f"--alias: {exc}") from None
    metrics, metrics_server = _metrics_server(args)
    cut = None  # blocks of this model already cut: served from the shard alone, nothing fetched
    if args.blocks and args.blocks != "auto":
        from ..models.shards import cut_before

        cut = cut_before(settings.cache_dir, args.model, args.blocks)
    if cut is None and args.model.lower() not in CATALOG:
        from ..models.local import UnknownModel, resolve

        try:
            resolve(args.model, settings.models_dir)
        except UnknownModel as exc:  # exit 2, before any work
            raise UsageError(str(exc)) from None
    fetched = False
    in_use = None  # our hold on the whole file (models/inuse.py): nobody removes it under us
    if cut is None and args.model.lower() in CATALOG:  # like `ollama run`: fetch a known model on first use
        in_use = InUse(cached_path(CATALOG[args.model.lower()], settings.models_dir))  # before it is there
        with ByteBar(f"fetching {args.model}", quiet=json_log) as progress:
            _, fetched = pull(args.model, settings.models_dir, progress=progress,
                              on_wait=lambda: note(f"waiting for another process of this machine "
                                                   f"fetching {args.model}"))
    device, offered_mb = offered(args.max_vram_mb)
    if device.kind == "gpu" and _check_offload(device, args.n_gpu_layers).kind == "cpu":
        from ..serving.device import offered_memory_mb

        device = _check_offload(device, args.n_gpu_layers, quiet=True)
        offered_mb = offered_memory_mb(device, args.max_vram_mb)  # RAM, not the card's VRAM
    if cut is not None:
        from dataclasses import replace

        info, choice = (replace(cut, label=args.alias) if args.alias else cut), None
    else:
        info, choice = pick(args.model, settings, offered_mb, args.ctx, args.slots, alias=args.alias, quiet=json_log)
        if in_use is None and Path(info.path).parent == settings.models_dir:  # where a fetch could remove it
            in_use = InUse(Path(info.path))
    if choice and not json_log:
        note(describe_choice(choice))
    allow = frozenset(args.allow) if args.allow else None
    if fault and fault.kind.startswith("dht-"):
        node_opts.dht_fault = fault.kind.removeprefix("dht-")
    if metrics is not None:
        node_opts.on_timing = metrics.timing
    blocks = blocks_of(args, info, offered_mb) if args.blocks else None
    opts = ServeOptions(node=node_opts, slots=args.slots, queue=args.queue, n_ctx=args.ctx,
                        n_threads=args.threads, n_threads_batch=args.batch_threads, name=args.name or "",
                        allow=allow, rate_limit=args.rate_limit,
                        first_frame_timeout=args.first_frame_timeout, fault=fault, n_gpu_layers=args.n_gpu_layers,
                        max_vram_mb=args.max_vram_mb, blocks=blocks, ledger=settings.data_dir / "ledger.sqlite",
                        seed=args.seed, seed_streams=args.seed_streams,
                        seed_rate=int(args.seed_rate * 1e6) if args.seed_rate else 0, cache_dir=settings.cache_dir,
                        ready_extra={"metrics": metrics_server.url + "/metrics"} if metrics_server else {})
    ident = identity_of(args)
    from ..identity import KeyHold, key_in_use

    hold = KeyHold.take(settings.identity_path)  # kept until this process ends: one peer id, one process
    if hold is None:
        raise UsageError(key_in_use(settings.identity_path))
    engine = _load(info, opts, device, settings, quiet=json_log)
    if in_use is not None and blocks and blocks != (0, info.blocks):  # a shard: the whole file is used no more
        if fault and fault.kind == "pause-before-drop":
            _pause_until_sigusr1()
        if fetched and not args.keep_model:
            _drop_whole(in_use, blocks, quiet=json_log)
        in_use.close()
    from ..serving.device import computing_device

    device = computing_device(device, engine.offloaded_layers)
    from ..liveview import StatusView

    view = StatusView(json_log=json_log, live=sys.stderr.isatty())
    on_event = view.event

    async def watch(snapshot: Any) -> None:
        if metrics is None:
            return await view.watch(snapshot)
        import trio

        async with trio.open_nursery() as nursery:
            nursery.start_soon(metrics.watch, snapshot)
            metrics_server.status = lambda: metrics.latest
            metrics_server.start()
            await view.watch(snapshot)

    if metrics is not None:
        def on_event(ev: dict[str, Any]) -> None:
            metrics.event(ev)
            view.event(ev)

    def on_ready(ready: dict) -> None:
        where = (f"{device.name}, {device.vram_free_mb} MB VRAM offered, {engine.n_gpu_layers} layers on the GPU"
                 if device.kind == "gpu" else f"{device.name}, {device.cores} cores")
        what = f"blocks {blocks[0]}:{blocks[1]} of {info.alias}" if blocks else info.alias
        view.ready(ready, f"serving {what} ({info.short_id}) as {ready['peer_id']}\n"
                          f"  on {where}; {opts.slots} slots, context {engine.n_ctx}, {ready['tokens_per_s']} "
                          f"tokens/s measured; announced every {opts.node.announce_interval:g}s"
                          + (f"\n  metrics at {metrics_server.url}/metrics" if metrics_server else "")
                          + "\npress Ctrl-C to stop")
        print_addrs(ready)

    try:
        server = trio.run(partial(serve, ident, info, engine, opts, device, on_ready, on_event=on_event, watch=watch))
    finally:
        engine.close()
        if metrics_server is not None:
            metrics_server.close()
    s = server.stats
    if json_log:
        json_event("stopped", served=s.served, tokens=s.tokens, refused=s.refused, failed=s.failed)
    else:
        note(f"stopped: {s.served} answers, {s.tokens} tokens, {s.refused} refused, {s.failed} failed")
    return 0


def _check_offload(device: Any, n_gpu_layers: int | None, *, quiet: bool = False) -> Any:
    """A GPU is offered only when this build can put layers on it: said before loading, with the
    command that fixes it; the advert then says CPU, which is what the peer computes on."""
    from ..engine.native import GPU_INSTALL_HINT, gpu_offload
    from ..serving.device import computing_device

    if device.kind != "gpu" or n_gpu_layers == 0:
        return computing_device(device, 0) if device.kind == "gpu" else device
    if not gpu_offload():
        if quiet:
            return computing_device(device, 0)
        import logging

        logging.getLogger("gputorrent").warning(
            "found %s, but this llama-cpp-python build computes on the CPU only, so this peer serves and "
            "announces itself as a CPU; to donate the GPU, %s", device.name, GPU_INSTALL_HINT)
        return computing_device(device, 0)
    return device


def _drop_whole(in_use: InUse, blocks: tuple[int, int], *, quiet: bool) -> None:
    """Remove the whole model file this serve fetched, now that its shard is cut: a shard
    peer offers a slice of its disk as of its memory. Not while another serve process of
    this machine uses it (serving it whole, or cutting blocks of its own)."""
    path = in_use.path
    try:
        size = path.stat().st_size
        removed = in_use.remove_unless_shared()
    except OSError as exc:
        note(f"could not remove {path} after cutting blocks {blocks[0]}:{blocks[1]}: {exc.strerror or exc}")
        return
    if not removed:
        if not quiet:
            note(f"kept the whole model file {path}: another serve process on this machine is using it")
        return
    if not quiet:
        note(f"removed the whole model file ({size / 1e6:.0f} MB) now that blocks {blocks[0]}:{blocks[1]} are cut; "
             "the shard is kept and served again on the next start (--keep-model keeps the whole file)")


def _pause_until_sigusr1() -> None:
    """Fault ``pause-before-drop``: stop here until SIGUSR1, so a test can start another
    process that uses the file before this one decides whether to remove it."""
    import signal

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    print("paused before removing the whole model file (fault pause-before-drop)", file=sys.stderr, flush=True)
    signal.sigwait({signal.SIGUSR1})
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})


def _load(info: ModelInfo, opts: Any, device: Any, settings: Any, *, quiet: bool) -> Any:
    """Load the model (or cut and load its shard) with a progress bar."""
    from contextlib import nullcontext

    from rich.progress import BarColumn, Progress, TextColumn

    from ..models import ModelError
    from ..serving.run import load_engine

    bar = nullcontext() if quiet else Progress(TextColumn("{task.description}"), BarColumn(),
                                               TextColumn("{task.percentage:>3.0f}%"), console=console())
    with bar as progress:
        report = None
        if progress is not None:
            task = progress.add_task(f"loading {info.alias} ({info.size_bytes / 1e6:.0f} MB)", total=1.0)
            report = lambda p: progress.update(task, completed=p)  # noqa: E731
        try:
            return load_engine(info, opts, device, cache_dir=settings.cache_dir, progress=report)
        except Exception as exc:
            raise ModelError(str(exc)) from exc
