"""``gputorrent chat``: a conversation with the swarm in the terminal, like ``ollama run``.

Each turn sends the whole conversation so far (the swarm keeps no state between requests; a
peer may change from one turn to the next), streams the answer, and keeps it. Line editing and
history come from ``readline`` (history in the user data dir). ``input`` must run in the main
thread for that, so the swarm lives in a second thread running trio, for the whole session:
its connections and its view of the swarm stay warm between turns. Ctrl-C during an answer
stops that answer (what arrived is kept); at the prompt it says how to leave.
"""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Any

from ..limits import MAX_TOKENS
from . import types
from .common import Parents, swarm_of

HELP = """commands:
  /bye      leave (or Ctrl-D)
  /clear    start a new conversation (the system prompt stays)
  /help     this
Ctrl-C stops an answer; arrow keys edit the line and go through history."""


def register(sub: Any, parents: Parents) -> None:
    s = sub.add_parser("chat", parents=[parents.swarm, parents.agent],
                       help="talk with the swarm, turn after turn (like ollama run)",
                       description="An interactive chat: each question goes to the swarm with the conversation so "
                                   "far, and the answer streams back. /bye leaves, /clear starts over, /help lists "
                                   "the commands.",
                       epilog="examples:\n  gputorrent chat --model smollm2 --bootstrap /ip4/…/p2p/…\n"
                              "  gputorrent chat --system 'Answer in French.' --temperature 0\n",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--model", help="model alias or id [default: whatever the swarm serves]")
    s.add_argument("--system", help="system prompt, kept for the whole conversation")
    s.add_argument("--peer", action="append", metavar="MULTIADDR", type=types.peer_addr,
                   help="ask this peer directly instead of looking in the DHT (repeatable)")
    s.add_argument("--temperature", type=float, default=0.7, help="0 is greedy, up to 5 (default: 0.7)")
    s.add_argument("--max-tokens", type=types.int_range(1, MAX_TOKENS), default=512,
                   help="most tokens per answer (default: 512)")
    s.add_argument("--seed", type=types.int_range(-1, 2**32 - 1), default=-1, help="sampling seed; -1 picks one")
    s.set_defaults(func=run)


class _SwarmThread:
    """A ``Swarm`` open in a thread of its own running trio, taking one turn at a time."""

    def __init__(self, swarm: Any) -> None:
        import trio

        self.swarm = swarm
        self.token: Any = None
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._stop: Any = None
        self._thread = threading.Thread(target=lambda: trio.run(self._main), name="swarm", daemon=True)

    async def _main(self) -> None:
        import trio

        try:
            async with self.swarm:
                self.token = trio.lowlevel.current_trio_token()
                self._stop = trio.Event()
                self.ready.set()
                await self._stop.wait()
        except BaseException as exc:  # noqa: BLE001 (handed to the main thread, which reports it)
            self.error = exc
        finally:
            self.ready.set()

    def start(self) -> None:
        self._thread.start()
        self.ready.wait()
        if self.error is not None:
            raise self.error

    def turn(self, messages: list[dict[str, str]], params: dict[str, Any], model: str | None) -> tuple[str, bool]:
        """Stream one answer to stdout; (its text, whether it was stopped by Ctrl-C)."""
        import trio

        from ..api.swarm import answer_of

        got: list[str] = []
        # Made here, before the turn starts: a Ctrl-C that comes before the trio side enters it
        # still cancels this turn (cancelled before entry, it cancels on entry), never a past one.
        scope, ended = trio.CancelScope(), threading.Event()

        async def one() -> None:
            try:
                with scope:
                    events = self.swarm.stream(messages, model=model, **params)

                    def write(piece: Any) -> None:
                        got.append(piece.text)
                        sys.stdout.write(piece.text)
                        sys.stdout.flush()

                    await answer_of(events, write)
            finally:
                ended.set()

        try:
            trio.from_thread.run(one, trio_token=self.token)
        except KeyboardInterrupt:
            trio.from_thread.run_sync(scope.cancel, trio_token=self.token)
            ended.wait(5)  # its last tokens are written before the next prompt, not under it
            return "".join(got), True
        return "".join(got), scope.cancelled_caught

    def close(self) -> None:
        import trio

        if self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
            except trio.RunFinishedError:
                pass
        self._thread.join(timeout=10)


def _readline(history: Any) -> Any:
    """``readline`` with this command's history file, or None where there is none."""
    try:
        import readline
    except ImportError:  # Windows without pyreadline: plain input
        return None
    try:
        readline.read_history_file(history)
    except OSError:
        pass
    readline.set_history_length(1000)
    return readline


def run(args: argparse.Namespace) -> int:
    from ..api.swarm import params_from
    from ..asking.asker import AskFailed
    from .common import UsageError, err, settings_of, use_agent

    params = {"temperature": args.temperature, "max_tokens": args.max_tokens, "seed": args.seed}
    try:
        params_from(**params)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    settings = settings_of(args)
    history = settings.data_dir / "chat_history"
    history.parent.mkdir(parents=True, exist_ok=True)
    readline = _readline(history) if sys.stdin.isatty() else None
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages: list[dict[str, str]] = list(system)
    worker = _SwarmThread(swarm_of(args, agent=use_agent(args), peers=args.peer or ()))
    worker.start()
    print(f"chatting with the swarm{f' ({args.model})' if args.model else ''}: /help for commands, /bye to leave",
          file=sys.stderr)
    try:
        while True:
            try:
                line = input(">>> ")
            except EOFError:  # Ctrl-D
                print(file=sys.stderr)
                break
            except KeyboardInterrupt:
                print("\nUse Ctrl + d or /bye to exit.", file=sys.stderr)
                continue
            text = line.strip()
            if not text:
                continue
            if text in ("/bye", "/exit", "/quit"):
                break
            if text == "/clear":
                messages = list(system)
                print("a new conversation", file=sys.stderr)
                continue
            if text in ("/help", "/?"):
                print(HELP, file=sys.stderr)
                continue
            if text.startswith("/"):
                print(f"unknown command {text.split()[0]}; /help lists them", file=sys.stderr)
                continue
            messages.append({"role": "user", "content": line})
            try:
                answer, stopped = worker.turn(messages, params, args.model)
            except AskFailed as exc:
                print(file=sys.stdout)
                err(str(exc))
                messages.pop()  # nobody answered it: the next question stands alone
                continue
            print()
            if stopped:
                print("(stopped)", file=sys.stderr)
            messages.append({"role": "assistant", "content": answer})
    finally:
        if readline is not None:
            try:
                readline.write_history_file(history)
            except OSError:
                pass
        worker.close()
    return 0
