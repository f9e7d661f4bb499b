"""Ask a chain of shards: the requester drives blocks [0, total) of a model through the peers
holding them, hop by hop, and replaces a lost hop mid-answer.

Planning is a shortest path over block boundaries (``plan_chain``): an edge from ``a`` to ``b``
for each peer holding blocks [a, b), costed by what this requester measured of it. Driving is
requester-side: every step (a 512-position prompt chunk, then one position per token) goes
through each hop in turn, and the input of every step to every hop is kept for the session,
keyed by the block it enters. When a hop fails (drops, stalls, refuses, lies about its
signature), the blocks it held are re-planned from the live view, excluding every peer that
failed in this answer, and the new hops are replayed the session's recorded steps: exactly the
computation the lost hop did, step for step, so its KV cache (and, on the last hop, its sampler's
state, through forced samples) is what the lost one held. Greedy output is then token for token
that of an uninterrupted chain, and of one whole-model peer.
"""

from __future__ import annotations

import hashlib
import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from .. import protocol, wire
from ..dht.records import Advert, ServedModel
from ..net.host import DialError, connect, finish_stream, new_stream
from .asker import Answer, AskFailed, Attempt, _summary, new_request_id
from .client import (
    AttemptFailed,
    AttemptResult,
    IntegrityFailure,
    PeerBusy,
    RemoteError,
    Stalled,
    StreamBroken,
    _describe,
)


@dataclass(frozen=True, slots=True)
class Hop:
    """One peer and the blocks [first, end) it computes in a chain."""

    advert: Advert
    first: int
    end: int
    cost_ms: float = 0.0
    model_id: str = ""
    total_blocks: int = 0

    @property
    def peer_id(self) -> str:
        return self.advert.peer_id


def held_ranges(ad: Advert, model_id: str) -> list[ServedModel]:
    return [m for m in ad.models if m.model_id == model_id and m.end_block > m.first_block]


def plan_chain(adverts: list[Advert], model_id: str, first: int, end: int,
               cost: Callable[[Advert, ServedModel], float]) -> list[Hop] | None:
    """The cheapest chain of peers computing blocks [first, end) of ``model_id``, or None.

    Dijkstra over block boundaries; each peer's range is an edge. A shard computes from its
    first block on (its input is the residual entering that block), so an edge starts exactly
    at a range's first block; a whole-model peer is not an edge (it is asked whole).
    """
    edges: dict[int, list[tuple[int, float, Advert, int]]] = {}
    for ad in adverts:
        for m in held_ranges(ad, model_id):
            whole = m.first_block == 0 and m.end_block == m.total_blocks
            if first <= m.first_block and m.end_block <= end and not whole:
                edges.setdefault(m.first_block, []).append((m.end_block, cost(ad, m), ad, m.total_blocks))
    best: dict[int, float] = {first: 0.0}
    back: dict[int, tuple[int, Advert, float, int]] = {}
    heap = [(0.0, first)]
    while heap:
        d, at = heapq.heappop(heap)
        if at == end:
            break
        if d > best.get(at, float("inf")):
            continue
        for to, c, ad, total in edges.get(at, []):
            if d + c < best.get(to, float("inf")):
                best[to] = d + c
                back[to] = (at, ad, c, total)
                heapq.heappush(heap, (d + c, to))
    if end not in best:
        return None
    hops: list[Hop] = []
    at = end
    while at != first:
        prev, ad, c, total = back[at]
        hops.append(Hop(ad, prev, at, round(c, 2), model_id, total))
        at = prev
    return hops[::-1]


def coverage(adverts: list[Advert], model_id: str, total: int) -> list[int]:
    """How many live peers hold each block of the model (whole-model peers included)."""
    counts = [0] * total
    for ad in adverts:
        for m in held_ranges(ad, model_id):
            for b in range(m.first_block, min(m.end_block, total)):
                counts[b] += 1
    return counts


