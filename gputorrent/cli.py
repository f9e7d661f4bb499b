"""The ``gputorrent`` command.

Each subcommand imports what it needs when it runs: ``import libp2p`` alone costs ~0.8 s and
llama.cpp more, and ``gputorrent id`` or ``--help`` should not pay for them.
Exit codes: 0 done, 1 the work failed (the message says what to do), 2 bad usage, 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

from . import __version__
from .config import Settings, load_settings


class UsageError(Exception):
    """Bad flags or parameters; exit code 2."""


def _out(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _err(msg: str) -> None:
    print(f"gputorrent: error: {msg}", file=sys.stderr)


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings().with_overrides(identity=getattr(args, "identity", None))


def _identity(args: argparse.Namespace, *, requester: bool = False):
    from .identity import Identity

    settings = _settings(args)
    return Identity.load_or_create(settings.requester_identity_path if requester else settings.identity_path)


# --- id -------------------------------------------------------------------------------------


def cmd_id(args: argparse.Namespace) -> int:
    settings = _settings(args)
    ident = _identity(args)
    if args.json:
        _out({"peer_id": ident.peer_id, "public_key": ident.public_key.hex(),
              "identity_file": str(settings.identity_path)})
    else:
        print(ident.peer_id)
        print(f"public key  {ident.public_key.hex()}", file=sys.stderr)
        print(f"key file    {settings.identity_path}", file=sys.stderr)
    return 0


# --- models ---------------------------------------------------------------------------------


class _ByteBar:
    """A rich progress bar over bytes on stderr, shown only once there is progress to show
    (a cached model or a cached model id print nothing)."""

    def __init__(self, description: str) -> None:
        self.description = description
        self._bar = None
        self._task = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), console=_console())
            self._task = self._bar.add_task(self.description, total=total)
            self._bar.start()
        self._bar.update(self._task, completed=done, total=total)

    def __enter__(self) -> _ByteBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def _console():
    from rich.console import Console

    return Console(stderr=True)


def cmd_models_pull(args: argparse.Namespace) -> int:
    from .models import pull

    settings = _settings(args)
    with _ByteBar(f"fetching {args.alias}") as progress:
        path, fetched = pull(args.alias, settings.models_dir, progress=progress)
    msg = "fetched and verified" if fetched else "already cached"
    if args.json:
        _out({"alias": args.alias, "path": str(path), "fetched": fetched})
    else:
        print(f"{args.alias}: {msg}: {path}")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from .models import CATALOG, local_models

    if args.swarm:
        return _models_in_swarm(args)
    settings = _settings(args)
    rows = []
    for path in local_models(settings.models_dir):
        alias = next((e.alias for e in CATALOG.values() if e.filename == path.name), "")
        rows.append({"alias": alias, "path": str(path), "size_bytes": path.stat().st_size})
    if args.json:
        _out(rows)
        return 0
    if not rows:
        print(f"no models in {settings.models_dir}; run: gputorrent models pull smollm2", file=sys.stderr)
        return 0
    for r in rows:
        print(f"{r['alias'] or '-':10} {r['size_bytes'] / 1e6:8.1f} MB  {r['path']}")
    return 0


def _models_in_swarm(args: argparse.Namespace) -> int:
    import trio

    async def run():
        async with _swarm(args) as swarm:
            return await swarm.peers()

    from .peer.chain import coverage

    by_id: dict[str, dict] = {}
    adverts = [peer.advert for peer in trio.run(run)]
    for ad in adverts:
        for m in ad.models:
            row = by_id.setdefault(m.model_id, {"alias": m.alias, "model_id": m.model_id, "quantization": m.quantization,
                                                "peers": 0, "whole": 0, "total_blocks": m.total_blocks})
            row["peers"] += 1
            row["whole"] += m.whole
    for row in by_id.values():  # shards: is every block held by someone (a chain can answer)?
        counts = coverage(adverts, row["model_id"], row["total_blocks"])
        row["fewest_copies_per_block"] = min(counts, default=0)
        row["covered"] = bool(counts) and min(counts) > 0
    rows = sorted(by_id.values(), key=lambda r: -r["peers"])
    if args.json:
        _out(rows)
    elif not rows:
        print("no models announced in the swarm yet", file=sys.stderr)
    for r in rows if not args.json else []:
        shards = r["peers"] - r["whole"]
        how = (f"{r['whole']} whole" + (f", {shards} shard peer(s)" if shards else "") +
               ("" if r["covered"] else f"; NOT fully covered (blocks missing of {r['total_blocks']})") +
               (f"; every block held {r['fewest_copies_per_block']}x or more" if shards and r["covered"] else ""))
        print(f"{r['alias']:12} {r['model_id'][:12]}  {r['quantization']:8} {r['peers']} peer(s): {how}")
    return 0


def _pick_model(spec: str, settings: Settings, offered_mb: int, n_ctx: int, slots: int):
    from .peer.serve import pick_model

    with _ByteBar("hashing model (once per file)") as progress:
        return pick_model(spec, settings.models_dir, settings.cache_dir, offered_mb, n_ctx, slots, progress)


def _offered(max_vram_mb: int | None):
    from .peer.device import detect_device, offered_memory_mb

    if max_vram_mb is not None and max_vram_mb <= 0:
        raise UsageError("--max-vram-mb must be positive")
    device = detect_device(max_vram_mb)
    return device, offered_memory_mb(device, max_vram_mb)


def _describe_choice(choice) -> list[str]:
    from .models.quant import tier

    lines = [f"{'':2}{'quantization':13} {'tier':>4} {'file MB':>8} {'needs MB':>8}  file"]
    for c, est in sorted(choice.candidates, key=lambda ce: -ce[1].total_mb):
        mark = "*" if c.path == choice.chosen.path else " "
        lines.append(f"{mark:2}{c.quantization:13} {tier(c.quantization):>4} {est.weights_mb:>8} {est.total_mb:>8}  "
                     f"{Path(c.path).name}")
    lines.append(f"* chosen: the best quality that fits the {choice.offered_mb} MB offered")
    return lines


def cmd_models_info(args: argparse.Namespace) -> int:
    from .models.quant import estimate_memory

    settings = _settings(args)
    device, offered = _offered(args.max_vram_mb)
    info, choice = _pick_model(args.model, settings, offered, args.ctx, args.slots)
    est = estimate_memory(info, args.ctx, args.slots)
    memory = {"weights_mb": est.weights_mb, "kv_cache_mb": est.kv_cache_mb, "buffers_mb": est.buffers_mb,
              "total_mb": est.total_mb, "ctx": args.ctx, "slots": args.slots, "offered_mb": offered,
              "device": device.kind}
    if args.json:
        out = info.to_dict() | {"memory": memory}
        if choice:
            out["candidates"] = [{"path": c.path, "quantization": c.quantization, "needs_mb": e.total_mb,
                                  "fits": e.total_mb <= offered} for c, e in choice.candidates]
        _out(out)
        return 0
    if choice:
        print("\n".join(_describe_choice(choice)) + "\n")
    d = info.to_dict()
    for key in ("alias", "name", "architecture", "blocks", "context_length", "embedding_length", "head_count",
                "head_count_kv", "vocab_size", "quantization", "size_bytes", "has_chat_template", "model_id", "path"):
        print(f"{key:18} {d[key]}")
    print(f"{'memory':18} {est.total_mb} MB to serve {args.slots} slots of {args.ctx} tokens: weights "
          f"{est.weights_mb} + KV cache {est.kv_cache_mb} + buffers {est.buffers_mb} "
          f"({offered} MB offered by this {device.kind})")
    return 0


# --- keys -----------------------------------------------------------------------------------


def cmd_keys_new_swarm_key(args: argparse.Namespace) -> int:
    from .swarmkey import write_new

    path = args.path or _settings(args).data_dir / "swarm.key"
    write_new(path)
    print(path)
    print("give this file (privately) to every peer of the swarm and start them with --swarm-key FILE",
          file=sys.stderr)
    return 0


# --- joining the swarm ----------------------------------------------------------------------


def _node_options(args: argparse.Namespace, settings: Settings):
    from .peer.node import NodeOptions

    interval = getattr(args, "announce_interval", None) or 30.0
    if interval <= 0:
        raise UsageError("--announce-interval must be positive")
    ttl = getattr(args, "advert_ttl", None) or max(120.0, 4 * interval)
    if ttl <= interval:
        raise UsageError("--advert-ttl must be longer than --announce-interval")
    listen = args.listen or [settings.listen]
    _check_listen(listen)
    return NodeOptions(listen=listen, bootstrap=list(settings.bootstrap),
                       mdns=settings.mdns, ready_file=args.ready_file, announce_interval=interval, advert_ttl=ttl,
                       psk=_psk(settings))


def _check_listen(addrs: list[str]) -> None:
    """Each ``--listen`` address parses, and its port is free. py-libp2p listens with
    SO_REUSEPORT, so a second serve on a taken port would bind too and the two would steal
    each other's connections; a plain bind here fails on a taken port instead."""
    import socket

    for addr in addrs:
        parts = addr.strip("/").split("/")
        if len(parts) != 4 or parts[0] not in ("ip4", "ip6") or parts[2] != "tcp" or not parts[3].isdigit() \
                or int(parts[3]) > 65535:
            raise UsageError(f"--listen {addr!r} is not a listen address; e.g. /ip4/127.0.0.1/tcp/4001 "
                             "(tcp/0: any free port)")
        host, port = parts[1], int(parts[3])
        if port == 0:
            continue
        family = socket.AF_INET if parts[0] == "ip4" else socket.AF_INET6
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise UsageError(f"cannot listen on {host} port {port}: {exc.strerror or exc} (is another gputorrent "
                                 f"serve running there?); pick another port, or tcp/0 for any free one") from None


