"""What this requester has seen of each peer, kept in sqlite (WAL: several processes at once).

Per peer: successes, failures, timeouts and integrity failures, each decaying with a half-life
(old news counts less), EWMAs of observed tokens/s and time to first token, a short-lived count
of Busy answers, and the circuit breaker. Reputation is a smoothed success ratio in [0, 1]
where an integrity failure weighs as much as four ordinary ones; a peer never seen starts at 1
(its breaker protects us).

Nothing here blocks its caller on the disk: reads come from memory (the whole table is read
once, at open), and every change is applied in memory at once and handed to one writer thread,
which applies the same change to the row in its own short transaction, so processes sharing
the file merge their counts rather than overwrite them.
"""

from __future__ import annotations

import json
import queue
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from .breaker import Breaker

Outcome = Literal["ok", "failed", "timeout", "integrity", "busy", "gone"]
HALF_LIFE_S = 24 * 3600.0
BUSY_HALF_LIFE_S = 30.0  # Busy says "not now", not "broken": it weighs for a short while only
EWMA_ALPHA = 0.3
INTEGRITY_WEIGHT = 4.0

_COLUMNS = ("peer_id", "successes", "failures", "timeouts", "integrity", "tokens_per_s", "ttft_ms",
            "updated_at", "breaker", "busy", "busy_at")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS peers (
    peer_id TEXT PRIMARY KEY,
    successes REAL NOT NULL DEFAULT 0,
    failures REAL NOT NULL DEFAULT 0,
    timeouts REAL NOT NULL DEFAULT 0,
    integrity REAL NOT NULL DEFAULT 0,
    tokens_per_s REAL,
    ttft_ms REAL,
    updated_at REAL NOT NULL,
    breaker TEXT NOT NULL DEFAULT '{}',
    busy REAL NOT NULL DEFAULT 0,
    busy_at REAL NOT NULL DEFAULT 0
)"""


@dataclass(frozen=True, slots=True)
class PeerRecord:
    peer_id: str
    successes: float = 0.0
    failures: float = 0.0
    timeouts: float = 0.0
    integrity: float = 0.0
    tokens_per_s: float | None = None
    ttft_ms: float | None = None
    updated_at: float = 0.0
    breaker: Breaker = Breaker()
    busy: float = 0.0  # Busy answers, decaying with BUSY_HALF_LIFE_S from busy_at
    busy_at: float = 0.0

    @property
    def reputation(self) -> float:
        bad = self.failures + self.timeouts + INTEGRITY_WEIGHT * self.integrity
        return (self.successes + 2.0) / (self.successes + bad + 2.0)

    def busy_now(self, now: float) -> float:
        return self.busy * 0.5 ** (max(0.0, now - self.busy_at) / BUSY_HALF_LIFE_S)

    def busy_factor(self, now: float) -> float:
        """Multiplies the peer's score: 1 when it has not been busy lately, 1/2 after one
        recent Busy, 1/3 after two... (a peer that keeps saying Busy sinks, then recovers)."""
        return 1.0 / (1.0 + self.busy_now(now))

    def decayed(self, now: float) -> PeerRecord:
        if now <= self.updated_at:
            return self
        k = 0.5 ** ((now - self.updated_at) / HALF_LIFE_S)
        return replace(self, successes=self.successes * k, failures=self.failures * k, timeouts=self.timeouts * k,
                       integrity=self.integrity * k, updated_at=now)


def _ewma(old: float | None, new: float | None) -> float | None:
    if new is None:
        return old
    return new if old is None else (1 - EWMA_ALPHA) * old + EWMA_ALPHA * new


Change = Callable[[PeerRecord], PeerRecord]


class ReputationStore:
    """One sqlite file, read into memory at open; writes go through one writer thread."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._lock = threading.Lock()
        self._cache: dict[str, PeerRecord] = {}
        db = self._connect()
        for row in db.execute(f"SELECT {', '.join(_COLUMNS)} FROM peers"):
            self._cache[row[0]] = _from_row(row)
        db.close()
        self._writes: queue.SimpleQueue[tuple[str, float, Change] | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="reputation-writer", daemon=True)
        self._writer.start()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self._path, timeout=10.0, isolation_level=None, check_same_thread=False)
        # Switching a new file to WAL can fail with SQLITE_BUSY at once, without waiting on the
        # busy timeout, when another process is doing the same: retry for a few seconds.
        for attempt in range(100):
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(_SCHEMA)
                have = {r[1] for r in db.execute("PRAGMA table_info(peers)")}
                for col in ("busy", "busy_at"):  # files written before these columns existed
                    if col not in have:
                        db.execute(f"ALTER TABLE peers ADD COLUMN {col} REAL NOT NULL DEFAULT 0")
                break
            except sqlite3.OperationalError as exc:
                if ("locked" not in str(exc) and "duplicate column" not in str(exc)) or attempt == 99:
                    raise
                time.sleep(0.02 + 0.03 * random.random())
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def close(self) -> None:
        """Write out what is pending (bounded: 10 s) and stop the writer."""
        self._writes.put(None)
        self._writer.join(timeout=10)

    def flush(self) -> None:
        """Wait until every change made so far is on disk (tests, and before a process exits)."""
        done = threading.Event()
        def mark_done(r: Any) -> Any:
            done.set()
            return r

        self._writes.put(("", 0.0, mark_done))
        done.wait(10)

    def _write_loop(self) -> None:
        db = self._connect()
        try:
            while (item := self._writes.get()) is not None:
                peer_id, now, change = item
                if not peer_id:
                    change(PeerRecord(""))
                    continue
                try:
                    merged = self._apply(db, peer_id, now, change)
                except sqlite3.Error:
                    continue  # the in-memory record stands; the disk catches up next time
                with self._lock:
                    self._cache[peer_id] = merged
        finally:
            db.close()

    @staticmethod
    def _apply(db: sqlite3.Connection, peer_id: str, now: float, change: Change) -> PeerRecord:
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM peers WHERE peer_id = ?", (peer_id,)).fetchone()
            r = change(_from_row(row).decayed(now) if row else PeerRecord(peer_id, updated_at=now))
            db.execute(f"INSERT OR REPLACE INTO peers VALUES ({', '.join('?' * len(_COLUMNS))})", _to_row(r))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return r

    def get(self, peer_id: str, now: float | None = None) -> PeerRecord:
        now = time.time() if now is None else now
        with self._lock:
            r = self._cache.get(peer_id)
        return r.decayed(now) if r else PeerRecord(peer_id, updated_at=now)

    def _update(self, peer_id: str, now: float, change: Change) -> PeerRecord:
        with self._lock:
            old = self._cache.get(peer_id)
            r = change(old.decayed(now) if old else PeerRecord(peer_id, updated_at=now))
            self._cache[peer_id] = r
        self._writes.put((peer_id, now, change))
        return r

    def record(self, peer_id: str, outcome: Outcome, *, tokens_per_s: float | None = None,
               ttft_ms: float | None = None, now: float | None = None) -> PeerRecord:
        """Count one request's outcome and move the peer's breaker accordingly. ``busy`` and
        ``gone`` (the requester gave up) say nothing of the peer's health: neither touches its
        reputation, and both free a half-open breaker's trial; ``busy`` lowers its score for
        a short while."""
        now = time.time() if now is None else now

        def change(r: PeerRecord) -> PeerRecord:
            if outcome == "ok":
                return replace(r, successes=r.successes + 1, tokens_per_s=_ewma(r.tokens_per_s, tokens_per_s),
                               ttft_ms=_ewma(r.ttft_ms, ttft_ms), updated_at=now, breaker=r.breaker.success(now))
            if outcome == "busy":
                return replace(r, busy=r.busy_now(now) + 1, busy_at=now, breaker=r.breaker.release(now))
            if outcome == "gone":
                return replace(r, breaker=r.breaker.release(now))
            counts = {"failed": (1, 0, 0), "timeout": (0, 1, 0), "integrity": (0, 0, 1)}[outcome]
            return replace(r, failures=r.failures + counts[0], timeouts=r.timeouts + counts[1],
                           integrity=r.integrity + counts[2], updated_at=now,
                           breaker=r.breaker.failure(now, integrity=outcome == "integrity"))

        return self._update(peer_id, now, change)

    def start_trial(self, peer_id: str, now: float | None = None) -> PeerRecord:
        now = time.time() if now is None else now
        return self._update(peer_id, now, lambda r: replace(r, breaker=r.breaker.start_trial(now)))

    def ban(self, peer_id: str) -> PeerRecord:
        return self._update(peer_id, time.time(), lambda r: replace(r, breaker=r.breaker.ban()))

    def reset(self, peer_id: str) -> PeerRecord:
        """Forget a peer's breaker (and ban); its counts stay, and decay as usual."""
        return self._update(peer_id, time.time(), lambda r: replace(r, breaker=Breaker()))


def _from_row(row: tuple) -> PeerRecord:
    return PeerRecord(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7],
                      Breaker.from_dict(json.loads(row[8] or "{}")), row[9] or 0.0, row[10] or 0.0)


def _to_row(r: PeerRecord) -> tuple:
    return (r.peer_id, r.successes, r.failures, r.timeouts, r.integrity, r.tokens_per_s, r.ttft_ms,
            r.updated_at, json.dumps(asdict(r.breaker)), r.busy, r.busy_at)
