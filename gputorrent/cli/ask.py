"""``gputorrent ask``: ask the swarm, streaming the answer, failing over mid-answer."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..limits import MAX_TOKENS
from . import types
from .common import Help, Parents, UsageError, out, run_trio, swarm_of


def register(sub: Any, parents: Parents) -> None:
    s = sub.add_parser("ask", parents=[parents.swarm], help="ask the swarm; streams the answer",
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


_FLAG_OF = {"max_tokens": "--max-tokens", "temperature": "--temperature", "top_p": "--top-p",
            "top_k": "--top-k", "seed": "--seed", "stop": "--stop"}


def _flag_message(exc: Exception) -> str:
    msg = str(exc)
    for name, flag in _FLAG_OF.items():
        msg = msg.replace(f"`$.{name}`", flag).replace(f"$.{name}", flag)
    return msg


def describe_check(check: Any) -> str:
    if check.agreed is None:
        return f"spot check: {check.note}"
    if check.agreed:
        if len(check.peers) > 2:  # a chain: its hops, and a whole peer or another chain
            return f"spot check: the chain and a second computation ({len(check.peers)} peers) agree token for token"
        return f"spot check: {check.peers[0][:16]}… and {check.peers[1][:16]}… agree token for token"
    if check.blamed:
        where = f" (blocks {check.blocks[0]}:{check.blocks[1]})" if getattr(check, "blocks", None) else ""
        return f"spot check: {check.blamed[:16]}…{where} disagreed with the majority and loses reputation"
    return f"spot check: disagreement; {check.note}"


def run(args: argparse.Namespace) -> int:

    from ..api import Text
    from ..api.swarm import answer_of, params_from
    from ..asking.asker import AskFailed
    from ..asking.choose import explain
    from ..identity import short_id
    from ..scoring import Weights

    gen = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
           "top_k": args.top_k, "seed": args.seed, "stop": args.stop or []}
    try:
        params_from(**gen)
    except ValueError as exc:
        raise UsageError(_flag_message(exc)) from exc
    try:
        weights = Weights.parse(args.weights) if args.weights else Weights()
    except ValueError as exc:
        raise UsageError(f"--weights: {exc}") from exc
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise UsageError("the prompt is empty; give it as an argument or pipe it in with '-'")
    streamed = not args.json
    swarm = swarm_of(args, peers=args.peer or (), weights=weights, choose_top=args.choose_top,
                     attempts=args.attempts, stall_timeout=args.stall_timeout, deadline=args.deadline)

    async def main() -> Any:
        async with swarm:
            plan = None
            if not args.peer:
                plan = await swarm.rank(args.model)
                if args.explain and plan.chain:
                    from ..asking.chain import explain_chain

                    print(explain_chain(plan.chain), file=sys.stderr)
                elif args.explain:
                    print(explain(plan.considered, plan.order[0].peer_id, weights, args.choose_top), file=sys.stderr)
            events = swarm.stream(prompt, model=args.model, system=args.system, raw=args.raw, plan=plan,
                                  verify=args.verify, spot_check=args.spot_check, **gen)
            return await answer_of(events, write if streamed else None)

    def write(piece: Text) -> None:
        sys.stdout.write(piece.text)
        sys.stdout.flush()

    try:
        answer = run_trio(main)
    except AskFailed as exc:
        if streamed and exc.partial_text:
            print()
        if args.json:
            from dataclasses import asdict

            out({"error": str(exc), "attempts": [asdict(a) for a in exc.attempts], "text": exc.partial_text})
        raise
    if args.json:
        out(answer.to_dict())
    else:
        print()
        if args.explain:
            print("reached " + ", then ".join(f"{short_id(a.peer_id)} {a.path or 'not at all'} ({a.outcome})"
                                             for a in answer.attempts), file=sys.stderr)
        if answer.spot_check and (args.verify or answer.spot_check.agreed is not None):
            # A random check (--spot-check) that found no second peer is no news: --json has it.
            print(describe_check(answer.spot_check), file=sys.stderr)
    return 0