def _psk(settings: Settings) -> str | None:
    from .swarmkey import load

    return load(settings.swarm_key) if settings.swarm_key else None


def _swarm_settings(args: argparse.Namespace) -> Settings:
    return load_settings().with_overrides(
        identity=args.identity, bootstrap=args.bootstrap or None, mdns=False if args.no_mdns else None,
        swarm_key=args.swarm_key)


def _swarm(args: argparse.Namespace, **kw: Any):
    """The API's Swarm with this command's swarm flags (bootstrap, mDNS, swarm key, identity)."""
    from .api import Swarm

    settings = _swarm_settings(args)
    if not kw.get("peers") and not settings.bootstrap and not settings.mdns:
        raise UsageError("no way to find the swarm: give --bootstrap MULTIADDR (or GPUTORRENT_BOOTSTRAP), "
                         "or leave mDNS on to find peers on this network")
    return Swarm(list(settings.bootstrap), mdns=settings.mdns, identity=_identity(args, requester=True),
                 swarm_key=settings.swarm_key,
                 **kw)


def cmd_bootstrap(args: argparse.Namespace) -> int:
    import trio

    from .peer.node import run_node

    settings = _swarm_settings(args)
    opts = _node_options(args, settings)

    def on_ready(info: dict) -> None:
        print(f"bootstrap node {info['peer_id']} (DHT only, serves no model)", file=sys.stderr)
        for a in info["addrs"]:
            print(a, flush=True)
        print("give one of these to other peers with --bootstrap; press Ctrl-C to stop", file=sys.stderr)

    trio.run(lambda: run_node(_identity(args), opts, on_ready=on_ready))
    return 0


