"""The ``gputorrent`` command.

Each subcommand imports what it needs when it runs: ``import libp2p`` alone costs ~0.8 s and
llama.cpp more, and ``gputorrent id`` or ``--help`` should not pay for them.
Exit codes: 0 done, 1 the work failed (the message says what to do), 2 bad usage, 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import sys
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


def _identity(args: argparse.Namespace):
    from .identity import Identity

    return Identity.load_or_create(_settings(args).identity_path)


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


def _model_info(spec: str, settings: Settings):
    from .models import read_info, resolve

    path = resolve(spec, settings.models_dir)
    with _ByteBar("hashing model (once per file)") as progress:
        return read_info(path, settings.cache_dir, progress=progress)


def cmd_models_info(args: argparse.Namespace) -> int:
    info = _model_info(args.model, _settings(args))
    if args.json:
        _out(info.to_dict())
        return 0
    d = info.to_dict()
    for key in ("alias", "name", "architecture", "blocks", "context_length", "embedding_length", "head_count",
                "head_count_kv", "vocab_size", "quantization", "size_bytes", "has_chat_template", "model_id", "path"):
        print(f"{key:18} {d[key]}")
    return 0


# --- serve ----------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    import trio

    from .models import CATALOG, ModelError, pull
    from .peer.faults import Fault
    from .peer.serve import ServeOptions, load_engine, serve

    settings = _settings(args)
    if args.slots < 1 or args.slots > 64:
        raise UsageError("--slots must be between 1 and 64")
    if args.queue < 0:
        raise UsageError("--queue must be 0 or more")
    try:
        fault = Fault.parse(args.fault) if args.fault else None
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.model.lower() in CATALOG:  # like `ollama run`: fetch a known model on first use
        with _ByteBar(f"fetching {args.model}") as progress:
            pull(args.model, settings.models_dir, progress=progress)
    info = _model_info(args.model, settings)
    opts = ServeOptions(listen=args.listen or [settings.listen], slots=args.slots, queue=args.queue,
                        n_ctx=args.ctx, n_threads=args.threads, ready_file=args.ready_file, fault=fault)
    ident = _identity(args)

    from rich.progress import BarColumn, Progress, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  console=_console()) as bar:
        task = bar.add_task(f"loading {info.alias} ({info.size_bytes / 1e6:.0f} MB)", total=1.0)
        try:
            engine = load_engine(info, opts, progress=lambda p: bar.update(task, completed=p))
        except Exception as exc:
            raise ModelError(str(exc)) from exc

    def on_ready(ready) -> None:
        print(f"serving {info.alias} ({info.short_id}) as {ready.peer_id}", file=sys.stderr)
        print(f"  {opts.slots} slots, context {engine.n_ctx}, {ready.tokens_per_s} tokens/s measured", file=sys.stderr)
        for a in ready.addrs:
            print(a, flush=True)
        print("press Ctrl-C to stop", file=sys.stderr)

    try:
        server = trio.run(serve, ident, info, engine, opts, on_ready)
    finally:
        engine.close()
    s = server.stats
    print(f"stopped: {s.served} answers, {s.tokens} tokens, {s.refused} refused, {s.failed} failed", file=sys.stderr)
    return 0


# --- ask ------------------------------------------------------------------------------------


def cmd_ask(args: argparse.Namespace) -> int:
    import msgspec
    import trio

    from . import wire
    from .peer.asker import AskFailed, ask
    from .peer.host import running_host

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise UsageError("the prompt is empty; give it as an argument or pipe it in with '-'")
    if not args.peer:
        raise UsageError("no peer to ask; give --peer MULTIADDR (a serve process prints its address)")
    try:
        params = msgspec.convert(
            {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
             "top_k": args.top_k, "seed": args.seed, "stop": args.stop or []}, wire.Params)
    except msgspec.ValidationError as exc:
        raise UsageError(f"bad generation parameter: {_flag_message(exc)}") from exc
    messages = None if args.raw else (
        ([wire.ChatMessage("system", args.system)] if args.system else []) + [wire.ChatMessage("user", prompt)])
    ident = _identity(args)
    streamed = not args.json

    def on_text(text: str) -> None:
        if streamed:
            sys.stdout.write(text)
            sys.stdout.flush()

    async def run():
        async with running_host(ident) as host:
            return await ask(host, args.peer, messages=messages, prompt=prompt if args.raw else None,
                             model=args.model or "", params=params, on_text=on_text,
                             max_attempts=args.attempts, stall_timeout=args.stall_timeout)

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
    return 0


_FLAG_OF = {"max_tokens": "--max-tokens", "temperature": "--temperature", "top_p": "--top-p",
            "top_k": "--top-k", "seed": "--seed", "stop": "--stop"}


def _flag_message(exc: Exception) -> str:
    msg = str(exc)
    for field, flag in _FLAG_OF.items():
        msg = msg.replace(f"`$.{field}`", flag).replace(f"$.{field}", flag)
    return msg


# --- the parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--identity", type=Path, metavar="PATH",
                        help="Ed25519 key file (created 0600 on first use; default: user data dir)")

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
    s = msub.add_parser("list", parents=[common], help="list models in the local cache")
    s.add_argument("--json", action="store_true", help="print as JSON")
    s.set_defaults(func=cmd_models_list)
    s = msub.add_parser("info", parents=[common], help="show a GGUF's metadata and model id",
                        description="Show architecture, blocks, context, quantization, size and the model id "
                                    "(sha256 of the file) of an alias or a .gguf path.")
    s.add_argument("model", help="alias (smollm2) or path to a .gguf file")
    s.add_argument("--json", action="store_true", help="print as JSON")
    s.set_defaults(func=cmd_models_info)

    s = sub.add_parser("serve", parents=[common], help="donate this machine: serve a model to the swarm",
                       description="Load a GGUF model and answer requests from other peers until Ctrl-C. "
                                   "Prints this peer's full addresses (give one to 'ask --peer').",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--model", required=True, help="alias (smollm2, fetched on first use) or path to a .gguf")
    s.add_argument("--listen", action="append", metavar="MULTIADDR",
                   help="address to listen on (repeatable); use /ip4/0.0.0.0/tcp/4001 to accept other machines "
                        "[default: /ip4/127.0.0.1/tcp/0]")
    s.add_argument("--ready-file", type=Path, metavar="PATH",
                   help='write {"peer_id","addrs","models"} as JSON here once accepting requests')
    s.add_argument("--slots", type=int, default=4, help="answers generated at once (continuous batching)")
    s.add_argument("--queue", type=int, default=8, help="requests waiting beyond the slots before 'busy'")
    s.add_argument("--ctx", type=int, default=2048, help="context window per slot, in tokens")
    s.add_argument("--threads", type=int, help="decode threads [default: all usable cores]")
    s.add_argument("--fault", help=argparse.SUPPRESS)  # test-only misbehaviour, see peer/faults.py
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("ask", parents=[common], help="ask the swarm; streams the answer",
                       description="Send a prompt to a peer and stream the answer to stdout. With several "
                                   "--peer, a failure mid-answer continues on the next one.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("prompt", help="the question; '-' reads it from stdin")
    s.add_argument("--peer", action="append", metavar="MULTIADDR",
                   help="peer address ending in /p2p/PEER_ID (repeatable: the rest are failover)")
    s.add_argument("--model", help="model alias or id the peer must serve [default: whatever it serves]")
    s.add_argument("--system", help="system message")
    s.add_argument("--raw", action="store_true", help="send the prompt as raw text, without the chat template")
    s.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate")
    s.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (deterministic), up to 5")
    s.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling, in (0, 1]")
    s.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest; 0 disables")
    s.add_argument("--seed", type=int, default=-1, help="sampling seed; -1 picks one")
    s.add_argument("--stop", action="append", metavar="TEXT", help="stop when this text appears (repeatable)")
    s.add_argument("--attempts", type=int, default=3, help="peers to try before giving up")
    s.add_argument("--stall-timeout", type=float, default=10.0, help="seconds without a token before failing over")
    s.add_argument("--json", action="store_true",
                   help="print one JSON object at the end (text, peer_id, model_id, usage, ttft_ms, "
                        "tokens_per_s, receipt_verified, attempts) instead of streaming")
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

    try:
        return args.func(args)
    except UsageError as exc:
        _err(str(exc))
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ModelError, IdentityError, ValueError, OSError) as exc:
        _err(str(exc))
        return 1
    except Exception as exc:
        from .peer.asker import AskFailed
        from .peer.host import DialError

        if isinstance(exc, (AskFailed, DialError)):
            _err(str(exc))
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