def explain_chain(hops: list[Hop]) -> str:
    """The chain ``--explain`` shows: each hop's blocks, peer and cost, and the total."""
    from ..identity import short_id

    lines = [f"no peer serves the model whole: a chain of {len(hops)} shard peers "
             f"(the cheapest path over block boundaries; cost = measured ms per token as a hop, else the "
             f"ping's RTT plus its share of {hops[0].total_blocks if hops else 0} blocks, / reputation)",
             f"{'blocks':>9}  {'peer':12} {'name':12} {'cost ms':>8}"]
    for h in hops:
        lines.append(f"{h.first:>4}:{h.end:<4}  {short_id(h.peer_id):12} {h.advert.name[:12]:12} {h.cost_ms:8.1f}")
    lines.append(f"total {sum(h.cost_ms for h in hops):.1f} ms per token (estimated); a lost hop is replaced by "
                 "another peer holding its blocks and replayed the session")
    return "\n".join(lines)


class ChainSource(Protocol):
    async def plan(self, tried: set[str], model_id: str, first: int, end: int) -> list[Hop] | None:
        """The cheapest chain for blocks [first, end), without peers in ``tried``."""
        ...


@dataclass(slots=True)
class _Step:
    pos: int
    n: int
    sample: bool
    tokens: list[int]  # the input of the first block
    token: int = -1  # what the chain sampled at this step (forced on a replayed last hop)


class _Link:
    """An open session on one hop."""

    def __init__(self, hop: Hop, stream: Any, verifier: wire.ReplyVerifier, is_first: bool, is_last: bool) -> None:
        self.hop = hop
        self.stream = stream
        self.reader = wire.FrameReader(stream)
        self.verifier = verifier
        self.is_first = is_first
        self.is_last = is_last
        self.steps = 0
        self.busy_s = 0.0  # time spent waiting on this hop: its compute and the round trips
        # Decode steps (one position, not replayed): their count, the time we waited on each, and
        # the compute time the hop reported for them. The difference is what the hop costs beyond
        # its compute: round trips, framing, signatures, thread hand-offs.
        self.decode_steps = 0
        self.decode_s = 0.0
        self.decode_compute_s = 0.0
        self.t_start = time.perf_counter()
        self.n_ctx = 0
        self.closed = False
        self.sent = 0  # bytes of step frames written, and of reply frames read
        self.received = 0

    async def close(self, reset: bool = False) -> None:
        if not self.closed:
            self.closed = True
            await finish_stream(self.stream, reset=reset)


@dataclass(slots=True)
class ChainState:
    """What one answer through a chain has done so far: every step, every hop input."""

    steps: list[_Step] = field(default_factory=list)
    inputs: dict[int, list[bytes]] = field(default_factory=dict)  # block -> hidden input of each step
    ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)


async def ask_chain(
    host: Any,
    source: ChainSource,
    *,
    model_id: str,
    total_blocks: int,
    messages: list[wire.ChatMessage] | None = None,
    prompt: str | None = None,
    params: wire.Params = wire.Params(),
    first_plan: list[Hop] | None = None,
    on_text: Callable[[str], None] = lambda _t: None,
    deadline_s: float = 600.0,
    stall_timeout: float = 10.0,
    accept_timeout: float = 5.0,
    dial_timeout: float = 3.0,
    max_attempts: int | None = None,
    before_attempt: Callable[[str], None] = lambda _p: None,
    after_attempt: Callable[[Attempt, AttemptResult], None] = lambda _a, _r: None,
) -> Answer:
    """Stream an answer from a chain of shards covering blocks [0, ``total_blocks``)."""
    run = _ChainRun(host, source, model_id, total_blocks, messages, prompt, params, on_text, stall_timeout,
                    accept_timeout, dial_timeout, max_attempts, before_attempt, after_attempt)
    with trio.move_on_after(deadline_s):
        try:
            return await run.answer(first_plan)
        finally:
            for link in run.links:
                await link.close(reset=True)
    raise AskFailed(f"the chain did not finish within the deadline ({deadline_s:g}s): {_summary(run.attempts)}",
                    run.attempts, "".join(run.state.text))