def cmd_peers(args: argparse.Namespace) -> int:
    import time

    import trio

    from .scoring.reputation import ReputationStore

    if args.reset or args.ban:
        store = ReputationStore(_swarm_settings(args).data_dir / "reputation.sqlite")
        try:
            for pid in args.reset or []:
                store.reset(pid)
                print(f"{pid}: breaker reset (and unbanned)", file=sys.stderr)
            for pid in args.ban or []:
                store.ban(pid)
                print(f"{pid}: banned (its breaker stays open until peers --reset)", file=sys.stderr)
        finally:
            store.close()
        return 0

    def render(peers) -> Any:
        from rich.table import Table
        from rich.text import Text

        from .api.rows import COLUMNS, cells

        table = Table(title=f"{len(peers)} peers" + (f" serving {args.model}" if args.model else ""))
        for col in COLUMNS + ("advert age",):
            table.add_column(col)
        now = time.time()
        for p in peers:
            age = now - p.advert.issued_at
            # Text, not str: names come from other peers' adverts and must not be read as markup.
            table.add_row(*(Text(v) for v in cells(p).values()), f"{age:.0f}s" if age < 120 else f"{age / 60:.0f}m")
        return table

    async def run() -> None:
        async with _swarm(args) as swarm:
            if not args.watch:
                peers = await swarm.peers(args.model, ping=not args.no_ping)
                if args.json:
                    print(json.dumps([p.to_dict() for p in peers]))
                else:
                    _console_out().print(render(peers))
                return
            from rich.live import Live

            with Live(render([]), console=_console_out(), auto_refresh=False) as live:
                while True:
                    live.update(render(await swarm.peers(args.model, ping=not args.no_ping)), refresh=True)
                    await trio.sleep(args.interval)

    trio.run(run)
    return 0


