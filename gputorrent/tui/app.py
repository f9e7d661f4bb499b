"""``gputorrent tui``: the swarm, live, in a terminal.

A Textual app over the API's ``Swarm`` (trio hosted as a guest on Textual's asyncio loop).
The peers table follows ``Swarm.events()`` (a DHT crawl with pings every couple of seconds);
answers stream in a worker, so the table, keys and log stay live while tokens arrive. The table
shows as many columns as the terminal has room for, by priority (80x24 keeps peer, models, load
and breaker); the chat keeps its conversation until Ctrl+N; sparklines show the swarm's busy
tokens/s and the selected peer's load over the last minutes.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from rich.markup import escape
from rich.text import Text as RichText
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import DataTable, Footer, Header, Input, RichLog, Sparkline, Static

from ..api import (
    AskFailed,
    BreakerChanged,
    Failover,
    Finished,
    PeerLeft,
    PeerSeen,
    PeerStatus,
    Text,
)
from ..api.rows import breaker, cells, short_id

REPAINT_S = 0.1
HISTORY = 90  # samples kept for a sparkline (one per crawl, ~2 s each: three minutes)
SAMPLE_S = 2.0  # at most one sample of the swarm's total this often

# tokens/s is in the header's total and the detail pane; the table keeps to what fits.
COLUMNS = ("peer", "name", "device", "VRAM MB", "models", "load", "RTT ms", "reach", "rep", "breaker")
# What a narrow terminal keeps, most wanted first, with each column's width (cell padding included).
PRIORITY = ("peer", "models", "load", "breaker", "RTT ms", "rep", "device", "name", "reach", "VRAM MB")
WIDTH = {"peer": 13, "name": 16, "device": 20, "VRAM MB": 13, "models": 10, "load": 7, "RTT ms": 8, "reach": 12,
         "rep": 6, "breaker": 15}
WIDE = 120  # from here the chat pane is its full width


def columns_for(width: int) -> tuple[str, ...]:
    """The columns of ``COLUMNS`` that fit in ``width`` cells, chosen by ``PRIORITY``, in table order."""
    chosen: set[str] = set()
    used = 0
    for col in PRIORITY:
        if used + WIDTH[col] <= width or not chosen:
            chosen.add(col)
            used += WIDTH[col]
    return tuple(c for c in COLUMNS if c in chosen)


def busy_tokens_per_s(peers: list[PeerStatus]) -> float:
    """What the swarm is producing now, as its adverts tell: the speed of every peer at work."""
    return sum(p.advert.tokens_per_s for p in peers if p.advert.load.active > 0)


def load_of(p: PeerStatus) -> float:
    """Requests running and waiting per slot: 1.0 is full, above it a queue."""
    load = p.advert.load
    return (load.active + load.queued) / max(1, load.slots)


def totals(peers: list[PeerStatus]) -> str:
    """The header line: peers, models, VRAM offered and tokens/s across the swarm."""
    models = {m.alias for p in peers for m in p.advert.models}
    vram = sum(p.advert.device.vram_total_mb for p in peers)
    gpus = sum(1 for p in peers if p.advert.device.kind == "gpu")
    speed = sum(p.advert.tokens_per_s for p in peers)
    return (f"{_n(len(peers), 'peer')} ({gpus} GPU) · {_n(len(models), 'model')} · {vram / 1024:.1f} GB VRAM · "
            f"{speed:.0f} tokens/s")


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def detail(p: PeerStatus) -> str:
    """The detail pane, as markup; every string from the (untrusted) advert is escaped."""
    a, d = p.advert, p.advert.device
    where = (f"{d.name}, {d.vram_free_mb}/{d.vram_total_mb} MB VRAM free, compute {d.compute}"
             if d.kind == "gpu" else f"{d.name}, {d.cores} cores, {d.ram_mb} MB RAM")
    models = "; ".join(f"{m.alias} {m.quantization} ctx {m.context_length} ({m.model_id[:12]})" for m in a.models)
    seen = p.observed
    return (f"[b]{escape(a.name or '(no name)')}[/b]  {a.peer_id}\n"
            f"device   {escape(where)}\nmodels   {escape(models or '-')}\n"
            f"load     {a.load.active} active / {a.load.slots} slots, {a.load.queued} queued; "
            f"{a.tokens_per_s:.0f} tokens/s announced\n"
            f"address  {escape(a.addrs[0] if a.addrs else '-')}\n"
            f"yours    reputation {p.reputation:.2f}, breaker {breaker(p)}, RTT "
            f"{'-' if p.rtt_ms is None else f'{p.rtt_ms:.0f} ms'}, "
            f"{seen.get('successes', 0):.0f} ok / {seen.get('failures', 0):.0f} failed / "
            f"{seen.get('integrity_failures', 0):.0f} integrity\n"
            f"give     got {p.got:.0f} tokens from it (its credit here), gave {p.gave:.0f} to its user")


class Answer(Static):
    """One answer, growing as its tokens arrive."""


class SwarmApp(App):
    TITLE = "gputorrent"
    CSS = """
    #totals { height: 1; padding: 0 1; background: $boost; }
    #main { height: 1fr; }
    #left { width: 1fr; }
    #right { width: 44; border-left: solid $primary; }
    #right.narrow { width: 30; }
    #peers { height: 1fr; }
    #detail { height: 9; padding: 0 1; border-top: solid $primary; }
    .spark-row { height: 1; padding: 0 1; }
    .spark-label { width: 9; color: $text-muted; }
    Sparkline { width: 1fr; }
    #chat { height: 1fr; padding: 0 1; }
    #hints { height: 1; padding: 0 1; color: $text-muted; }
    .short #detail { height: 6; }
    .short #log { height: 3; }
    .question { color: $accent; margin-top: 1; }
    .meta { color: $text-muted; }
    #log { height: 7; border-top: solid $primary; }
    """
    BINDINGS = [
        Binding("a", "ask", "Ask"),
        Binding("r", "refresh", "Refresh"),
        Binding("b", "ban", "Ban/unban"),
        Binding("m", "filter_model", "Filter model"),
        Binding("q", "quit", "Quit"),
        Binding("ctrl+n", "new_chat", "New chat", priority=True),  # works while typing, too
        Binding("escape", "leave_input", "Back to peers", show=False, priority=True),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),  # what users press to stop
    ]

    def __init__(self, swarm: Any, *, model: str | None = None, params: dict[str, Any] | None = None) -> None:
        """``swarm``: an un-entered ``gputorrent.Swarm`` (the app enters and leaves it);
        ``params``: sampling parameters for the chat (``temperature``, ``max_tokens``, ...)."""
        super().__init__()
        self.swarm = swarm
        self.model = model
        self.params = dict(params or {})
        self.peers: dict[str, PeerStatus] = {}
        self.connected = False
        self.asking = False
        self.columns: tuple[str, ...] = COLUMNS
        self.messages: list[dict[str, str]] = []  # the conversation so far, sent with each question
        self.speed_history: deque[float] = deque(maxlen=HISTORY)
        self.load_history: dict[str, deque[float]] = {}
        self._sampled = 0.0

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("joining the swarm…", id="totals")
        with Horizontal(id="main"):
            with Vertical(id="left"):
                yield DataTable(id="peers", cursor_type="row", zebra_stripes=True)
                yield Static("select a peer to see its details", id="detail")
                with Horizontal(classes="spark-row"):
                    yield Static("its load", classes="spark-label")
                    yield Sparkline([], id="peer-load", summary_function=max)
            with Vertical(id="right"):
                with Horizontal(classes="spark-row"):
                    yield Static("busy t/s", classes="spark-label")
                    yield Sparkline([], id="swarm-speed", summary_function=max)
                yield VerticalScroll(id="chat")
                yield Input(placeholder="ask the swarm…", id="prompt")
                yield Static("⏎ send · Esc back · ^N new", id="hints")
        yield RichLog(id="log", max_lines=500, markup=True)
        yield Footer()

    def on_mount(self) -> None:
        self._layout(self.size.width)
        self.sub_title = self._filter_label()
        self.connect()

    def on_resize(self, event: Any) -> None:
        self._layout(event.size.width)

    def _layout(self, width: int) -> None:
        """The chat pane's width and the table's columns for a terminal ``width`` cells wide;
        a short terminal gets a shorter detail pane and log."""
        self.screen.set_class(self.size.height < 36, "short")
        right = self.query_one("#right")
        right.set_class(width < WIDE, "narrow")
        cols = columns_for(width - (30 if width < WIDE else 44) - 2)
        table = self.query_one("#peers", DataTable)
        if cols == self.columns and table.columns:
            return
        self.columns = cols
        table.clear(columns=True)
        for col in cols:  # the breaker column is sized for "half-open" and "open (banned)" up front
            table.add_column(col, key=col, width=13 if col == "breaker" else None)
        for p in self.peers.values():
            if self._visible(p):
                row = cells(p)
                table.add_row(*(self._cell(c, row[c]) for c in cols), key=p.peer_id)

    async def on_unmount(self) -> None:
        if self.connected:
            self.connected = False
            await self.swarm.__aexit__(None, None, None)

    # --- the swarm ------------------------------------------------------------------------

    @work(exclusive=True, group="swarm")
    async def connect(self) -> None:
        try:
            await self.swarm.__aenter__()
        except Exception as exc:  # noqa: BLE001 (shown, not raised: the app stays up to say what went wrong)
            self.log_line(f"[red]could not join the swarm:[/] {escape(str(exc))}")
            self.query_one("#totals", Static).update(escape(f"not connected: {exc}"))
            return
        self.connected = True
        self.log_line(f"joined as {short_id(self.swarm.peer_id)}")
        await self.refresh_peers()
        async for ev in self.swarm.events():
            if isinstance(ev, PeerSeen):
                if ev.new and ev.peer.peer_id not in self.peers:
                    self.log_line(f"peer joined: {short_id(ev.peer.peer_id)} {escape(ev.peer.advert.name)}")
                self.upsert(ev.peer)
            elif isinstance(ev, PeerLeft):
                self.log_line(f"peer left: {short_id(ev.peer_id)}")
                self.remove(ev.peer_id)
            elif isinstance(ev, BreakerChanged):
                self.log_line(f"breaker of {short_id(ev.peer_id)} is now [b]{ev.state}[/b]")
            elif isinstance(ev, Failover):
                self.log_line(f"[yellow]failover[/]: {short_id(ev.peer_id)} {ev.outcome} after {ev.tokens_so_far} "
                              f"tokens ({escape(ev.error)})")

    async def refresh_peers(self) -> None:
        found = await self.swarm.peers(ping=True)
        for pid in set(self.peers) - {p.peer_id for p in found}:
            self.remove(pid)
        for p in found:
            self.upsert(p)

    def _visible(self, p: PeerStatus) -> bool:
        return self.model is None or p.advert.serves(self.model) is not None

    def upsert(self, p: PeerStatus) -> None:
        self.peers[p.peer_id] = p
        self.load_history.setdefault(p.peer_id, deque(maxlen=HISTORY)).append(load_of(p))
        table = self.query_one("#peers", DataTable)
        if not self._visible(p):
            if p.peer_id in table.rows:
                table.remove_row(p.peer_id)
        elif p.peer_id in table.rows:
            row = cells(p)
            for col in self.columns:
                table.update_cell(p.peer_id, col, self._cell(col, row[col]))
        else:
            row = cells(p)
            table.add_row(*(self._cell(c, row[c]) for c in self.columns), key=p.peer_id)
        self._update_totals()
        self._show_detail()

    def remove(self, peer_id: str) -> None:
        self.peers.pop(peer_id, None)
        self.load_history.pop(peer_id, None)
        table = self.query_one("#peers", DataTable)
        if peer_id in table.rows:
            table.remove_row(peer_id)
        self._update_totals()

    @staticmethod
    def _cell(col: str, value: str) -> RichText:
        """A cell as plain text: names come from other peers' adverts and must not be markup."""
        if col == "breaker" and value != "closed":
            return RichText(value, style="bold red" if value.startswith("open") else "yellow")
        return RichText(value)

    def _update_totals(self) -> None:
        shown = [p for p in self.peers.values() if self._visible(p)]
        self.query_one("#totals", Static).update(totals(shown))
        now = time.monotonic()
        if now - self._sampled >= SAMPLE_S or not self.speed_history:
            self._sampled = now
            self.speed_history.append(busy_tokens_per_s(shown))
        self.query_one("#swarm-speed", Sparkline).data = [0.0, *self.speed_history]  # drawn from zero

    def _selected(self) -> PeerStatus | None:
        table = self.query_one("#peers", DataTable)
        if table.row_count == 0:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return self.peers.get(key) if key is not None else None

    def _show_detail(self) -> None:
        p = self._selected()
        self.query_one("#detail", Static).update(detail(p) if p else "select a peer to see its details")
        self.query_one("#peer-load", Sparkline).data = [0.0, *self.load_history.get(p.peer_id, ())] if p else []

    @on(DataTable.RowHighlighted)
    def _highlighted(self) -> None:
        self._show_detail()

    def log_line(self, text: str) -> None:
        self.query_one("#log", RichLog).write(f"[dim]{time.strftime('%H:%M:%S')}[/] {text}")

    def _filter_label(self) -> str:
        return f"model: {self.model}" if self.model else "all models"

    # --- actions --------------------------------------------------------------------------

    def action_ask(self) -> None:
        self.query_one("#prompt", Input).focus()

    def action_leave_input(self) -> None:
        """Escape: from the question box back to the peers table (its keys work again)."""
        self.query_one("#peers", DataTable).focus()

    async def action_new_chat(self) -> None:
        """Ctrl+N: forget the conversation; the next question starts a new one."""
        if self.asking:
            return
        self.messages = []
        chat = self.query_one("#chat", VerticalScroll)
        await chat.remove_children()
        await chat.mount(Static("a new conversation", classes="meta"))

    async def action_refresh(self) -> None:
        if self.connected:
            await self.refresh_peers()
            self.log_line("refreshed")

    async def action_ban(self) -> None:
        p = self._selected()
        if p is None or not self.connected:
            return
        state = await (self.swarm.unban(p.peer_id) if p.banned else self.swarm.ban(p.peer_id))
        verb = "unbanned" if p.banned else "banned"
        self.log_line(f"{verb} {short_id(p.peer_id)}: breaker {state}")
        fresh = {q.peer_id: q for q in await self.swarm.peers()}
        if p.peer_id in fresh:
            self.upsert(fresh[p.peer_id])

    def action_filter_model(self) -> None:
        """Cycle: all models, then each model the swarm serves."""
        models = sorted({m.alias for p in self.peers.values() for m in p.advert.models})
        cycle = [None, *models]
        self.model = cycle[(cycle.index(self.model) + 1) % len(cycle)] if self.model in cycle else None
        self.sub_title = self._filter_label()
        for p in list(self.peers.values()):
            self.upsert(p)
        self._update_totals()

    @on(Input.Submitted, "#prompt")
    def _submitted(self, event: Input.Submitted) -> None:
        question = event.value.strip()
        if not question or self.asking:
            return
        event.input.value = ""
        self.ask(question)

    @work(exclusive=True, group="ask")
    async def ask(self, question: str) -> None:
        chat = self.query_one("#chat", VerticalScroll)
        # Questions and answers are shown as typed and as generated: never read as markup.
        await chat.mount(Static(f"> {question}", classes="question", markup=False))
        answer, meta = Answer("", markup=False), Static("", classes="meta")
        await chat.mount(answer, meta)
        if not self.connected:
            meta.update("[red]not connected to the swarm[/]")
            return
        self.asking = True
        text: list[str] = []
        shown = 0.0
        asked = [*self.messages, {"role": "user", "content": question}]
        try:
            async for ev in self.swarm.stream(asked, model=self.model, **self.params):
                if isinstance(ev, Text):
                    text.append(ev.text)
                    # Repaint at most every REPAINT_S: a repaint per token cost the serving
                    # peer (on the same machine) three quarters of its speed in the tests.
                    if time.monotonic() - shown >= REPAINT_S:
                        shown = time.monotonic()
                        answer.update("".join(text))
                        meta.update(f"from {short_id(ev.peer_id)}…")
                        chat.scroll_end(animate=False)
                elif isinstance(ev, Failover):
                    meta.update(f"[yellow]{short_id(ev.peer_id)} {ev.outcome}; continuing on the next peer…[/]")
                elif isinstance(ev, Finished):
                    a = ev.answer
                    answer.update(a.text)
                    self.messages = [*asked, {"role": "assistant", "content": a.text}]
                    hops = " → ".join(f"{short_id(t.peer_id)} {t.outcome}" for t in a.attempts)
                    meta.update(f"answered by {short_id(a.peer_id)} · {a.usage['completion_tokens']} tokens · "
                                f"{a.tokens_per_s:.0f} tokens/s · receipt verified"
                                + (f" · failover: {hops}" if len(a.attempts) > 1 else ""))
        except (AskFailed, ValueError) as exc:  # no peer could answer, or a request that cannot be sent
            meta.update(f"[red]{escape(str(exc))}[/]")
        finally:
            self.asking = False
            chat.scroll_end(animate=False)
