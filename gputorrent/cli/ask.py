"""``gputorrent ask``: ask the swarm, streaming the answer, failing over mid-answer."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import GputorrentError
from ..limits import MAX_TOKENS
from . import types
from .common import Help, Parents, UsageError, agent_call, run_trio, swarm_of, use_agent


def register(sub: Any, parents: Parents) -> None:
    s = sub.add_parser("ask", parents=[parents.swarm, parents.agent], help="ask the swarm; streams the answer",
                       description="Find peers serving the model in the DHT (or use --peer), stream the answer to "
                                   "stdout, and continue on another peer if one fails mid-answer.",
                       epilog="examples:\n  gputorrent ask 'What is the capital of France?' --bootstrap /ip4/…/p2p/…\n"
                              "  echo 'Summarize: …' | gputorrent ask - --model smollm2 --temperature 0 --json\n",
                       formatter_class=type("H", (Help, argparse.RawDescriptionHelpFormatter), {}))
    s.add_argument("prompt", help="the question; '-' reads it from stdin")
    s.add_argument("--peer", action="append", metavar="MULTIADDR", type=types.peer_addr,
                   help="ask this peer directly instead of looking in the DHT (repeatable: the rest are failover)")
    s.add_argument("--model", help="model alias or id the peer must serve [default: whatever it serves]")
    s.add_argument("--system", help="system message")
    s.add_argument("--raw", action="store_true", help="send the prompt as raw text, without the chat template")
    s.add_argument("--max-tokens", type=types.int_range(1, MAX_TOKENS), default=256, help="most tokens to generate")
    s.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (deterministic), up to 5")
    s.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling, in (0, 1]")
    s.add_argument("--top-k", type=types.int_range(0, 1 << 17), default=40,
                   help="sample among the k likeliest; 0 disables")
    s.add_argument("--seed", type=types.int_range(-1, 2**32 - 1), default=-1, help="sampling seed; -1 picks one")
    s.add_argument("--stop", action="append", metavar="TEXT", help="stop when this text appears (repeatable)")
    s.add_argument("--attempts", type=types.int_range(1), default=None,
                   help="most peers to try [default: every peer serving the model, until --deadline]")
    s.add_argument("--deadline", type=types.positive_float, default=600.0, metavar="S",
                   help="seconds the whole answer may take, failovers included")
    s.add_argument("--stall-timeout", type=types.positive_float, default=10.0, metavar="S",
                   help="seconds without a frame from the peer before failing over (a queued request gets one "
                        "every second)")
    s.add_argument("--explain", action="store_true",
                   help="print each candidate's criteria, score, reputation and breaker, and why one was chosen")
    s.add_argument("--weights", metavar="W", help="scoring weights, e.g. vram=0.4,slots=0.3,rtt=0.2,speed=0.1 "
                                                  "(the default; they must sum to 1)")
    s.add_argument("--choose-top", type=types.int_range(1), default=3, metavar="N",
                   help="draw the peer among the N best (weighted by score) so requesters spread out; 1 = always "
                        "the best")
    s.add_argument("--verify", action="store_true",
                   help="also send a small greedy request to a second peer with the same model id and compare")
    s.add_argument("--spot-check", type=types.fraction, default=0.05, metavar="P",
                   help="probability of that check when --verify is not given")
    s.add_argument("--json", action="store_true",
                   help="print one JSON object at the end (text, peer_id, model_id, usage, ttft_ms, "
                        "tokens_per_s, receipt_verified, attempts, spot_check, chain) instead of streaming")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise UsageError("the prompt is empty; give it as an argument or pipe it in with '-'")
    req = {"op": "ask", "prompt": prompt, "model": args.model, "system": args.system, "raw": args.raw,
           "gen": {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
                   "top_k": args.top_k, "seed": args.seed, "stop": args.stop or []},
           "peers": args.peer or [], "attempts": args.attempts, "stall_timeout": args.stall_timeout,
           "deadline": args.deadline, "verify": args.verify, "spot_check": args.spot_check,
           "explain": args.explain, "weights": args.weights, "choose_top": args.choose_top}
    from ..agent.ops import check_ask

    usage = check_ask(req)
    if usage:
        raise UsageError(usage)
    # The agent asks with the machine's requester key and the default scoring; a command that
    # names its own key or scoring is a presence of its own, in-process.
    if use_agent(args) and not args.weights and args.choose_top == 3:
        from ..agent.client import render

        return render(agent_call(args, req), json_mode=args.json, error=GputorrentError, usage=UsageError)
    return _in_process(args, req)


def _in_process(args: argparse.Namespace, req: dict[str, Any]) -> int:
    from ..agent.client import AskPrinter
    from ..agent.ops import ask_events
    from ..scoring import Weights

    try:
        weights = Weights.parse(args.weights) if args.weights else Weights()
    except ValueError as exc:
        raise UsageError(f"--weights: {exc}") from exc
    swarm = swarm_of(args, peers=args.peer or (), weights=weights, choose_top=args.choose_top,
                     attempts=args.attempts, stall_timeout=args.stall_timeout, deadline=args.deadline)
    printer = AskPrinter(json_mode=args.json, error=GputorrentError, usage=UsageError)

    async def main() -> int:
        async with swarm:
            async for ev in ask_events(swarm, req):
                if printer.feed(ev) == 0:
                    return 0
        raise GputorrentError("the answer ended without a receipt")

    return int(run_trio(main))
