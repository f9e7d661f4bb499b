"""The swarm as a library: join it, see its peers, and stream answers with failover.

``Swarm`` works from trio directly and from asyncio through a trio guest run (``guest.py``).
Everything the ``ask`` and ``peers`` commands do goes through here, so the CLI, the TUI and
the gateway all choose peers, keep reputations and fail over the same way.
"""

from __future__ import annotations

import copy
import functools
import math
import random
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import trio

from .. import trace, wire
from ..asking.asker import Answer, AskFailed, Attempt, ask, new_request_id, peer_id_of
from ..asking.choose import Considered
from ..asking.client import AttemptResult
from ..config import Settings, load_settings
from ..dht.records import Advert
from ..errors import GputorrentError
from ..identity import Identity
from ..scoring import Weights
from ..scoring.ledger import Ledger
from ..scoring.reputation import Outcome, ReputationStore
from ..tasks import gather
from .guest import Hosted
from .pull import SwarmPull


class SwarmError(GputorrentError):
    """The swarm cannot be reached or used; the message says what to do."""


# --- what streams out ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Text:
    """A piece of the answer, as it arrives."""

    text: str
    peer_id: str


@dataclass(frozen=True, slots=True)
class Failover:
    """A peer failed mid-answer (or before it); the next candidate continues."""

    peer_id: str
    outcome: str  # busy, error, dropped, stalled, integrity, unreachable
    error: str
    tokens_so_far: int


@dataclass(frozen=True, slots=True)
class Finished:
    """The answer is complete; ``answer`` holds the text, the receipt and the attempts."""

    answer: Answer