class _ChainRun:
    def __init__(self, host, source, model_id, total, messages, prompt, params, on_text, stall_timeout,
                 accept_timeout, dial_timeout, max_attempts, before_attempt, after_attempt) -> None:
        self.host = host
        self.source = source
        self.model_id = model_id
        self.total = total
        self.messages = messages
        self.prompt = prompt
        self.params = params
        self.on_text = on_text
        self.stall_timeout = stall_timeout
        self.accept_timeout = accept_timeout
        self.dial_timeout = dial_timeout
        self.max_attempts = max_attempts
        self.before_attempt = before_attempt
        self.after_attempt = after_attempt
        self.links: list[_Link] = []
        self.attempts: list[Attempt] = []
        self.tried: set[str] = set()
        self.state = ChainState()
        self.prompt_ids: list[int] = []
        self.t0 = time.perf_counter()
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.row_bytes = 0  # bytes of one position's hidden state, from the first hop that sent some

    # --- sessions ---------------------------------------------------------------------------

    async def _open(self, hop: Hop) -> _Link:
        """A session on ``hop``: dial, open the stream, send ShardOpen, read ShardReady."""
        is_first, is_last = hop.first == 0, hop.end == self.total
        self.tried.add(hop.peer_id)
        self.before_attempt(hop.peer_id)
        req = wire.ShardOpen(request_id=new_request_id(), model=self.model_id, first_block=hop.first,
                             end_block=hop.end, params=self.params,
                             messages=self.messages if is_first else None, prompt=self.prompt if is_first else None)
        payload = wire.encode(req)
        try:
            with trio.fail_after(self.dial_timeout):
                await connect(self.host, hop.advert.addrs)
        except (DialError, trio.TooSlowError) as exc:
            raise _HopFailed(hop, "unreachable", str(exc) or f"no connection within {self.dial_timeout:g}s") from exc
        verifier = wire.ReplyVerifier(hop.peer_id, protocol.SHARD, req.request_id, wire.request_digest(payload))
        try:
            with trio.fail_after(self.accept_timeout):
                stream = await new_stream(self.host, hop.peer_id, [protocol.SHARD])
                await stream.write(wire.frame(payload))
        except trio.TooSlowError as exc:
            raise _HopFailed(hop, "stalled", f"no stream within {self.accept_timeout:g}s") from exc
        except Exception as exc:
            raise _HopFailed(hop, "dropped", f"cannot open a stream: {_describe(exc)}") from exc
        link = _Link(hop, stream, verifier, is_first, is_last)
        self.links.append(link)
        msg = await self._read(link, self.accept_timeout)
        if not isinstance(msg, wire.ShardReady):
            raise _HopFailed(hop, "integrity", f"expected ShardReady, got {type(msg).__name__}")
        if msg.model_id != self.model_id:
            raise _HopFailed(hop, "integrity", f"serves model {msg.model_id[:12]}, not {self.model_id[:12]}")
        if is_first:
            if not msg.prompt_ids:
                raise _HopFailed(hop, "error", "the prompt is empty after tokenizing; send some text", retry=False)
            if self.prompt_ids and msg.prompt_ids != self.prompt_ids:
                raise _HopFailed(hop, "integrity", "tokenized the prompt differently from the first peer")
            self.prompt_ids = list(msg.prompt_ids)
        link.n_ctx = msg.n_ctx
        return link

    async def _read(self, link: _Link, wait: float) -> wire.Reply:
        hop = link.hop
        try:
            with trio.fail_after(wait):
                raw = await link.reader.read_frame()
        except trio.TooSlowError as exc:
            raise _HopFailed(hop, "stalled", f"nothing for {wait:g}s") from exc
        except wire.ProtocolError as exc:
            raise _HopFailed(hop, "integrity", f"broke the framing: {exc}") from exc
        except Exception as exc:
            raise _HopFailed(hop, "dropped", f"stream broke: {_describe(exc)}") from exc
        if raw is None:
            raise _HopFailed(hop, "dropped", "closed the stream mid-session")
        link.received += len(raw) + 4
        try:
            msg = link.verifier.open(raw)
        except wire.IntegrityError as exc:
            raise _HopFailed(hop, "integrity", str(exc)) from exc
        if isinstance(msg, wire.Busy):
            raise _HopFailed(hop, "busy", f"busy ({msg.reason})")
        if isinstance(msg, wire.Error):
            failed = RemoteError(msg.code, msg.message)
            raise _HopFailed(hop, "error", str(failed), retry=failed.retry)
        return msg

    async def _step(self, link: _Link, i: int, hidden: bytes, replay: bool) -> tuple[bytes, wire.StepOut]:
        """Step ``i`` through ``link``: its hidden output (joined) and its last StepOut."""
        st = self.state.steps[i]
        t = time.perf_counter()
        forced = st.token if (replay and link.is_last and st.sample) else -1
        head = wire.ShardStep(pos=st.pos, n=st.n, tokens=st.tokens if link.is_first else [], sample=st.sample,
                              forced=forced, replay=replay)
        parts = [hidden[at:at + wire.HIDDEN_PART] for at in range(0, len(hidden), wire.HIDDEN_PART)] or [b""]
        link.verifier.step_input = wire.step_digest(head, hidden)
        try:
            for k, part in enumerate(parts):
                frame = wire.ShardStep(pos=st.pos, n=st.n, tokens=head.tokens, sample=st.sample, forced=forced,
                                       replay=replay, hidden=part, more=k < len(parts) - 1)
                data = wire.frame(wire.encode(frame))
                with trio.fail_after(self.stall_timeout):
                    await link.stream.write(data)
                link.sent += len(data)
        except trio.TooSlowError as exc:
            raise _HopFailed(link.hop, "stalled", f"could not send a step for {self.stall_timeout:g}s") from exc
        except Exception as exc:
            raise _HopFailed(link.hop, "dropped", f"stream broke: {_describe(exc)}") from exc
        out: list[bytes] = []
        while True:
            msg = await self._read(link, self.stall_timeout)
            if not isinstance(msg, wire.StepOut):
                raise _HopFailed(link.hop, "integrity", f"expected a step's output, got {type(msg).__name__}")
            out.append(msg.hidden)
            if not msg.more:
                break
        hidden_out = b"".join(out)
        if not link.is_last and not replay:
            self.row_bytes = self.row_bytes or len(hidden_out) // st.n
            if not hidden_out or len(hidden_out) != st.n * self.row_bytes:
                raise _HopFailed(link.hop, "integrity", f"sent {len(hidden_out)} bytes of hidden states for {st.n} "
                                                        f"positions of {self.row_bytes} bytes")
        took = time.perf_counter() - t
        link.steps += 1
        link.busy_s += took
        if st.n == 1 and not replay:
            link.decode_steps += 1
            link.decode_s += took
            link.decode_compute_s += msg.compute_us / 1e6
        return hidden_out, msg

    def _keep(self, block: int, i: int, hidden: bytes) -> None:
        """Record the input of step ``i`` to ``block`` (a replay may record it again)."""
        kept = self.state.inputs.setdefault(block, [])
        if i < len(kept):
            kept[i] = hidden
        else:
            kept.append(hidden)

    # --- the answer -------------------------------------------------------------------------

    async def _plan(self, first: int, end: int) -> list[Hop]:
        if self.max_attempts is not None and len(self.attempts) >= self.max_attempts:
            raise AskFailed(f"no attempt left for blocks {first}:{end}: {_summary(self.attempts)}", self.attempts,
                            "".join(self.state.text))
        hops = await self.source.plan(self.tried, self.model_id, first, end)
        if not hops:
            raise AskFailed(f"no peer left that holds blocks {first}:{end} of the model: {_summary(self.attempts)}",
                            self.attempts, "".join(self.state.text), kind="unavailable")
        return hops

    async def answer(self, first_plan: list[Hop] | None) -> Answer:
        hops = first_plan or await self._plan(0, self.total)
        # Open every hop at once: the first token waits for the slowest handshake, not their sum.
        chain = await self._open_all(hops, replay_upto=0)
        self._prompt_steps()
        i = 0
        while True:
            if i == len(self.state.steps):
                if not self._next_step(chain):
                    return self._finish(chain, "length")
            k = 0
            hidden = b""
            while k < len(chain):
                link = chain[k]
                try:
                    hidden, out = await self._step(link, i, hidden if k else b"", replay=False)
                except _HopFailed as failed:
                    lo, hi, replaced = await self._replace(chain, k, failed, replay_upto=i)
                    chain[lo:hi] = replaced
                    k = lo
                    first = replaced[0].hop.first
                    hidden = self.state.inputs[first][i] if first else b""
                    continue
                if not link.is_last:
                    self._keep(link.hop.end, i, hidden)
                k += 1
            st = self.state.steps[i]
            i += 1
            if not st.sample:
                continue
            st.token = out.token
            finish = self._take(out)
            if finish:
                return self._finish(chain, finish)

    def _prompt_steps(self) -> None:
        ids, pos = self.prompt_ids, 0
        while pos < len(ids):  # the engines' own chunk borders: a chain computes what one peer does
            end = wire.chunk_end(pos, len(ids))
            self.state.steps.append(_Step(pos, end - pos, end >= len(ids), ids[pos:end]))
            pos = end

    def _next_step(self, chain: list[_Link]) -> bool:
        """Append the decode step of the last token; False when the context is full."""
        last = self.state.steps[-1]
        pos = last.pos + last.n
        if pos + 1 > min(link.n_ctx for link in chain):
            return False
        self.state.steps.append(_Step(pos, 1, True, [self.state.ids[-1]]))
        return True

    def _take(self, out: wire.StepOut) -> str:
        """Keep a sampled token's text; the finish reason when the answer ends."""
        now = time.perf_counter()
        if out.text:
            self.t_first = self.t_first or now
            self.t_last = now
            self.state.text.append(out.text)
            self.on_text(out.text)
        if out.finish == "eog":  # the end-of-generation token: never part of the answer
            return "stop"
        self.state.ids.append(out.token)
        self.t_first = self.t_first or now
        self.t_last = now
        if out.finish:
            return out.finish
        if len(self.state.ids) >= self.params.max_tokens:
            return "length"
        return ""

    async def _open_all(self, hops: list[Hop], replay_upto: int) -> list[_Link]:
        links: list[_Link | None] = [None] * len(hops)
        errors: list[_HopFailed] = []

        async def one(j: int) -> None:
            try:
                links[j] = await self._open(hops[j])
            except _HopFailed as exc:
                errors.append(exc)

        async with trio.open_nursery() as n:
            for j in range(len(hops)):
                n.start_soon(one, j)
        if errors:
            for link in links:
                if link is not None:
                    self._record(link, "gone", "")  # not its fault: another hop failed to open
                    await link.close(reset=True)
                    self.links.remove(link)
                    self.tried.discard(link.hop.peer_id)
            for exc in errors:
                self._fail(exc)
            if any(not e.retry for e in errors):
                raise self._give_up(errors[0])
            first, end = hops[0].first, hops[-1].end
            return await self._open_all(await self._plan(first, end), replay_upto)
        return links  # type: ignore[return-value]

    async def _replace(self, chain: list[_Link], k: int, failed: _HopFailed,
                       replay_upto: int) -> tuple[int, int, list[_Link]]:
        """New hops for the blocks of ``chain[k]``, caught up through step ``replay_upto`` - 1:
        they replace ``chain[lo:hi]``. When no peer left holds a chain over exactly the lost
        hop's borders, the span widens to its neighbours' borders (the inputs there are recorded
        too), so [10, 20) lost can be taken over by [0, 15) + [15, 30) in place of three hops."""
        lost = chain[k]
        await lost.close(reset=True)
        self._fail(failed, lost)
        if not failed.retry:
            raise self._give_up(failed)
        while True:
            lo, hi, hops = await self._plan_around(chain, k)
            new = await self._open_all(hops, replay_upto)
            try:
                for j, link in enumerate(new):
                    inner = j < len(new) - 1
                    for i in range(replay_upto):
                        hidden = self.state.inputs[link.hop.first][i] if link.hop.first else b""
                        out, _ = await self._step(link, i, hidden, replay=not inner)
                        if inner:
                            self._keep(link.hop.end, i, out)
            except _HopFailed as again:
                for link in new:
                    await link.close(reset=True)
                self._fail(again, next((ln for ln in new if ln.hop.peer_id == again.hop.peer_id), None))
                if not again.retry:
                    raise self._give_up(again) from None
                continue
            for link in chain[lo:hi]:
                if link is not lost:  # healthy, taken out only because its borders no longer fit
                    self._record(link, "gone", "")
                    self.tried.discard(link.hop.peer_id)
                    await link.close()
            return lo, hi, new

    async def _plan_around(self, chain: list[_Link], k: int) -> tuple[int, int, list[Hop]]:
        """The narrowest span of ``chain`` around hop ``k`` that a chain of untried peers covers:
        ``chain[lo:hi]`` and its replacement hops (fewest hops replaced first, then fewest blocks)."""
        spans = sorted(((lo, hi) for lo in range(k + 1) for hi in range(k + 1, len(chain) + 1)),
                       key=lambda s: (s[1] - s[0], chain[s[1] - 1].hop.end - chain[s[0]].hop.first))
        for lo, hi in spans:
            first, end = chain[lo].hop.first, chain[hi - 1].hop.end
            if (lo, hi) == spans[-1]:
                return lo, hi, await self._plan(first, end)  # the widest: its failure is the answer's
            if self.max_attempts is not None and len(self.attempts) >= self.max_attempts:
                return lo, hi, await self._plan(first, end)  # raises: no attempt left
            hops = await self.source.plan(self.tried, self.model_id, first, end)
            if hops:
                return lo, hi, hops
        raise AssertionError("unreachable: the widest span returns or raises")

    def _fail(self, failed: _HopFailed, link: _Link | None = None) -> None:
        res = self._result(link) if link is not None else AttemptResult(failed.hop.peer_id)
        self.attempts.append(Attempt(failed.hop.peer_id, failed.outcome, link.steps if link else 0, failed.message))
        self.after_attempt(self.attempts[-1], res)

    def _give_up(self, failed: _HopFailed) -> AskFailed:
        return AskFailed(f"the chain failed at blocks {failed.hop.first}:{failed.hop.end}: {failed.message}",
                         self.attempts, "".join(self.state.text))

    def _record(self, link: _Link, outcome: str, error: str) -> None:
        self.attempts.append(Attempt(link.hop.peer_id, outcome, link.steps, error))
        self.after_attempt(self.attempts[-1], self._result(link))

    @staticmethod
    def _result(link: _Link) -> AttemptResult:
        """How a hop did, in the terms of a whole-model attempt: its speed is steps per second
        of its own time (compute and round trips), which is what a chain's cost needs."""
        res = AttemptResult(link.hop.peer_id, t_start=link.t_start)
        if link.steps > 1 and link.busy_s > 0:
            res.ids = [0] * link.steps
            res.t_first = link.t_start
            res.t_last = link.t_start + link.busy_s * (link.steps - 1) / link.steps
        return res

    def _finish(self, chain: list[_Link], reason: str) -> Answer:
        receipt = hashlib.sha256()
        hops = []
        for link in chain:
            receipt.update(link.verifier.transcript)
            hops.append({"peer_id": link.hop.peer_id, "blocks": [link.hop.first, link.hop.end],
                         "steps": link.steps, "ms_per_step": round(1000 * link.busy_s / max(1, link.steps), 2),
                         "decode_ms_per_step": round(1000 * link.decode_s / max(1, link.decode_steps), 3),
                         "compute_ms_per_step": round(1000 * link.decode_compute_s / max(1, link.decode_steps), 3),
                         "bytes_sent": link.sent, "bytes_received": link.received,
                         "transcript": link.verifier.transcript.hex()})
            self._record(link, "ok", "")
        n = len(self.state.ids)
        decode_s = (self.t_last - self.t_first) if (self.t_first and self.t_last and self.t_last > self.t_first) else 0
        return Answer(
            text="".join(self.state.text), peer_id=chain[-1].hop.peer_id, model_id=self.model_id,
            finish_reason=reason, usage={"prompt_tokens": len(self.prompt_ids), "completion_tokens": n},
            ttft_ms=round(((self.t_first or time.perf_counter()) - self.t0) * 1000, 2),
            tokens_per_s=round((n - 1) / decode_s, 2) if decode_s else 0.0,
            receipt_verified=True, receipt=receipt.hexdigest(), attempts=self.attempts, chain=hops,
        )


class _HopFailed(Exception):
    def __init__(self, hop: Hop, outcome: str, message: str, retry: bool = True) -> None:
        super().__init__(message)
        self.hop = hop
        self.outcome = outcome
        self.message = f"{hop.peer_id[:16]} (blocks {hop.first}:{hop.end}): {message}"
        self.retry = retry


__all__ = ["AttemptFailed", "ChainSource", "Hop", "IntegrityFailure", "PeerBusy", "Stalled", "StreamBroken",
           "ask_chain", "coverage", "explain_chain", "plan_chain"]