def _console_out():
    """stdout; when it is a pipe or a file, wide enough that no column is cut."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)


# --- serve ----------------------------------------------------------------------------------


def _serve_blocks(args: argparse.Namespace, info, offered_mb: int) -> tuple[int, int] | None:
    """``--blocks A:B``, or for ``auto`` as many blocks as fit in the memory offered, placed
    where the swarm holds the fewest copies (None: the whole model fits, serve it whole)."""
    from .models import ModelError
    from .models.quant import estimate_memory
    from .models.shards import coverage_of, parse_blocks, thinnest_range

    if info.blocks < 2:
        raise ModelError(f"{info.alias} has {info.blocks} block(s): nothing to shard")
    if args.blocks != "auto":
        return parse_blocks(args.blocks, info.blocks)
    per_block = estimate_memory(info, args.ctx, args.slots).total_mb / info.blocks
    width = int(offered_mb // max(per_block, 1e-9))
    if width >= info.blocks:
        _err(f"--blocks auto: the whole model fits in the {offered_mb} MB offered; serving it whole")
        return None
    if width < 1:
        raise ModelError(f"not even one block of {info.alias} (~{per_block:.0f} MB with this context) fits in the "
                         f"{offered_mb} MB offered; offer more (--max-vram-mb) or lower --ctx / --slots")
    held: list[tuple[int, int]] = []
    settings = _swarm_settings(args)
    if settings.bootstrap or settings.mdns:
        import trio

        async def lookup() -> None:
            async with _swarm(args) as swarm:
                for st in await swarm.peers(info.model_id):
                    held.extend((m.first_block, m.end_block) for m in st.advert.models
                                if m.model_id == info.model_id)

        try:
            trio.run(lookup)
        except Exception as exc:  # no swarm yet is fine: start from block 0
            _err(f"--blocks auto: could not look at the swarm ({exc}); placing blocks from the start")
    first, end = thinnest_range(coverage_of(held, info.blocks), width)
    _err(f"--blocks auto: serving blocks {first}:{end} of {info.blocks} ({width} fit in {offered_mb} MB; "
         f"the swarm's thinnest, from {len(held)} range(s) seen)")
    return first, end


def cmd_serve(args: argparse.Namespace) -> int:
    import trio

    from .models import CATALOG, ModelError, pull
    from .peer.faults import Fault
    from .peer.serve import ServeOptions, load_engine, serve

    settings = _swarm_settings(args)
    node_opts = _node_options(args, settings)  # a bad or taken --listen fails here, before any work
    if args.slots < 1 or args.slots > 64:
        raise UsageError("--slots must be between 1 and 64")
    if args.queue < 0:
        raise UsageError("--queue must be 0 or more")
    for flag, value in (("--threads", args.threads), ("--batch-threads", args.batch_threads)):
        if value is not None and not 1 <= value <= 256:
            raise UsageError(f"{flag} must be between 1 and 256")
    try:
        fault = Fault.parse(args.fault) if args.fault else None
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.n_gpu_layers is not None and args.n_gpu_layers < -1:
        raise UsageError("--n-gpu-layers is a count of layers, or -1 for all of them")
    if args.model.lower() in CATALOG:  # like `ollama run`: fetch a known model on first use
        with _ByteBar(f"fetching {args.model}") as progress:
            pull(args.model, settings.models_dir, progress=progress)
    device, offered = _offered(args.max_vram_mb)
    info, choice = _pick_model(args.model, settings, offered, args.ctx, args.slots)
    if choice:
        print("\n".join(_describe_choice(choice)), file=sys.stderr)
    if args.rate_limit < 0:
        raise UsageError("--rate-limit must be 0 (no limit) or more")
    allow = None
    if args.allow:
        from .identity import IdentityError, public_key_from_peer_id

        try:
            for pid in args.allow:
                public_key_from_peer_id(pid)
        except IdentityError as exc:
            raise UsageError(f"--allow: {exc}; give peer ids as 'gputorrent id' prints them") from exc
        allow = frozenset(args.allow)
    if fault and fault.kind.startswith("dht-"):
        node_opts.dht_fault = fault.kind.removeprefix("dht-")
    blocks = _serve_blocks(args, info, offered) if args.blocks else None
    opts = ServeOptions(node=node_opts, slots=args.slots, queue=args.queue, n_ctx=args.ctx,
                        n_threads=args.threads, n_threads_batch=args.batch_threads, name=args.name or "",
                        allow=allow, rate_limit=args.rate_limit,
                        first_frame_timeout=args.first_frame_timeout, fault=fault, n_gpu_layers=args.n_gpu_layers,
                        max_vram_mb=args.max_vram_mb, blocks=blocks)
    ident = _identity(args)

    from rich.progress import BarColumn, Progress, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  console=_console()) as bar:
        task = bar.add_task(f"loading {info.alias} ({info.size_bytes / 1e6:.0f} MB)", total=1.0)
        try:
            engine = load_engine(info, opts, device, progress=lambda p: bar.update(task, completed=p),
                                 cache_dir=settings.cache_dir)
        except Exception as exc:
            raise ModelError(str(exc)) from exc
    if device.kind == "gpu" and engine.n_gpu_layers != 0 and not engine.gpu_offload:
        _err("warning: found a GPU, but this llama-cpp-python build runs on the CPU only; reinstall it with "
             "CMAKE_ARGS=-DGGML_CUDA=on pip install --force-reinstall --no-cache-dir llama-cpp-python")
    from .liveview import StatusView

    view = StatusView(json_log=args.log_format == "json", live=sys.stderr.isatty())

    def on_ready(ready: dict) -> None:
        where = (f"{device.name}, {device.vram_free_mb} MB VRAM offered, {engine.n_gpu_layers} layers on the GPU"
                 if device.kind == "gpu" else f"{device.name}, {device.cores} cores")
        what = f"blocks {blocks[0]}:{blocks[1]} of {info.alias}" if blocks else info.alias
        view.ready(ready, f"serving {what} ({info.short_id}) as {ready['peer_id']}\n"
                          f"  on {where}; {opts.slots} slots, context {engine.n_ctx}, {ready['tokens_per_s']} "
                          f"tokens/s measured; announced every {opts.node.announce_interval:g}s\npress Ctrl-C to stop")
        for a in ready["addrs"]:
            print(a, flush=True)

    try:
        server = trio.run(partial(serve, ident, info, engine, opts, device, on_ready, on_event=view.event,
                                  watch=view.watch))
    finally:
        engine.close()
    s = server.stats
    print(f"stopped: {s.served} answers, {s.tokens} tokens, {s.refused} refused, {s.failed} failed", file=sys.stderr)
    return 0


# --- tui ------------------------------------------------------------------------------------


def cmd_tui(args: argparse.Namespace) -> int:
    from .tui import SwarmApp

    if args.interval <= 0:
        raise UsageError("--interval must be positive")
    params = {"temperature": args.temperature, "max_tokens": args.max_tokens}
    SwarmApp(_swarm(args, watch_interval=args.interval), model=args.model, params=params).run()
    return 0


# --- gateway --------------------------------------------------------------------------------


def cmd_gateway(args: argparse.Namespace) -> int:
    import ipaddress
    import os

    import trio

    from .gateway import run_gateway
    from .peer.node import write_ready_file

    api_key = args.api_key or os.environ.get("GPUTORRENT_API_KEY") or None
    if not 0 <= args.port <= 65535:
        raise UsageError("--port must be between 0 and 65535")
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError as exc:
        raise UsageError(f"--host must be an IP address (or localhost): {exc}") from exc
    if not loopback and not api_key:
        _err("warning: listening beyond this machine without --api-key: anyone who reaches this port can use "
             "the swarm through you")
    swarm = _swarm(args)

    def on_ready(urls: list[str]) -> None:
        url = urls[0]
        if args.ready_file:
            write_ready_file(args.ready_file, {"url": url, "peer_id": swarm.peer_id})
        print(f"gateway to the swarm on {url}", file=sys.stderr)
        print(f"  OpenAI clients: base_url={url}/v1" + (" with api_key=<your key>" if api_key else ""),
              file=sys.stderr)
        print(f"  Ollama clients: OLLAMA_HOST={url}", file=sys.stderr)
        print("press Ctrl-C to stop", file=sys.stderr)
        print(url, flush=True)

    trio.run(partial(run_gateway, swarm, host=args.host, port=args.port, api_key=api_key,
                     default_model=args.model, on_ready=on_ready))
    if args.ready_file:
        Path(args.ready_file).unlink(missing_ok=True)
    print("gateway stopped", file=sys.stderr)
    return 0


# --- ask ------------------------------------------------------------------------------------


def cmd_ask(args: argparse.Namespace) -> int:
    import trio

    from .api import Finished, Text
    from .api.swarm import params_from
    from .peer.asker import AskFailed
    from .peer.choose import explain
    from .scoring import Weights

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise UsageError("the prompt is empty; give it as an argument or pipe it in with '-'")
    gen = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
           "top_k": args.top_k, "seed": args.seed, "stop": args.stop or []}
    try:
        params_from(**gen)
    except ValueError as exc:
        raise UsageError(_flag_message(exc)) from exc
    try:
        weights = Weights.parse(args.weights) if args.weights else Weights()
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.choose_top < 1:
        raise UsageError("--choose-top must be 1 or more")
    if args.attempts is not None and args.attempts < 1:
        raise UsageError("--attempts must be 1 or more")
    if not (args.deadline > 0 and args.stall_timeout > 0):
        raise UsageError("--deadline and --stall-timeout must be positive numbers of seconds")
    if not 0.0 <= args.spot_check <= 1.0:
        raise UsageError("--spot-check is a probability, between 0 and 1")
    streamed = not args.json
    swarm = _swarm(args, peers=args.peer or (), weights=weights, choose_top=args.choose_top,
                   attempts=args.attempts, stall_timeout=args.stall_timeout, deadline=args.deadline)

    async def run():
        async with swarm:
            plan = None
            if not args.peer:
                plan = await swarm.rank(args.model)
                if args.explain and plan.chain:
                    from .peer.chain import explain_chain

                    print(explain_chain(plan.chain), file=sys.stderr)
                elif args.explain:
                    print(explain(plan.considered, plan.order[0].peer_id, weights, args.choose_top), file=sys.stderr)
            async for ev in swarm.stream(prompt, model=args.model, system=args.system, raw=args.raw, plan=plan,
                                         verify=args.verify, spot_check=args.spot_check, **gen):
                if isinstance(ev, Text) and streamed:
                    sys.stdout.write(ev.text)
                    sys.stdout.flush()
                elif isinstance(ev, Finished):
                    return ev.answer
        raise AskFailed("the answer ended without a receipt", [])

    try:
        answer = trio.run(run)
    except AskFailed as exc:
        if streamed and exc.partial_text:
            print()
        if args.json:
            from dataclasses import asdict

            _out({"error": str(exc), "attempts": [asdict(a) for a in exc.attempts], "text": exc.partial_text})
        raise
    if args.json:
        _out(answer.to_dict())
    else:
        print()
        if answer.spot_check:
            print(_describe_check(answer.spot_check), file=sys.stderr)
    return 0


def _describe_check(check) -> str:
    if check.agreed is None:
        return f"spot check: {check.note}"
    if check.agreed:
        return f"spot check: {check.peers[0][:16]}… and {check.peers[1][:16]}… agree token for token"
    if check.blamed:
        return f"spot check: {check.blamed[:16]}… disagreed with the majority and loses reputation"
    return f"spot check: disagreement; {check.note}"


_FLAG_OF = {"max_tokens": "--max-tokens", "temperature": "--temperature", "top_p": "--top-p",
            "top_k": "--top-k", "seed": "--seed", "stop": "--stop"}


def _flag_message(exc: Exception) -> str:
    msg = str(exc)
    for field, flag in _FLAG_OF.items():
        msg = msg.replace(f"`$.{field}`", flag).replace(f"$.{field}", flag)
    return msg


# --- the parser -----------------------------------------------------------------------------


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where there is one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS) or "[default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--identity", type=Path, metavar="PATH",
                        help="Ed25519 key file (created 0600 on first use). Default, in the user data dir: "
                             "identity.key for serve and bootstrap, requester.key for the rest, so "
                             "serving and asking on one machine are two peers")

    swarm = argparse.ArgumentParser(add_help=False, parents=[common])
    swarm.add_argument("--bootstrap", action="append", metavar="MULTIADDR",
                       help="a peer to join the swarm by (repeatable; also GPUTORRENT_BOOTSTRAP, or "
                            "bootstrap = [...] in config.toml)")
    swarm.add_argument("--no-mdns", action="store_true", help="do not look for peers on the local network")
    swarm.add_argument("--swarm-key", type=Path, metavar="FILE",
                       help="join the private swarm of this key (peers without it cannot connect); "
                            "make one with: gputorrent keys new-swarm-key")

    def listening(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--listen", action="append", metavar="MULTIADDR",
                        help="address to listen on (repeatable); /ip4/0.0.0.0/tcp/4001 accepts other machines "
                             "[default: /ip4/127.0.0.1/tcp/0]")
        sp.add_argument("--ready-file", type=Path, metavar="PATH",
                        help="write {peer_id, addrs, …} as JSON here once ready; removed on stop")

    p = argparse.ArgumentParser(
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

    s = sub.add_parser("id", parents=[common], help="print this node's peer id",
                       description="Print this node's peer id (creating its key on first run).")
    s.add_argument("--json", action="store_true", help="print peer id, public key and key file as JSON")
    s.set_defaults(func=cmd_id)

    m = sub.add_parser("models", help="fetch and inspect GGUF models",
                       description="Fetch, list and inspect GGUF models.")
    msub = m.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    s = msub.add_parser("pull", parents=[common], help="fetch a known model (e.g. smollm2) into the cache",
                        description="Fetch a known model into the user cache and verify its sha256. "
                                    "Does nothing when it is already there.")
    s.add_argument("alias", help="model alias, e.g. smollm2")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.set_defaults(func=cmd_models_pull)
    s = msub.add_parser("list", parents=[swarm], help="list models in the local cache (or in the swarm)")
    s.add_argument("--swarm", action="store_true", help="list the models peers announce, with how many serve each")
    s.add_argument("--json", action="store_true", help="print as JSON")
    s.set_defaults(func=cmd_models_list)
    s = msub.add_parser("info", parents=[common], help="show a GGUF's metadata, model id and memory need",
                        description="Show architecture, blocks, context, quantization, size, the model id "
                                    "(sha256 of the file) and the memory serving it needs (weights + KV cache "
                                    "for the context and slots + buffers). Given a directory of quantizations, "
                                    "show which one 'serve' would choose here.", formatter_class=_Help)
    s.add_argument("model", help="alias (smollm2), path to a .gguf file, or a directory of quantizations")
    s.add_argument("--ctx", type=int, default=2048, help="context window per slot, as for serve")
    s.add_argument("--slots", type=int, default=4, help="slots, as for serve")
    s.add_argument("--max-vram-mb", type=int, metavar="MB", help="memory offered, as for serve [default: all free]")
    s.add_argument("--json", action="store_true", help="print as JSON")
    s.set_defaults(func=cmd_models_info)

    k = sub.add_parser("keys", help="make keys for private swarms", description="Make keys for private swarms.")
    ksub = k.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    s = ksub.add_parser("new-swarm-key", parents=[common], help="create a new swarm key file (mode 0600)",
                        description="Create a random swarm key (libp2p pre-shared key, swarm.key format). Peers "
                                    "started with --swarm-key FILE connect only to peers holding the same key.")
    s.add_argument("path", nargs="?", type=Path, help="where to write it [default: swarm.key in the user data dir]")
    s.set_defaults(func=cmd_keys_new_swarm_key)

    s = sub.add_parser("serve", parents=[swarm], help="donate this machine: serve a model to the swarm",
                       description="Load a GGUF model, join the swarm, announce it in the DHT and answer "
                                   "requests until Ctrl-C. Prints this peer's full addresses.",
                       formatter_class=_Help)
    s.add_argument("--model", required=True,
                   help="alias (smollm2, fetched on first use), path to a .gguf, or a directory of one model's "
                        "quantizations (the best that fits the memory offered is served)")
    listening(s)
    s.add_argument("--name", help="a name for this peer in listings [default: the host name]")
    s.add_argument("--announce-interval", type=float, default=30.0, help="seconds between adverts")
    s.add_argument("--advert-ttl", type=float, help="seconds an advert stays valid [default: max(120, 4 x interval)]")
    s.add_argument("--slots", type=int, default=4, help="answers generated at once (continuous batching)")
    s.add_argument("--queue", type=int, default=8, help="requests waiting beyond the slots before 'busy'")
    s.add_argument("--ctx", type=int, default=2048, help="context window per slot, in tokens")
    s.add_argument("--threads", type=int, help="decode threads [default: all usable cores]")
    s.add_argument("--batch-threads", type=int, metavar="N",
                   help="threads for prompts and batched steps [default: --threads]; e.g. --threads 1 "
                        "--batch-threads 2 for shards sharing a machine with other hops")
    s.add_argument("--max-vram-mb", type=int, metavar="MB",
                   help="most memory to offer (VRAM on a GPU, RAM on a CPU); caps what is announced and which "
                        "quantization a --model DIR serves [default: all that is free]")
    s.add_argument("--n-gpu-layers", type=int, metavar="N",
                   help="layers to offload to the GPU; -1 for all [default: all when a GPU is found, else 0]")
    s.add_argument("--blocks", metavar="A:B|auto",
                   help="serve only blocks A to B-1 of the model (a shard); requesters chain shards that "
                        "together hold every block. 'auto' takes as many as fit in the memory offered, where "
                        "the swarm holds the fewest copies [default: the whole model]")
    s.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="'json' writes one JSON object per event (request accepted, done, busy, refused, "
                        "and a status every 10 s) to stderr, for log collectors")
    s.add_argument("--allow", action="append", metavar="PEER_ID",
                   help="serve only these requesters (repeatable); others get a signed refusal")
    s.add_argument("--rate-limit", type=int, default=120, metavar="N",
                   help="requests per minute from one requester before 'busy' (0: no limit)")
    s.add_argument("--fault", help=argparse.SUPPRESS)  # test-only misbehaviour, see peer/faults.py
    s.add_argument("--first-frame-timeout", type=float, default=10.0, help=argparse.SUPPRESS)  # for tests
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("bootstrap", parents=[swarm], help="run a DHT-only node for others to join by",
                       description="Run a node that serves no model and only takes part in the DHT, to give a "
                                   "swarm a stable address to join by. It holds no authority: any peer can do this.")
    listening(s)
    s.set_defaults(func=cmd_bootstrap, announce_interval=None, advert_ttl=None)

    s = sub.add_parser("peers", parents=[swarm], help="list the peers of the swarm",
                       description="List the peers the DHT knows, from their signed adverts: device, VRAM, "
                                   "models, load, tokens/s and the age of each advert.")
    s.add_argument("--model", help="only peers serving this model (alias or model id)")
    s.add_argument("--json", action="store_true", help="print the verified adverts as JSON")
    s.add_argument("--watch", action="store_true", help="keep the table up to date until Ctrl-C")
    s.add_argument("--no-ping", action="store_true", help="do not ping each peer for its RTT (no dials)")
    s.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes with --watch")
    s.add_argument("--reset", action="append", metavar="PEER",
                   help="close PEER's circuit breaker (and lift a ban); repeatable; no network needed")
    s.add_argument("--ban", action="append", metavar="PEER", help="never choose PEER again (until --reset)")
    s.set_defaults(func=cmd_peers)

    s = sub.add_parser("tui", parents=[swarm], help="watch the swarm live and chat with it, in the terminal",
                       description="A live view of the swarm: totals, a peers table (device, VRAM, models, load, "
                                   "RTT, your reputation and breaker for each), the selected peer's details, a chat "
                                   "pane that streams answers and shows who served them, and a log of joins, "
                                   "leaves, breaker changes and failovers. Keys: a ask, r refresh, b ban/unban the "
                                   "selected peer, m filter by model, q quit.")
    s.add_argument("--model", help="show and ask only this model (m cycles through the swarm's models)")
    s.add_argument("--interval", type=float, default=2.0, help="seconds between DHT crawls (default: 2)")
    s.add_argument("--temperature", type=float, default=0.7, help="sampling temperature for the chat (0: greedy)")
    s.add_argument("--max-tokens", type=int, default=256, help="most tokens per answer in the chat")
    s.set_defaults(func=cmd_tui)

    s = sub.add_parser("gateway", parents=[swarm], help="an OpenAI- and Ollama-compatible HTTP API to the swarm",
                       description="Serve the swarm over HTTP so existing clients work unchanged: OpenAI "
                                   "(/v1/chat/completions, /v1/completions, /v1/models; SSE streaming) and Ollama "
                                   "(/api/chat, /api/generate, /api/tags; NDJSON streaming). Prints its URL.",
                       epilog="examples:\n  gputorrent gateway --bootstrap /ip4/…/p2p/…\n"
                              "  OPENAI_BASE_URL=http://127.0.0.1:11434/v1 OPENAI_API_KEY=none python my_app.py\n"
                              "  OLLAMA_HOST=http://127.0.0.1:11434 ollama run smollm2 'Hello'",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=11434, help="port (default: 11434, Ollama's; 0 picks a free one)")
    s.add_argument("--api-key", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (or set GPUTORRENT_API_KEY); needed beyond loopback")
    s.add_argument("--model", help="model for requests that name none (default: what most peers serve)")
    s.add_argument("--ready-file", type=Path, help="write the URL as JSON here once listening")
    s.set_defaults(func=cmd_gateway)

    s = sub.add_parser("ask", parents=[swarm], help="ask the swarm; streams the answer",
                       description="Find peers serving the model in the DHT (or use --peer), stream the answer to "
                                   "stdout, and continue on another peer if one fails mid-answer.",
                       formatter_class=_Help)
    s.add_argument("prompt", help="the question; '-' reads it from stdin")
    s.add_argument("--peer", action="append", metavar="MULTIADDR",
                   help="ask this peer directly instead of looking in the DHT (repeatable: the rest are failover)")
    s.add_argument("--model", help="model alias or id the peer must serve [default: whatever it serves]")
    s.add_argument("--system", help="system message")
    s.add_argument("--raw", action="store_true", help="send the prompt as raw text, without the chat template")
    s.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate")
    s.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (deterministic), up to 5")
    s.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling, in (0, 1]")
    s.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest; 0 disables")
    s.add_argument("--seed", type=int, default=-1, help="sampling seed; -1 picks one")
    s.add_argument("--stop", action="append", metavar="TEXT", help="stop when this text appears (repeatable)")
    s.add_argument("--attempts", type=int, default=None,
                   help="most peers to try [default: every peer serving the model, until --deadline]")
    s.add_argument("--deadline", type=float, default=600.0, metavar="S",
                   help="seconds the whole answer may take, failovers included")
    s.add_argument("--stall-timeout", type=float, default=10.0,
                   help="seconds without a frame from the peer before failing over (a queued request gets one every second)")
    s.add_argument("--explain", action="store_true",
                   help="print each candidate's criteria, score, reputation and breaker, and why one was chosen")
    s.add_argument("--weights", metavar="W", help="scoring weights, e.g. vram=0.4,slots=0.3,rtt=0.2,speed=0.1 "
                                                  "(the default; they must sum to 1)")
    s.add_argument("--choose-top", type=int, default=3, metavar="N",
                   help="draw the peer among the N best (weighted by score) so requesters spread out; 1 = always the best")
    s.add_argument("--verify", action="store_true",
                   help="also send a small greedy request to a second peer with the same model id and compare")
    s.add_argument("--spot-check", type=float, default=0.05, metavar="P",
                   help="probability of that check when --verify is not given")
    s.add_argument("--json", action="store_true",
                   help="print one JSON object at the end (text, peer_id, model_id, usage, ttft_ms, "
                        "tokens_per_s, receipt_verified, attempts, spot_check) instead of streaming")
    s.set_defaults(func=cmd_ask)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .identity import IdentityError
    from .models import ModelError
    from .swarmkey import SwarmKeyError

    try:
        return args.func(args)
    except UsageError as exc:
        _err(str(exc))
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ModelError, IdentityError, SwarmKeyError, ValueError, OSError) as exc:
        _err(str(exc))
        return 1
    except Exception as exc:
        from .peer.asker import AskFailed
        from .peer.host import DialError

        from .api import SwarmError
        from .gateway.server import GatewayError

        if isinstance(exc, (AskFailed, DialError, SwarmError, GatewayError)):
            _err(str(exc))
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
