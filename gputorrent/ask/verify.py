"""Spot checks: what signatures cannot show.

A signature proves who produced tokens, not that they came from the model. So now and then
(always with ``--verify``) a small deterministic request (greedy, fixed seed) goes to two peers
with the same model id; identical weights and greedy decoding must give identical token ids.
A disagreement goes to a third peer, and the odd one out is blamed for an integrity failure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import wire
from ..net.host import DialError, connect
from .asker import new_request_id
from .client import AttemptFailed, run_attempt

CHECK_PARAMS = wire.Params(max_tokens=16, temperature=0.0, seed=0)


@dataclass(slots=True)
class SpotCheck:
    peers: list[str] = field(default_factory=list)  # peer ids whose answers were compared
    agreed: bool | None = None  # None: fewer than two peers could answer
    blamed: str | None = None
    note: str = ""


async def _ids(host: Any, addr: str | Sequence[str], base: wire.InferRequest) -> tuple[str, list[int]] | None:
    try:
        peer_id = await connect(host, addr)
        req = wire.InferRequest(request_id=new_request_id(), model=base.model, messages=base.messages,
                                prompt=base.prompt, params=CHECK_PARAMS)
        res = await run_attempt(host, peer_id, req, lambda ids, text: None)
    except (DialError, AttemptFailed):
        return None
    return peer_id, res.ids


async def spot_check(host: Any, addrs: Sequence[str | Sequence[str]], base: wire.InferRequest) -> SpotCheck:
    """Compare the greedy answers of the first two reachable peers in ``addrs`` (each a
    multiaddr or a peer's list of them, all serving ``base.model``, a model id); settle a
    disagreement with the next one."""
    check = SpotCheck()
    answers: list[tuple[str, list[int]]] = []
    remaining = list(addrs)
    while remaining and len(answers) < 2:
        got = await _ids(host, remaining.pop(0), base)
        if got:
            answers.append(got)
    check.peers = [p for p, _ in answers]
    if len(answers) < 2:
        check.note = "fewer than two peers with this model id answered; nothing to compare"
        return check
    (a, ids_a), (b, ids_b) = answers
    if ids_a == ids_b:
        check.agreed = True
        return check
    check.agreed = False
    while remaining:
        got = await _ids(host, remaining.pop(0), base)
        if not got:
            continue
        c, ids_c = got
        check.peers.append(c)
        if ids_c == ids_a:
            check.blamed = b
        elif ids_c == ids_b:
            check.blamed = a
        else:
            check.note = "three different answers: no majority, nobody blamed"
        return check
    check.note = "no third peer to settle the disagreement; nobody blamed"
    return check
