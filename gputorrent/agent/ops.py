"""What an ``ask`` does and says, as events: run by the agent for a thin command, and in-process
for ``--no-agent``, so that both print the same (``client.render`` prints them)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import asdict
from typing import Any

_FLAG_OF = {"max_tokens": "--max-tokens", "temperature": "--temperature", "top_p": "--top-p",
            "top_k": "--top-k", "seed": "--seed", "stop": "--stop"}


def flag_message(exc: Exception) -> str:
    """A parameter error in the words of the command's flags."""
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


def check_ask(req: dict[str, Any]) -> str:
    """The request's parameters as the swarm would take them; a usage message if not."""
    from ..wire import params_from

    try:
        params_from(**req["gen"])
    except (TypeError, ValueError) as exc:
        return flag_message(exc)
    return ""


async def ask_events(swarm: Any, req: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
    """The events of one ask on an open ``Swarm``: ``note`` (stderr lines), ``text`` (the
    answer as it streams), then ``done`` (the answer, and lines for stderr) or ``error``."""
    from ..api import Finished, SwarmError, Text
    from ..asking.asker import AskFailed
    from ..asking.choose import explain
    from ..identity import short_id

    usage = check_ask(req)
    if usage:
        yield {"t": "error", "usage": True, "message": usage}
        return
    try:
        plan = None
        if not req.get("peers"):
            plan = await swarm.rank(req.get("model"))
            if req.get("explain") and plan.chain:
                from ..asking.chain import explain_chain

                yield {"t": "note", "text": explain_chain(plan.chain)}
            elif req.get("explain"):
                from ..scoring import Weights

                weights = Weights.parse(req["weights"]) if req.get("weights") else Weights()
                yield {"t": "note", "text": explain(plan.considered, plan.order[0].peer_id, weights,
                                                    int(req.get("choose_top", 3)))}
        answer = None
        async for ev in swarm.stream(req["prompt"], model=req.get("model"), system=req.get("system"),
                                     raw=bool(req.get("raw")), plan=plan, verify=bool(req.get("verify")),
                                     spot_check=float(req.get("spot_check", 0.0)), **req["gen"]):
            if isinstance(ev, Text):
                yield {"t": "text", "text": ev.text}
            elif isinstance(ev, Finished):
                answer = ev.answer
        if answer is None:
            raise AskFailed("the answer ended without a receipt", [])
    except AskFailed as exc:
        yield {"t": "error", "message": str(exc), "partial": exc.partial_text, "kind": exc.kind,
               "attempts": [asdict(a) for a in exc.attempts]}
        return
    except (SwarmError, ValueError) as exc:
        yield {"t": "error", "message": str(exc)}
        return
    notes = []
    if req.get("explain"):
        notes.append("reached " + ", then ".join(f"{short_id(a.peer_id)} {a.path or 'not at all'} ({a.outcome})"
                                                 for a in answer.attempts))
    check = answer.spot_check
    if check and (req.get("verify") or check.agreed is not None):
        # A random check (--spot-check) that found no second peer is no news: --json has it.
        notes.append(describe_check(check))
    yield {"t": "done", "answer": answer.to_dict(), "notes": notes}


async def listing(swarm: Any, req: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of a listing op: ``peers`` or ``models``."""
    max_age = float(req.get("max_age") or 0.0)
    if req.get("op") == "models":
        return await models_rows(swarm, max_age)
    return await peers_rows(swarm, req.get("model"), bool(req.get("ping", True)), max_age)


async def peers_rows(swarm: Any, model: str | None, ping: bool, max_age: float = 0.0) -> list[dict[str, Any]]:
    """``gputorrent peers``'s rows: the table's cells, the advert's age and the ``--json`` object
    of each live peer (made where the Swarm is; printed by ``cli/peers.py``)."""
    from ..api.rows import cells

    return [{"cells": cells(p), "issued_at": p.advert.issued_at, "json": p.to_dict()}
            for p in await swarm.peers(model, ping=ping, max_age=max_age)]


async def models_rows(swarm: Any, max_age: float = 0.0) -> list[dict[str, Any]]:
    """``gputorrent models list --swarm``'s rows: each model id announced, how many peers serve it
    (whole and in shards), and whether its shards cover every block (a chain can answer)."""
    from ..asking.chain import coverage

    adverts = [peer.advert for peer in await swarm.peers(max_age=max_age)]
    by_id: dict[str, dict[str, Any]] = {}
    for ad in adverts:
        for m in ad.models:
            row = by_id.setdefault(m.model_id, {"alias": m.alias, "model_id": m.model_id,
                                                "quantization": m.quantization, "peers": 0, "whole": 0,
                                                "total_blocks": m.total_blocks})
            row["peers"] += 1
            row["whole"] += m.whole
    for row in by_id.values():
        counts = coverage(adverts, row["model_id"], row["total_blocks"])
        row["fewest_copies_per_block"] = min(counts, default=0)
        row["covered"] = bool(counts) and min(counts) > 0
    return sorted(by_id.values(), key=lambda r: -r["peers"])
