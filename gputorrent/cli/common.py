"""What every command shares: output, settings, identities, the swarm flags and progress bars.

Heavy modules (libp2p ~0.8 s, llama.cpp more) are imported inside the functions that need
them, so ``--help`` and ``gputorrent id`` stay fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Settings, load_settings
from ..errors import GputorrentError
from . import types

if TYPE_CHECKING:
    from ..api import Swarm
    from ..identity import Identity
    from ..serving.node import NodeOptions


class UsageError(GputorrentError):
    """Bad flags or parameters; exit code 2."""


def out(obj: Any) -> None:
    """One JSON document on stdout, for scripts."""
    print(json.dumps(obj, indent=2, default=str))


def err(msg: str) -> None:
    print(f"gputorrent: error: {msg}", file=sys.stderr)


def note(msg: str) -> None:
    print(msg, file=sys.stderr)


def settings_of(args: argparse.Namespace) -> Settings:
    """Settings with this command's flags over the config file and environment."""
    return load_settings().with_overrides(
        identity=getattr(args, "identity", None), bootstrap=getattr(args, "bootstrap", None) or None,
        mdns=False if getattr(args, "no_mdns", False) else None, swarm_key=getattr(args, "swarm_key", None))


def identity_of(args: argparse.Namespace, *, requester: bool = False) -> Identity:
    from ..identity import Identity

    settings = settings_of(args)
    return Identity.load_or_create(settings.requester_identity_path if requester else settings.identity_path)


def swarm_of(args: argparse.Namespace, *, agent: bool = False, **kw: Any) -> Swarm:
    """The API's Swarm with this command's swarm flags (bootstrap, mDNS, swarm key, identity);
    ``agent=True`` makes it the machine's agent's (started if none runs)."""
    from ..api import Swarm, SwarmError
    from ..api.swarm import check_findable

    settings = settings_of(args)
    try:
        check_findable(settings, kw.get("peers") or ())
    except SwarmError as exc:
        raise UsageError(str(exc)) from None
    identity_of(args, requester=True)  # an unusable key file fails here, before any work
    return Swarm(list(settings.bootstrap), mdns=settings.mdns, identity=settings.requester_identity_path,
                 swarm_key=settings.swarm_key, agent=agent, **kw)


def use_agent(args: argparse.Namespace) -> bool:
    """Whether this command goes through the agent: not with ``--no-agent``,
    GPUTORRENT_AGENT=off or an ``--identity`` of its own (a presence of its own)."""
    from ..agent.client import wanted

    return wanted(getattr(args, "no_agent", False)) and not getattr(args, "identity", None)


def agent_call(args: argparse.Namespace, req: dict[str, Any]) -> Any:
    """The agent's events for ``req``, with this command's swarm flags (the agent joins a
    bootstrap peer it does not know yet; a first command starts the agent with them)."""
    from ..agent.client import call, start_argv
    from ..agent.paths import AgentFiles

    settings = settings_of(args)
    problem = settings.unfindable(req.get("peers"))
    if problem:
        raise UsageError(problem)
    return call(AgentFiles.of(settings), {**req, "bootstrap": list(settings.bootstrap)}, start_argv(settings))


def agent_rows(args: argparse.Namespace, op: str, **fields: Any) -> list[dict[str, Any]]:
    """A listing's rows from the agent (``peers``, ``models``)."""
    got = list(agent_call(args, {"op": op, **fields}))
    last = got[-1] if got else {}
    if last.get("t") != "rows":
        raise GputorrentError(last.get("message", f"the agent sent no {op}"))
    return list(last["rows"])


def node_options(args: argparse.Namespace, settings: Settings) -> NodeOptions:
    """Options of a node that listens (serve, bootstrap); a taken port fails here, before any work."""
    from ..serving.node import NodeOptions

    interval = getattr(args, "announce_interval", None) or 30.0
    ttl = getattr(args, "advert_ttl", None) or max(120.0, 4 * interval)
    if ttl <= interval:
        raise UsageError("--advert-ttl must be longer than --announce-interval")
    listen = args.listen or [settings.listen]
    check_listen(listen)
    return NodeOptions(listen=listen, bootstrap=list(settings.bootstrap), mdns=settings.mdns,
                       ready_file=args.ready_file, announce_interval=interval, advert_ttl=ttl,
                       psk=_psk(settings), reachability=getattr(args, "reachability", "auto"),
                       relay_service=not getattr(args, "no_relay_service", False),
                       relay_policy=_relay_policy(getattr(args, "relay_limits", None)))