StreamEvent = Text | Failover | Finished


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """A peer as this requester sees it: its signed advert plus local reputation and breaker."""

    advert: Advert
    reputation: float
    breaker: str  # closed, open, half-open (a banned peer's breaker stays open)
    rtt_ms: float | None = None
    banned: bool = False
    observed: dict[str, Any] = field(default_factory=dict)  # what this requester saw it do
    path: str = ""  # how this requester is connected to it now: direct, relayed, hole-punched ("" if not)
    got: float = 0.0  # tokens this machine received from it (its credit here), decayed (scoring/ledger.py)
    gave: float = 0.0  # tokens this machine's serve gave its user, decayed

    @property
    def peer_id(self) -> str:
        return self.advert.peer_id

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self.advert) | {"reputation": round(self.reputation, 3),
                                                   "breaker": self.breaker, "rtt_ms": self.rtt_ms,
                                                   "banned": self.banned, "observed": self.observed,
                                                   "path": self.path, "got_tokens": round(self.got, 1),
                                                   "gave_tokens": round(self.gave, 1)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PeerStatus:
        """The status ``to_dict`` wrote (from the agent, whose view it is)."""
        return cls(advert=msgspec.convert(d, Advert), reputation=d["reputation"], breaker=d["breaker"],
                   rtt_ms=d.get("rtt_ms"), banned=bool(d.get("banned")), observed=d.get("observed") or {},
                   path=d.get("path") or "", got=d.get("got_tokens", 0.0), gave=d.get("gave_tokens", 0.0))


@dataclass(frozen=True, slots=True)
class PeerSeen:
    """A live peer, as of the latest crawl (sent every round for every live peer)."""

    peer: PeerStatus
    new: bool  # first time seen by this Swarm


@dataclass(frozen=True, slots=True)
class PeerLeft:
    peer_id: str


@dataclass(frozen=True, slots=True)
class BreakerChanged:
    peer_id: str
    state: str


SwarmEvent = PeerSeen | PeerLeft | BreakerChanged | Failover


@dataclass(slots=True)
class Plan:
    """Which peers to try for a model, best first, and how every candidate was judged."""

    model: str
    order: list[Advert]
    considered: list[Considered] = field(default_factory=list)
    chain: list[Any] = field(default_factory=list)  # asking.chain.Hop, when shards compute the model


def to_messages(prompt: str | Sequence[Any] | None, system: str | None = None) -> list[wire.ChatMessage]:
    """A prompt string or OpenAI-style ``[{"role", "content"}]`` as chat messages."""
    if isinstance(prompt, str):
        msgs = [wire.ChatMessage("user", prompt)]
    else:
        msgs = []
        for m in prompt or []:
            if isinstance(m, wire.ChatMessage):
                msgs.append(m)
                continue
            try:
                msgs.append(msgspec.convert([m["role"], m["content"]], wire.ChatMessage))  # type: ignore[index]
            except (KeyError, TypeError, msgspec.ValidationError) as exc:
                raise ValueError(f"a message needs a role (system, user or assistant) and text content: {m!r}") from exc
    if system:
        msgs.insert(0, wire.ChatMessage("system", system))
    if not msgs:
        raise ValueError("give a prompt or at least one message")
    return msgs


params_from = wire.params_from  # kept here too: the API's callers import it from this module


_OUTCOME: dict[str, Outcome] = {"ok": "ok", "integrity": "integrity", "stalled": "timeout", "dropped": "failed",
            "unreachable": "failed", "busy": "busy", "error": "gone"}


_SAME_ID = ("this requester has the same peer id ({}) as a peer it would ask, so it cannot reach it: give the "
            "requester or that peer another --identity (by default they use different keys)")


def own_link(settings: Settings, requester: Identity) -> wire.Link | None:
    """A link from this machine's serving identity (when it has one, and it is not the requester's
    own key) to ``requester``: what this machine's serve gave other peers is then credited when its
    user asks them. Never creates a serving key."""
    from ..identity import IdentityError

    path = settings.identity_path
    if not path.exists():
        return None
    try:
        owner = Identity.load(path)
    except IdentityError:  # unreadable, or readable by others (refused): ask as a guest
        return None
    return None if owner.peer_id == requester.peer_id else wire.make_link(owner, requester.peer_id)


async def answer_of(events: AsyncGenerator[StreamEvent, None],
                    on_text: Callable[[Text], None] | None = None) -> Answer:
    """Consume a stream to its ``Answer``, handing each ``Text`` to ``on_text``. A stream that
    ends without ``Finished`` (it cannot, unless a bug cuts it) is an ``AskFailed``."""
    async with aclosing(events):
        async for ev in events:
            if isinstance(ev, Text) and on_text is not None:
                on_text(ev)
            elif isinstance(ev, Finished):
                return ev.answer
    raise AskFailed("the answer ended without a receipt", [])


def check_findable(settings: Settings, direct: Sequence[str] = ()) -> None:
    """A requester needs some way to find the swarm (``SwarmError`` says which)."""
    problem = settings.unfindable(direct)
    if problem:
        raise SwarmError(problem)


class _Core:
    """The trio side. One per ``Swarm``; every method runs in trio."""

    def __init__(self, settings: Settings, identity: Identity, direct: list[str], weights: Weights,
                 choose_top: int, attempts: int | None, stall_timeout: float, watch_interval: float,
                 deadline: float) -> None:
        self.settings = settings
        self.identity = identity
        self.key_path: Path | None = None  # the key file ``identity`` came from, held while open
        self._hold: Any = None
        self.direct = direct
        self.weights = weights
        self.choose_top = choose_top
        self.attempts = attempts
        self.stall_timeout = stall_timeout
        self.watch_interval = watch_interval
        self.deadline = deadline
        self.rng = random.Random()
        # Whether an answer gets a spot check (``spot_check=P``): a stream of its own, so that
        # nothing else drawing (ranking ties) changes which answers are checked for a given seed.
        self.spot_rng = random.Random()
        self.host: Any = None
        self.node: Any = None
        self.view: Any = None  # asking.view.SwarmView, once joined
        self.store: ReputationStore | None = None
        self.ledger: Ledger | None = None  # tokens received from each peer, given to each (reciprocity)
        self.link: wire.Link | None = None  # this machine's serving identity vouching for our key
        self._stack: AsyncExitStack | None = None
        self._nursery: trio.Nursery | None = None
        self._subscribers: list[trio.MemorySendChannel] = []
        self._watching = False
        self._known: set[str] = set()  # peer ids live at the last crawl
        self.join_later = False  # open with no bootstrap peer and no mDNS: join() comes later

    async def open(self) -> None:
        from ..asking.view import SwarmView
        from ..dht.node import swarm_node
        from ..net.host import running_host
        from ..net.relay import hole_punching, punch_listen
        from ..swarmkey import load

        s = self.settings
        if not self.join_later:
            check_findable(s, self.direct)
        if self.key_path is not None and self._hold is None:
            from ..identity import KeyHold

            self._hold = KeyHold.take(self.key_path)
            if self._hold is None:
                # Another live process of this machine (a gateway, the TUI, an ask) uses the key:
                # a key of this process's own, linked to the machine's serving key for credit.
                self.identity = Identity.generate()
        mine = [a for a in [*s.bootstrap, *self.direct] if a.rstrip("/").endswith("/p2p/" + self.identity.peer_id)]
        if mine:
            raise SwarmError(_SAME_ID.format(self.identity.peer_id) + f" ({mine[0]})")
        psk = load(s.swarm_key) if s.swarm_key else None
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            self.store = await trio.to_thread.run_sync(ReputationStore, s.data_dir / "reputation.sqlite")
            stack.callback(self.store.close)
            self.ledger = await trio.to_thread.run_sync(Ledger, s.data_dir / "ledger.sqlite")
            stack.callback(self.ledger.close)
            self.link = own_link(s, self.identity)
            with trace.span("host start"):
                self.host = await stack.enter_async_context(running_host(self.identity,
                                                                         punch_listen([*s.bootstrap, *self.direct]),
                                                                         mdns=s.mdns and not self.direct, psk=psk))
                await stack.enter_async_context(hole_punching(self.host))
            if not self.direct:
                self.node = await stack.enter_async_context(swarm_node(self.host, self.identity, server=False))
                self.node.scope = _join_scope(s.bootstrap)
                with trace.span("join"):
                    joined = await self.node.join(s.bootstrap) if s.bootstrap else 1
                if not joined:
                    raise SwarmError(f"none of the bootstrap peers answered ({', '.join(s.bootstrap)}); "
                                     "check the addresses and that those peers are running")
                if not s.bootstrap:
                    await self.node.adopt_known_peers()
            self._nursery = await stack.enter_async_context(trio.open_nursery())
            if self.node is not None:
                self.view = SwarmView(self.host, self.node, self.store, weights=self.weights, rng=self.rng,
                                      top=self.choose_top, scope=_join_scope(s.bootstrap))
                self._nursery.start_soon(self.view.refresh_forever)
                self._nursery.start_soon(self.view.ping_forever)
        except BaseException:
            await stack.aclose()
            if self._hold is not None:
                self._hold.release()
                self._hold = None
            raise
        self._stack = stack

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    async def pull(self, spec: str, where: Path, progress: Any = None) -> SwarmPull:
        from .pull import pull_from_swarm

        if self.node is None:
            raise SwarmError("this Swarm asks fixed peers (peers=[...]); pulling needs the DHT")
        return await pull_from_swarm(self, spec, where, progress=progress)

    async def join(self, addrs: Sequence[str]) -> None:
        """Join the swarm by more bootstrap peers, once each (the agent, for a client that names
        peers it was not started with)."""
        new = [a for a in addrs if a not in self.settings.bootstrap]
        if not new or self.node is None:
            return
        if not await self.node.join(new):
            raise SwarmError(f"none of the bootstrap peers answered ({', '.join(new)}); "
                             "check the addresses and that those peers are running")
        self.settings = self.settings.with_overrides(bootstrap=[*self.settings.bootstrap, *new])

    async def close(self) -> None:
        if self._stack is not None:
            from ..net.host import drop_connections

            # Connections first: a background task blocked writing to a slow peer (a ping, a
            # refresh) then fails at once instead of holding the close for its write's 10 s.
            await drop_connections(self.host)
            self._nursery.cancel_scope.cancel()  # type: ignore[union-attr]
            for ch in self._subscribers:
                ch.close()
            stack, self._stack = self._stack, None
            await stack.aclose()
        if self._hold is not None:
            self._hold.release()
            self._hold = None

    # --- peers ------------------------------------------------------------------------------

    def _status(self, ad: Advert, now: float, rtt_ms: float | None = None, ledger: Any = None) -> PeerStatus:
        rec = self.store.get(ad.peer_id, now)  # type: ignore[union-attr]
        observed = {"successes": round(rec.successes, 3), "failures": round(rec.failures, 3),
                    "timeouts": round(rec.timeouts, 3), "integrity_failures": round(rec.integrity, 3),
                    "tokens_per_s": rec.tokens_per_s, "ttft_ms": rec.ttft_ms}
        from ..net.host import path_of

        path = path_of(self.host, ad.peer_id) if self.host is not None else ""
        entry = (ledger or {}).get(ad.peer_id)
        return PeerStatus(ad, rec.reputation, rec.breaker.current(now), rtt_ms, rec.breaker.banned, observed, path,
                          entry.received if entry else 0.0, entry.served if entry else 0.0)

    async def peers(self, model: str | None = None, ping: bool = False, max_age: float = 0.0) -> list[PeerStatus]:
        if self.node is None:
            raise SwarmError("this Swarm asks fixed peers (peers=[...]); it has no DHT to list")
        # A listing is a question about now: a fresh lookup, unless the caller takes the view's
        # (the agent's, kept warm in the background while in use) up to ``max_age`` old.
        adverts = await (self.view.find(model, max_age=max_age, whole=None) if model
                         else self.view.overview(max_age=max_age, listing=True))
        rtts: dict[str, float] = {}
        if ping and max_age > 0:  # pongs the view renews for the peers in use: no round trip
            from ..asking.view import PONG_FRESH_S

            now_t = trio.current_time()
            for ad in adverts:
                kept = self.view.pongs.get(ad.peer_id)
                if kept is not None and now_t - kept[0] < min(max_age, PONG_FRESH_S):
                    rtts[ad.peer_id] = round(kept[1], 1)
            adverts_to_ping = [ad for ad in adverts if ad.peer_id not in rtts]
        else:
            adverts_to_ping = adverts
        if ping:
            from ..asking.client import AttemptFailed
            from ..asking.client import ping as ping_peer
            from ..net.host import DialError, connect

            async def one(ad: Advert) -> None:
                try:
                    with trio.move_on_after(2):
                        await connect(self.host, ad.addrs)
                        rtts[ad.peer_id] = round((await ping_peer(self.host, ad.peer_id, 2.0))[0], 1)
                except (DialError, AttemptFailed):
                    pass

            async with trio.open_nursery() as n:
                for ad in adverts_to_ping:
                    n.start_soon(one, ad)
        now = time.time()
        ledger = {}
        if self.ledger is not None:
            ledger = {e.identity: e for e in await trio.to_thread.run_sync(self.ledger.entries)}
        return [self._status(ad, now, rtts.get(ad.peer_id), ledger) for ad in adverts]

    async def rank(self, model: str | None = None) -> Plan:
        """Find the peers serving ``model`` (by default the one most peers serve) and order them."""
        with trace.span("rank", model=model or ""):
            return await self._rank(model)

    async def _rank(self, model: str | None) -> Plan:
        if self.node is None:
            return Plan(model or "", [])
        if not model:
            counts: dict[str, int] = {}
            for a in await self.view.overview():
                for m in a.models:
                    counts[m.alias] = counts.get(m.alias, 0) + 1
            if not counts:
                raise AskFailed(await self._nothing_found("no peer in the swarm serves any model yet; "
                                                          "start one with: gputorrent serve"), [], kind="no_peers")
            model = max(counts, key=counts.__getitem__)
        # Whole peers and shard holders live under different keys (records.model_keys): look both
        # up side by side, so that finding no usable whole peer costs no second walk before a
        # chain is planned (or before saying nobody is left).
        ranked, _ = await gather([lambda: self.view.rank(model), lambda: self._prefetch_shards(model)])
        order, considered = ranked
        if not order:  # nobody serves it whole: a chain of shards, if they cover every block
            hops, held = await self.view.chain(model)
            if hops:
                return Plan(model, [], considered + held, chain=hops)
            if held:
                raise AskFailed(_uncovered(model, [c.advert for c in held]), [], kind="unavailable")
        if not considered:
            stranded = [a for a in await self.view.find(model, whole=None) if not a.addrs]
            if stranded:
                raise AskFailed(f"{len(stranded)} peer(s) serve {model!r} but none can be reached: "
                                f"{stranded[0].name or stranded[0].peer_id} is behind NAT and no relay holds a "
                                "reservation for it, so it advertises no address (a public peer with the relay "
                                "service on would give it one)", [], kind="unavailable")
            if not await self.view.overview():
                raise AskFailed(await self._nothing_found("no peer in the swarm serves any model yet; "
                                                          "start one with: gputorrent serve"), [], kind="no_peers")
            raise AskFailed(f"no live peer serves {model!r}; see what the swarm has with: "
                            "gputorrent models list --swarm", [], kind="unknown_model")
        if not order:
            # Worded as the ask says it when it tried them one by one: which of the two a
            # requester meets when every peer died is timing (a pong still fresh ranks a dead
            # peer from the view, and the ask tries it), and it is one fact.
            raise AskFailed(f"no peer left serving {model!r}: the {len(considered)} found are unreachable or have "
                            "their breaker open; see: gputorrent peers (and peers --reset PEER to give one "
                            "another chance)", [], kind="unavailable")
        return Plan(model, order, considered)

    async def _prefetch_shards(self, model: str) -> None:
        try:
            await self.view.find(model, whole=False)
        except Exception:  # noqa: BLE001, S110 (the chain's own lookup tries again and reports)
            pass

    async def _nothing_found(self, message: str) -> str:
        """``message``, unless this requester's own peer id is serving: then say that instead
        (a node never finds itself: both processes have one key)."""
        if await self.node.get_advert(self.identity.peer_id) is not None:
            return _SAME_ID.format(self.identity.peer_id)
        return message

    async def set_banned(self, peer_id: str, banned: bool) -> str:
        rec = self.store.ban(peer_id) if banned else self.store.reset(peer_id)  # type: ignore[union-attr]
        state = rec.breaker.current(time.time())
        self._publish(BreakerChanged(peer_id, state))
        return state

    # --- events -----------------------------------------------------------------------------

    def _publish(self, event: SwarmEvent) -> None:
        for ch in list(self._subscribers):
            try:
                ch.send_nowait(event)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                self._subscribers.remove(ch)

    async def events(self) -> AsyncGenerator[SwarmEvent, None]:
        send, recv = trio.open_memory_channel[SwarmEvent](math.inf)
        self._subscribers.append(send)
        if self.node is not None and not self._watching:
            self._watching = True
            self._nursery.start_soon(self._watch)  # type: ignore[union-attr]
        try:
            async with recv:
                async for ev in recv:
                    yield ev
        finally:
            if send in self._subscribers:
                self._subscribers.remove(send)

    async def _watch(self) -> None:
        """Crawl the DHT every ``watch_interval`` while anyone listens; publish what changed."""
        while self._subscribers:
            try:
                statuses = await self.peers(ping=True)
            except Exception:  # noqa: BLE001 (a failed crawl is retried next round; the stream of events goes on)
                statuses = []
            now = time.time()
            seen = set()
            for st in statuses:
                if st.advert.leaving or not st.advert.live(now):
                    continue
                seen.add(st.peer_id)
                # Every round, not only on a new advert: RTT, reputation and breaker move too.
                self._publish(PeerSeen(st, new=st.peer_id not in self._known))
            for pid in self._known - seen:
                self._publish(PeerLeft(pid))
            self._known = seen
            await trio.sleep(self.watch_interval)
        self._watching = False

    # --- answers ----------------------------------------------------------------------------

    def _after_attempt(self, attempt: Attempt, res: AttemptResult, out: trio.MemorySendChannel) -> None:
        before = self.store.get(attempt.peer_id).breaker.current(time.time())  # type: ignore[union-attr]
        outcome = _OUTCOME.get(attempt.outcome)
        if outcome is not None:
            tps = ttft = None
            if outcome == "ok" and res.t_first:
                ttft = (res.t_first - res.t_start) * 1000
                if len(res.ids) > 1 and res.t_last is not None and res.t_last > res.t_first:
                    tps = (len(res.ids) - 1) / (res.t_last - res.t_first)
            self.store.record(attempt.peer_id, outcome, tokens_per_s=tps, ttft_ms=ttft)  # type: ignore[union-attr]
            if outcome == "busy" and self._claimed_room(attempt.peer_id):
                # Its pong of a moment ago said it had a free slot: claims that do not match
                # behaviour cost reputation, not just a moment's score (sybils that claim the
                # world and answer Busy sink; an honest peer that filled up meanwhile pays little).
                self.store.record(attempt.peer_id, "failed")  # type: ignore[union-attr]
        after = self.store.get(attempt.peer_id).breaker.current(time.time())  # type: ignore[union-attr]
        if after != before:
            self._publish(BreakerChanged(attempt.peer_id, after))
        if attempt.outcome != "ok":
            ev = Failover(attempt.peer_id, attempt.outcome, attempt.error, len(res.ids))
            out.send_nowait(ev)
            self._publish(ev)

    def _claimed_room(self, peer_id: str) -> bool:
        from ..asking.choose import free_slots
        from ..asking.view import PONG_FRESH_S

        kept = self.view.pongs.get(peer_id) if self.view is not None else None
        return kept is not None and trio.current_time() - kept[0] <= PONG_FRESH_S and free_slots(kept[2]) > 0

    async def stream(self, prompt: str | Sequence[Any] | None = None, *, model: str | None = None,
                     system: str | None = None, raw: bool = False, plan: Plan | None = None,
                     verify: bool = False, spot_check: float = 0.0, **params: Any) -> AsyncGenerator[StreamEvent, None]:
        p = params_from(**params)
        messages = None if raw else to_messages(prompt, system)
        if raw and not isinstance(prompt, str):
            raise ValueError("raw=True takes the prompt as one string")
        text = prompt if raw and isinstance(prompt, str) else None
        wire.validate_request(wire.InferRequest(request_id=new_request_id(), messages=messages,
                                                prompt=text, params=p))  # before any lookup
        addrs: list[Any]
        if self.direct:
            # In the order given, except that a peer caught lying to this machine (a spot check
            # or a bad signature) goes last: naming it first must not send every ask to it again.
            def caught_before(addr: str) -> bool:
                return self.store.get(peer_id_of(addr)).integrity > 0  # type: ignore[union-attr]

            direct = sorted(self.direct, key=caught_before)
            candidates: Any = direct
            addrs, model = list(direct), model or ""
        else:
            plan = plan or await self.rank(model)
            addrs, model = [list(a.addrs) for a in plan.order], plan.model
            candidates = self.view.candidates(model, first=plan.order)
        send, recv = trio.open_memory_channel[Any](math.inf)
        # The peer being asked; whether its outcome is still unknown.
        current: dict[str, Any] = {"peer": "", "open": False}
        # Verified tokens each peer gave this answer, and peers caught lying in it: credit is
        # settled once the answer is accepted (after its spot check), never for a discarded one.
        earned: dict[str, float] = {}
        caught: set[str] = set()

        def before(pid: str) -> None:
            current.update(peer=pid, open=True)
            self.store.start_trial(pid)  # type: ignore[union-attr]

        def after(a: Attempt, r: AttemptResult) -> None:
            current["open"] = False
            self._after_attempt(a, r, send)
            if a.outcome == "integrity":
                caught.add(a.peer_id)
            elif r.ids:
                earned[a.peer_id] = earned.get(a.peer_id, 0) + len(r.ids)

        async def produce() -> None:
            async with send:
                try:
                    on_text = lambda t: send.send_nowait(Text(t, current["peer"]))  # noqa: E731
                    if plan is not None and plan.chain:
                        from ..asking.chain import ask_chain

                        answer = await ask_chain(
                            self.host, self.view.chain_source(model), model_id=plan.chain[0].model_id,
                            total_blocks=plan.chain[0].total_blocks, messages=messages,
                            prompt=text, params=p, first_plan=plan.chain, on_text=on_text,
                            max_attempts=self.attempts, deadline_s=self.deadline, stall_timeout=self.stall_timeout,
                            before_attempt=before, after_attempt=after,
                        )
                    else:
                        answer = await ask(
                            self.host, candidates, messages=messages, prompt=text, model=model,
                            params=p, on_text=on_text, max_attempts=self.attempts, deadline_s=self.deadline,
                            stall_timeout=self.stall_timeout, before_attempt=before, after_attempt=after,
                            accept_timeout=self.view.accept_timeout if self.view is not None else 5.0,
                            link=self.link,
                        )
                    if verify or (spot_check and self.spot_rng.random() < spot_check):
                        if answer.chain:
                            answer.spot_check = await self._spot_check_chain(answer, model, messages,
                                                                             prompt if raw else None, p)
                        else:
                            answer.spot_check = await self._spot_check(answer, addrs, messages,
                                                                       prompt if raw else None, p)
                    if answer.spot_check is not None and answer.spot_check.blamed:
                        caught.add(answer.spot_check.blamed)
                    self._settle(earned, caught)
                    send.send_nowait(Finished(answer))
                except Exception as exc:  # noqa: BLE001 (handed to the consumer: never into the swarm's nursery)
                    self._settle({}, caught)  # a failed answer earns nobody credit; a liar still loses it
                    send.send_nowait(exc)
                finally:
                    if current["open"]:  # the consumer left mid-attempt: that says nothing of the peer
                        self.store.record(current["peer"], "gone")  # type: ignore[union-attr]

        # The producer runs in the swarm's nursery, under a scope this generator only holds:
        # a generator must not yield inside a cancel scope it entered.
        scope = trio.CancelScope()
        self._nursery.start_soon(_scoped, scope, produce)  # type: ignore[union-attr]
        try:
            async with recv:
                async for ev in recv:
                    if isinstance(ev, Exception):
                        raise ev
                    yield ev
        finally:
            scope.cancel()

    def _settle(self, earned: dict[str, float], caught: set[str]) -> None:
        """Credit for an answer, in the ledger (scoring/ledger.py), off the event loop."""
        if self.ledger is not None and (earned or caught):
            self._nursery.start_soon(trio.to_thread.run_sync,  # type: ignore[union-attr]
                                     functools.partial(self.ledger.settle, dict(earned), set(caught)))

    async def _spot_check(self, answer: Answer, candidates: list[Any], messages, prompt,
                          params: wire.Params | None = None) -> Any:
        from ..asking.verify import spot_check

        served = [c for c in candidates if peer_id_of(c) == answer.peer_id]
        others = [c for c in candidates if peer_id_of(c) != answer.peer_id]
        base = wire.InferRequest(request_id=new_request_id(), model=answer.model_id, messages=messages, prompt=prompt,
                                 params=params or wire.Params())
        check = await spot_check(self.host, served + others, base)
        if check.blamed:
            self.store.record(check.blamed, "integrity")  # type: ignore[union-attr]
        return check

    async def _spot_check_chain(self, answer: Answer, model: str, messages, prompt,
                                params: wire.Params | None = None) -> Any:
        """Check a chain answer: its own hops against a whole peer, else a chain of other peers."""
        from ..asking.chain import Hop
        from ..asking.verify import SpotCheck, spot_check_chain

        adverts = {a.peer_id: a for a in await self.view.find(model, whole=False)}
        mid = answer.model_id
        total = next((m.total_blocks for a in adverts.values() for m in a.models if m.model_id == mid), 0)
        hops = [Hop(adverts[h["peer_id"]], h["blocks"][0], h["blocks"][1], model_id=mid, total_blocks=total)
                for h in answer.chain if h["peer_id"] in adverts]
        if len(hops) != len(answer.chain):
            return SpotCheck(note="a hop of this chain is no longer in the swarm; nothing to check")

        async def plan(exclude: set[str], first: int, end: int) -> list[Hop] | None:
            found, _ = await self.view.chain(model, exclude=exclude, model_id=mid, first=first, end=end)
            return found

        whole, _ = await self.view.rank(model, model_id=mid)
        base = wire.InferRequest(request_id=new_request_id(), model=mid, messages=messages, prompt=prompt,
                                 params=params or wire.Params())
        check = await spot_check_chain(self.host, hops, plan, base, [list(a.addrs) for a in whole])
        if check.blamed:
            self.store.record(check.blamed, "integrity")  # type: ignore[union-attr]
        return check

    async def generate(self, prompt: str | Sequence[Any] | None = None, **kw: Any) -> Answer:
        return await answer_of(self.stream(prompt, **kw))


def _uncovered(model: str, adverts: list[Advert]) -> str:
    """Why the shards found make no chain: the blocks nobody reachable holds."""
    from ..asking.chain import coverage

    ms = [m for a in adverts for m in a.models if not m.whole]
    if not ms:
        return f"no reachable peer serves {model!r}"
    total = ms[0].total_blocks
    gaps = [b for b, n in enumerate(coverage(adverts, ms[0].model_id, total)) if n == 0]
    what = f"blocks {_spans(gaps)} of {total}" if gaps else "no chain of reachable peers whose breakers are closed"
    return (f"no peer serves {model!r} whole and the shards cannot be chained: {what}; start one with "
            f"gputorrent serve --model {model} --blocks auto")


def _spans(blocks: list[int]) -> str:
    out: list[str] = []
    for b in blocks:
        if out and out[-1].endswith(f":{b}"):
            out[-1] = out[-1].rsplit(":", 1)[0] + f":{b + 1}"
        else:
            out.append(f"{b}:{b + 1}")
    return ", ".join(out)


def _join_scope(bootstrap: Sequence[str]) -> str:
    """How far this requester's network reaches, judged by the addresses it joined through:
    the most local of them."""
    from ..net.host import scope_of

    scopes = {scope_of(a) for a in bootstrap} or {"loopback"}  # mDNS: peers on this LAN, or this machine
    return next(s for s in ("loopback", "private", "public") if s in scopes)


async def _scoped(scope: trio.CancelScope, fn: Any) -> None:
    with scope:
        await fn()


class Swarm(Hosted):
    """A requester's handle on the swarm.

    >>> async with Swarm(bootstrap=["/ip4/127.0.0.1/tcp/4001/p2p/12D3Koo..."]) as swarm:
    ...     async for ev in swarm.stream("What is the capital of France?", model="smollm2"):
    ...         if isinstance(ev, Text):
    ...             print(ev.text, end="")

    Works under trio and under asyncio (where trio runs as a guest on the asyncio loop).
    When this user's agent runs (``gputorrent agent``), the Swarm is the agent's: one presence
    in the swarm per machine, already warm. ``agent=False`` always joins in this process (as
    ``--no-agent`` does; so does ``GPUTORRENT_AGENT=off``), ``agent=True`` starts the agent if
    none runs. An ``Identity`` object, other ``weights`` or ``choose_top`` join in-process too.
    ``peers=[MULTIADDR, ...]`` asks those peers directly, in that order, without the DHT.
    ``join_later=True`` opens with no way to find the swarm yet (no bootstrap peer, no mDNS):
    ``join`` adds bootstrap peers, and ``using(peers=...)`` asks peers directly meanwhile.
    Settings left as ``None`` come from the config file and ``GPUTORRENT_*`` variables.
    """

    def __init__(self, bootstrap: Sequence[str] | None = None, *, mdns: bool | None = None,
                 identity: Identity | str | Path | None = None, swarm_key: str | Path | None = None,
                 data_dir: str | Path | None = None, peers: Sequence[str] = (), weights: Weights | None = None,
                 choose_top: int = 3, attempts: int | None = None, stall_timeout: float = 10.0,
                 watch_interval: float = 2.0, deadline: float = 600.0, join_later: bool = False,
                 agent: bool | None = None) -> None:
        if choose_top < 1 or (attempts is not None and attempts < 1) or stall_timeout <= 0 or watch_interval <= 0 \
                or deadline <= 0:
            raise ValueError("choose_top and attempts must be 1 or more; stall_timeout, watch_interval and "
                             "deadline positive")
        settings = load_settings().with_overrides(bootstrap=list(bootstrap) if bootstrap else None, mdns=mdns,
                                                  swarm_key=swarm_key, data_dir=data_dir)
        if not isinstance(identity, Identity) and identity is not None \
                and Path(identity) != settings.requester_identity_path:
            # A key of its own. The default requester key is no override: as one, it also stood
            # for the serving key, so the link to this machine's serve (its credit) was lost.
            settings = settings.with_overrides(identity=identity)
        ident = identity if isinstance(identity, Identity) else \
            Identity.load_or_create(settings.requester_identity_path)
        self._core = _Core(settings, ident, list(peers), weights or Weights(), choose_top, attempts,
                           stall_timeout, watch_interval, deadline)
        if not isinstance(identity, Identity):  # a key file: held while open, shared by nobody
            self._core.key_path = settings.requester_identity_path
        self._core.join_later = join_later
        self._remote: Any = None  # api.remote.RemoteCore, when the agent may answer
        if agent is not False and not isinstance(identity, Identity) and weights is None and choose_top == 3:
            from ..agent.client import wanted

            if wanted(False):
                from ..agent.paths import AgentDirError
                from .remote import RemoteCore

                try:
                    self._remote = RemoteCore(settings, may_start=bool(agent), direct=peers, attempts=attempts,
                                              stall_timeout=stall_timeout, deadline=deadline)
                except AgentDirError:
                    if agent:
                        raise
                    self._remote = None  # no runtime dir to trust: no agent either

    @property
    def peer_id(self) -> str:
        """This requester's own peer id (the agent's, through the agent)."""
        return self._core.peer_id

    @property
    def lookups(self) -> tuple[int, int]:
        """DHT lookups this Swarm's view made: (callers waited for, background refreshes)."""
        view = getattr(self._core, "view", None)
        return (view.lookups_run, view.refreshes_run) if view is not None else (0, 0)

    @property
    def credited_to(self) -> str | None:
        """The machine's serving identity this requester's asks are credited to (its link),
        or None when this machine serves nothing (or the Swarm is the agent's: see its status)."""
        link = getattr(self._core, "link", None)
        return link.owner if link is not None else None

    @property
    def through_agent(self) -> bool:
        """Whether this Swarm is the agent's (known once entered)."""
        return self._core is self._remote

    def using(self, *, peers: Sequence[str] | None = None, attempts: int | None = None,
              stall_timeout: float | None = None, deadline: float | None = None) -> Swarm:
        """A handle on this same open swarm (its connections, view, reputation and ledger)
        with other limits for the requests made through it: what the agent does for each
        client's ``ask``. ``peers`` asks those peers directly, as ``Swarm(peers=...)``."""
        if (attempts is not None and attempts < 1) or (stall_timeout is not None and stall_timeout <= 0) \
                or (deadline is not None and deadline <= 0):
            raise ValueError("attempts must be 1 or more; stall_timeout and deadline positive")
        twin = copy.copy(self)
        twin._core = copy.copy(self._core)
        twin._core.direct = list(peers or ())
        twin._core.attempts = attempts
        for name, value in (("stall_timeout", stall_timeout), ("deadline", deadline)):
            if value is not None:
                setattr(twin._core, name, value)
        return twin

    async def _open(self) -> None:
        if self._remote is not None:
            from .remote import NoAgent

            try:
                await self._remote.open()
                self._core = self._remote
                return
            except NoAgent:  # none runs (and none was asked for): this process joins itself
                self._remote = None
        await self._core.open()

    async def _close(self) -> None:
        await self._core.close()

    def stream(self, prompt: str | Sequence[Any] | None = None, **kw: Any) -> AsyncGenerator[StreamEvent, None]:
        """Stream an answer: ``Text`` pieces, a ``Failover`` whenever a peer drops out and the
        next continues, then ``Finished`` with the whole ``Answer``. Raises ``AskFailed`` when
        no candidate can finish. Keywords: ``model``, ``system``, ``raw``, ``verify``,
        ``spot_check``, ``plan`` and the sampling parameters ``max_tokens``, ``temperature``,
        ``top_p``, ``top_k``, ``seed``, ``stop``."""
        return self._iterate(self._core.stream(prompt, **kw))

    async def generate(self, prompt: str | Sequence[Any] | None = None, **kw: Any) -> Answer:
        """The whole answer (text, peer, model id, usage, receipt, attempts); as ``stream``."""
        return await self._call(self._core.generate, prompt, **kw)

    async def peers(self, model: str | None = None, *, ping: bool = False, max_age: float = 0.0) -> list[PeerStatus]:
        """Live peers from their signed adverts (serving ``model``, if given), with this
        requester's reputation and breaker for each; ``ping=True`` also measures RTT.
        ``max_age=S`` answers from what this Swarm learned in the last S seconds, when it
        has (a warm agent does: then no round trip at all); by default a fresh lookup."""
        return await self._call(self._core.peers, model, ping, max_age)

    async def rank(self, model: str | None = None) -> Plan:
        """The peers to try for ``model``, best first, and how each was scored (``--explain``)."""
        return await self._call(self._core.rank, model)

    async def pull(self, model: str, models_dir: str | Path | None = None, *,
                   progress: Callable[[int, int, int], None] | None = None) -> SwarmPull:
        """Fetch ``model``'s file (alias or model id) from the peers that seed it, several at
        once, every piece checked, into ``models_dir`` [default: the user's model cache];
        ``progress`` gets (bytes done, bytes total, peers sending). A cut-off pull resumes."""
        where = Path(models_dir) if models_dir is not None else self._core.settings.models_dir
        return await self._call(self._core.pull, model, where.resolve(), progress=progress)

    async def join(self, bootstrap: Sequence[str]) -> None:
        """Also join the swarm by these peers (those not joined yet); ``SwarmError`` if none answers."""
        await self._call(self._core.join, list(bootstrap))

    async def ban(self, peer_id: str) -> str:
        """Never choose ``peer_id`` again (kept across runs) until ``unban``; returns the breaker state."""
        return await self._call(self._core.set_banned, peer_id, True)

    async def unban(self, peer_id: str) -> str:
        """Lift a ban and close the peer's breaker."""
        return await self._call(self._core.set_banned, peer_id, False)

    def events(self) -> AsyncGenerator[SwarmEvent, None]:
        """Peers appearing, changing and leaving (the DHT is re-crawled every ``watch_interval``
        while someone listens), breaker changes and failovers."""
        return self._iterate(self._core.events())
