"""Spot checks: what signatures cannot show.

A signature proves who produced tokens, not that they came from the model. So now and then
(always with ``--verify``) a small deterministic request (greedy, fixed seed) goes to two peers
with the same model id; identical weights and greedy decoding must give identical token ids.
A disagreement goes to a third peer, and the odd one out is blamed for an integrity failure.

A chain of shards is checked the same way (``spot_check_chain``): the check request through the
answer's own hops, then through a whole peer, or else a chain sharing no peer with it. Where
the two differ, each hop's blocks are given to the other side's holders in turn, the rest of
the chain kept: the range whose swap changes the answer is where they disagree, and a third
holder of that range settles who lied. Two holders of a range and no third: the disagreement
is reported, and nobody is blamed (neither can be told from the other).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from .. import wire
from ..net.host import DialError, connect
from .asker import new_request_id
from .client import AttemptFailed, run_attempt

if TYPE_CHECKING:
    from .chain import Hop

Planner = Callable[[set[str], int, int], Awaitable["list[Hop] | None"]]  # (exclude, first, end) -> hops

CHECK_PARAMS = wire.Params(max_tokens=16, temperature=0.0, seed=0)


def check_params(base: wire.InferRequest) -> wire.Params:
    """The check's greedy parameters, under the answer's own grammar: like is compared with like
    (a JSON-mode answer is checked in JSON mode)."""
    return msgspec.structs.replace(CHECK_PARAMS, grammar=base.params.grammar)


@dataclass(slots=True)
class SpotCheck:
    peers: list[str] = field(default_factory=list)  # peer ids whose answers were compared
    agreed: bool | None = None  # None: fewer than two peers could answer
    blamed: str | None = None
    note: str = ""
    blocks: list[int] = field(default_factory=list)  # a chain's: the range whose holders disagreed


async def _check(host: Any, addr: str | Sequence[str], base: wire.InferRequest) -> Any:
    """The check request answered by the peer at ``addr`` (an AttemptResult), or None."""
    try:
        peer_id = await connect(host, addr)
        req = wire.InferRequest(request_id=new_request_id(), model=base.model, messages=base.messages,
                                prompt=base.prompt, params=check_params(base))
        return await run_attempt(host, peer_id, req, lambda ids, text: None)
    except (DialError, AttemptFailed):
        return None


async def _ids(host: Any, addr: str | Sequence[str], base: wire.InferRequest) -> tuple[str, list[int]] | None:
    res = await _check(host, addr, base)
    return (res.peer_id, res.ids) if res is not None else None


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


class _NoReplacement:
    """A check runs through exactly the hops given: a hop that fails ends it."""

    async def plan(self, tried: set[str], model_id: str, first: int, end: int) -> None:
        return None


async def _chain_text(host: Any, hops: list[Hop], base: wire.InferRequest) -> str | None:
    from .asker import AskFailed
    from .chain import ask_chain

    try:
        answer = await ask_chain(host, _NoReplacement(), model_id=hops[0].model_id,
                                 total_blocks=hops[0].total_blocks, messages=base.messages, prompt=base.prompt,
                                 params=check_params(base), first_plan=hops, deadline_s=CHAIN_CHECK_S)
    except AskFailed:
        return None
    return answer.text


def _tiling(hops: Sequence[Hop], first: int, end: int) -> list[Hop] | None:
    """The hops of ``hops`` that compute exactly blocks [first, end), if they do."""
    inside = [h for h in hops if first <= h.first and h.end <= end]
    at = first
    for h in inside:
        if h.first != at:
            return None
        at = h.end
    return inside if inside and at == end else None


async def spot_check_chain(host: Any, hops: list[Hop], plan: Planner, base: wire.InferRequest,
                           whole: Sequence[str | Sequence[str]] = ()) -> SpotCheck:
    """Check a chain answer (``hops``: its chain) against a whole peer in ``whole``, or else a
    chain ``plan`` finds without its peers; find the range that disagrees and settle it."""
    check = SpotCheck(peers=[h.peer_id for h in hops])
    mine = {h.peer_id for h in hops}
    total = hops[-1].end
    a = await _chain_text(host, hops, base)
    if a is None:
        check.note = "the chain did not answer the check request"
        return check
    b, other = None, None
    for addr in whole:
        got = await _text(host, addr, base)
        if got is not None:
            check.peers.append(got[0])
            b = got[1]
            break
    if b is None and (other := await plan(mine, 0, total)):
        b = await _chain_text(host, other, base)
        check.peers += [h.peer_id for h in other]
    if b is None:
        check.note = "no whole peer and no chain without this chain's peers answered; nothing to compare"
        return check
    check.agreed = a == b
    if check.agreed:
        return check
    for k, hop in enumerate(hops):
        swap = _tiling(other, hop.first, hop.end) if other else None
        swap = swap or await plan(mine, hop.first, hop.end)
        if not swap:
            continue
        c = await _chain_text(host, [*hops[:k], *swap, *hops[k + 1:]], base)
        if c is None or c == a:
            continue
        check.blocks = [hop.first, hop.end]
        third = await plan(mine | {h.peer_id for h in swap}, hop.first, hop.end)
        d = await _chain_text(host, [*hops[:k], *third, *hops[k + 1:]], base) if third else None
        if d is None:
            check.note = (f"blocks {hop.first}:{hop.end} disagree between {hop.peer_id} and "
                          f"{', '.join(h.peer_id for h in swap)}; no third holder answered to settle it, "
                          "so nobody is blamed")
            return check
        check.peers += [h.peer_id for h in third]  # type: ignore[union-attr]
        if d == a and len(swap) == 1:
            check.blamed = swap[0].peer_id
        elif d == c:
            check.blamed = hop.peer_id
        else:
            check.note = f"blocks {hop.first}:{hop.end}: three holders, three answers; nobody blamed"
        return check
    check.note = "the answers differ but no one range's swap explains it; nobody blamed"
    return check


async def _text(host: Any, addr: str | Sequence[str], base: wire.InferRequest) -> tuple[str, str] | None:
    res = await _check(host, addr, base)
    return (res.peer_id, res.text) if res is not None else None


CHAIN_CHECK_S = 60.0  # one check request through a chain, at most