def _relay_policy(text: str | None) -> Any:
    from ..net.relay import RelayPolicy

    try:
        return RelayPolicy.parse(text or "")
    except ValueError as exc:
        raise UsageError(f"--relay-limits: {exc}") from exc


def check_listen(addrs: list[str]) -> None:
    """Each ``--listen`` address parses, and its port is free. py-libp2p listens with
    SO_REUSEPORT, so a second serve on a taken port would bind too and the two would steal
    each other's connections; a bind here with SO_REUSEADDR only fails on a port another socket
    listens on, and passes one a process that just stopped left in TIME_WAIT."""
    import socket

    for addr in addrs:
        try:
            types.listen_addr(addr)
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"--listen: {exc}") from None
        parts = addr.strip("/").split("/")
        host, port = parts[1], int(parts[3])
        if port == 0:
            continue
        family = socket.AF_INET if parts[0] == "ip4" else socket.AF_INET6
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise UsageError(f"cannot listen on {host} port {port}: {exc.strerror or exc} (is another gputorrent "
                                 f"serve running there?); pick another port, or tcp/0 for any free one") from None


def _psk(settings: Settings) -> str | None:
    from ..swarmkey import load

    return load(settings.swarm_key) if settings.swarm_key else None


def console(*, stderr: bool = True) -> Any:
    """A rich console: stderr for progress; stdout, when a pipe or a file, wide enough that no
    column is cut."""
    from rich.console import Console

    if stderr:
        return Console(stderr=True)
    return Console() if sys.stdout.isatty() else Console(width=200)


class ByteBar:
    """A rich progress bar over bytes on stderr, shown only once there is progress to show
    (a cached model or a cached model id print nothing); none at all when ``quiet``."""

    def __init__(self, description: str, *, quiet: bool = False) -> None:
        self.description = description
        self.quiet = quiet
        self._bar: Any = None
        self._task: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self._bar is None:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), console=console())
            self._task = self._bar.add_task(self.description, total=total)
            self._bar.start()
        self._bar.update(self._task, completed=done, total=total, description=self.description)

    def __enter__(self) -> ByteBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where there is one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if (action.default in (None, False, argparse.SUPPRESS) or "[default" in (action.help or "")
                or isinstance(action, argparse._StoreConstAction)):  # a flag: its help says what it does
            return action.help or ""
        return super()._get_help_string(action) or ""


