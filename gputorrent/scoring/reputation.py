"""What this requester has seen of each peer, kept in sqlite (WAL: several processes at once).

Per peer: successes, failures, timeouts and integrity failures, each decaying with a half-life
(old news counts less), EWMAs of observed tokens/s and time to first token, and the circuit
breaker. Reputation is a smoothed success ratio in [0, 1] where an integrity failure weighs
as much as four ordinary ones; a peer never seen starts at 1 (its breaker protects us).
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from .breaker import Breaker

Outcome = Literal["ok", "failed", "timeout", "integrity"]
HALF_LIFE_S = 24 * 3600.0
EWMA_ALPHA = 0.3
INTEGRITY_WEIGHT = 4.0

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
    breaker TEXT NOT NULL DEFAULT '{}'
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

    @property
    def reputation(self) -> float:
        bad = self.failures + self.timeouts + INTEGRITY_WEIGHT * self.integrity
        return (self.successes + 2.0) / (self.successes + bad + 2.0)

    def decayed(self, now: float) -> PeerRecord:
        if now <= self.updated_at:
            return self
        k = 0.5 ** ((now - self.updated_at) / HALF_LIFE_S)
        return PeerRecord(self.peer_id, self.successes * k, self.failures * k, self.timeouts * k,
                          self.integrity * k, self.tokens_per_s, self.ttft_ms, now, self.breaker)


def _ewma(old: float | None, new: float | None) -> float | None:
    if new is None:
        return old
    return new if old is None else (1 - EWMA_ALPHA) * old + EWMA_ALPHA * new


class ReputationStore:
    """One sqlite file; every update is one short IMMEDIATE transaction."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=10.0, isolation_level=None)
        # Switching a new file to WAL can fail with SQLITE_BUSY at once, without waiting on the
        # busy timeout, when another process is doing the same: retry for a few seconds.
        for attempt in range(100):
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute(_SCHEMA)
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 99:
                    raise
                time.sleep(0.02 + 0.03 * random.random())
        self._db.execute("PRAGMA synchronous=NORMAL")

    def close(self) -> None:
        self._db.close()

    def _row(self, peer_id: str) -> PeerRecord | None:
        row = self._db.execute("SELECT * FROM peers WHERE peer_id = ?", (peer_id,)).fetchone()
        if row is None:
            return None
        b = json.loads(row[8] or "{}")
        b["failures"] = tuple(b.get("failures", ()))
        return PeerRecord(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], Breaker(**b))

    def _write(self, r: PeerRecord) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO peers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (r.peer_id, r.successes, r.failures, r.timeouts, r.integrity, r.tokens_per_s, r.ttft_ms,
             r.updated_at, json.dumps(asdict(r.breaker))),
        )

    def get(self, peer_id: str, now: float | None = None) -> PeerRecord:
        now = time.time() if now is None else now
        r = self._row(peer_id)
        return r.decayed(now) if r else PeerRecord(peer_id, updated_at=now)

    def all(self, now: float | None = None) -> list[PeerRecord]:
        now = time.time() if now is None else now
        ids = [row[0] for row in self._db.execute("SELECT peer_id FROM peers ORDER BY peer_id")]
        return [self.get(pid, now) for pid in ids]

    def _update(self, peer_id: str, now: float, change) -> PeerRecord:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            r = change(self.get(peer_id, now))
            self._write(r)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return r

    def record(self, peer_id: str, outcome: Outcome, *, tokens_per_s: float | None = None,
               ttft_ms: float | None = None, now: float | None = None) -> PeerRecord:
        """Count one request's outcome and move the peer's breaker accordingly."""
        now = time.time() if now is None else now

        def change(r: PeerRecord) -> PeerRecord:
            if outcome == "ok":
                return PeerRecord(r.peer_id, r.successes + 1, r.failures, r.timeouts, r.integrity,
                                  _ewma(r.tokens_per_s, tokens_per_s), _ewma(r.ttft_ms, ttft_ms), now,
                                  r.breaker.success(now))
            counts = {"failed": (1, 0, 0), "timeout": (0, 1, 0), "integrity": (0, 0, 1)}[outcome]
            return PeerRecord(r.peer_id, r.successes, r.failures + counts[0], r.timeouts + counts[1],
                              r.integrity + counts[2], r.tokens_per_s, r.ttft_ms, now,
                              r.breaker.failure(now, integrity=outcome == "integrity"))

        return self._update(peer_id, now, change)

    def start_trial(self, peer_id: str, now: float | None = None) -> PeerRecord:
        now = time.time() if now is None else now
        return self._update(peer_id, now, lambda r: _with_breaker(r, r.breaker.start_trial(now)))

    def ban(self, peer_id: str) -> PeerRecord:
        now = time.time()
        return self._update(peer_id, now, lambda r: _with_breaker(r, r.breaker.ban()))

    def reset(self, peer_id: str) -> PeerRecord:
        """Forget a peer's breaker (and ban); its counts stay, and decay as usual."""
        now = time.time()
        return self._update(peer_id, now, lambda r: _with_breaker(r, Breaker()))


def _with_breaker(r: PeerRecord, b: Breaker) -> PeerRecord:
    return PeerRecord(r.peer_id, r.successes, r.failures, r.timeouts, r.integrity, r.tokens_per_s, r.ttft_ms,
                      r.updated_at, b)