class Parser(argparse.ArgumentParser):
    """Usage errors in one line (exit 2), pointing at the command's ``--help``."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


class Parents:
    """The flag groups commands share: ``identity`` (a key file) and ``swarm`` (how to join)."""

    def __init__(self) -> None:
        self.identity = argparse.ArgumentParser(add_help=False)
        self.identity.add_argument(
            "--identity", type=types.key_file, metavar="PATH",
            help="Ed25519 key file (created 0600 on first use). Default, in the user data dir: identity.key for "
                 "serve and bootstrap, requester.key for the rest, so serving and asking on one machine are two peers")
        self.swarm = argparse.ArgumentParser(add_help=False, parents=[self.identity])
        self.swarm.add_argument("--bootstrap", action="append", metavar="MULTIADDR", type=types.peer_addr,
                                help="a peer to join the swarm by (repeatable; also GPUTORRENT_BOOTSTRAP, or "
                                     "bootstrap = [...] in config.toml)")
        self.swarm.add_argument("--no-mdns", action="store_true", help="do not look for peers on the local network")
        self.swarm.add_argument("--swarm-key", type=types.existing_file, metavar="FILE",
                                help="join the private swarm of this key (peers without it cannot connect); "
                                     "make one with: gputorrent keys new-swarm-key")

        self.agent = argparse.ArgumentParser(add_help=False)
        self.agent.add_argument("--no-agent", action="store_true",
                                help="join the swarm in this process instead of through this machine's agent "
                                     "(also GPUTORRENT_AGENT=off); see: gputorrent agent --help")


def print_addrs(ready: dict[str, Any]) -> None:
    """A listening node's addresses on stdout, one a line (scripts read the first). Behind NAT
    with no relay a node has none anyone could dial: it prints its bare ``/p2p/<peer id>``, and
    says on stderr why."""
    addrs = ready["addrs"] or [f"/p2p/{ready['peer_id']}"]
    if not ready["addrs"]:
        note("behind NAT and no relay took a reservation: nobody outside this network can reach this node yet "
             "(it keeps trying the swarm's relays)")
    for a in addrs:
        print(a, flush=True)


def listening(sp: argparse.ArgumentParser) -> None:
    """The flags of a command that listens for peers."""
    sp.add_argument("--listen", action="append", metavar="MULTIADDR", type=types.listen_addr,
                    help="address to listen on (repeatable); /ip4/0.0.0.0/tcp/4001 accepts other machines "
                         "[default: /ip4/127.0.0.1/tcp/0]")
    sp.add_argument("--reachability", choices=("auto", "public", "private"), default="auto",
                    help="auto: ask peers to dial this node back; private (behind NAT): reach peers through relays, "
                         "run the DHT as a client, advertise relayed addresses only [default: auto]")
    sp.add_argument("--no-relay-service", action="store_true",
                    help="do not relay connections for peers behind NAT (a public node does by default, bounded: "
                         "docs/architecture.md, Reachability)")
    sp.add_argument("--relay-limits", metavar="K=N,...",
                    help="what this node's relay gives whom, e.g. per-ip=4,circuits-per-ip=2 (keys: reservations "
                         "[128], per-ip [8] (per /24 or /48), served-share [0.25] (kept for serving peers), circuits "
                         "[16] (per reserved peer), circuits-per-ip [4], circuits-per-key [2])")
    sp.add_argument("--ready-file", type=Path, metavar="PATH",
                    help="write {peer_id, addrs, …} as JSON here once ready; removed on stop")


GRACE_S = 5.0  # after Ctrl-C, what cleanup (closing connections, writing stores) may take


def run_trio(fn: Any, *args: Any, grace: float = GRACE_S) -> Any:
    """``trio.run(fn, *args)`` for a command a person may stop with Ctrl-C.

    Left to itself, trio raises KeyboardInterrupt at whatever line the main thread runs when
    SIGINT lands: in the main task (fine), or inside another task (py-libp2p's connection
    tasks, a producer of ours), whose nursery then unwinds from an arbitrary point and whose
    cleanup may wait on what was interrupted. A streaming ``ask`` once went on for more than
    20 s after Ctrl-C that way (not reproduced in 65 tries here; the mechanism is the one
    trio documents). Here SIGINT is received as an event instead: it cancels the work, which
    cleans up as it does for any cancellation, then KeyboardInterrupt is raised outside trio
    (exit 130). Cleanup gets ``grace`` seconds; after that, or at a second Ctrl-C, the process
    says so and exits 130 at once."""
    import os
    import signal
    import threading

    import trio

    interrupted = False
    result: list[Any] = []

    def leave() -> None:
        try:
            sys.stderr.write("\ninterrupted\n")
            sys.stderr.flush()
        finally:
            os._exit(130)

    async def main() -> None:
        work = trio.CancelScope()

        async def watch(signals: Any) -> None:  # outside ``work``: it still hears a second Ctrl-C
            nonlocal interrupted
            async for _ in signals:
                if interrupted:
                    leave()
                interrupted = True
                timer = threading.Timer(grace, leave)
                timer.daemon = True
                timer.start()
                work.cancel()

        with trio.open_signal_receiver(signal.SIGINT) as signals:
            async with trio.open_nursery() as n:
                n.start_soon(watch, signals)
                with work:
                    result.append(await fn(*args))
                n.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseExceptionGroup as group:  # the work's own error, as trio.run(fn) would raise it
        leaves = [e for e in _leaves(group) if not isinstance(e, trio.Cancelled)]
        if len(leaves) == 1:
            raise leaves[0] from None
        raise
    if interrupted:
        raise KeyboardInterrupt
    return result[0]


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out
