"""Give and take, as this machine saw it: tokens received from each identity (when its user
asked that identity's peer, counted from verified answers) and tokens served to each (when that
identity's user asked us). Reciprocity reads it: a serving peer admits first the identities it
received from. Nothing here is shared or gossiped; each machine keeps its own, in sqlite (WAL:
the serve process reads what the ask processes of the same user wrote).

Both counts decay with a half-life of an hour: what a peer gave last week buys little today,
as BitTorrent's rates over the last 20 s do, at the pace of people asking questions.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HALF_LIFE_S = 3600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (
    identity TEXT PRIMARY KEY,
    received REAL NOT NULL DEFAULT 0,
    served REAL NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL
)"""


@dataclass(frozen=True, slots=True)
class Entry:
    """Decayed to ``at``: tokens received from ``identity`` (its credit here) and served to it."""

    identity: str
    received: float
    served: float
    at: float


def _decay(value: float, since: float, now: float) -> float:
    return value * 0.5 ** (max(0.0, now - since) / HALF_LIFE_S)


class Ledger:
    """One sqlite file; each change is one short transaction, so processes add, not overwrite."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=5.0, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_SCHEMA)

    def add(self, identity: str, *, received: float = 0.0, served: float = 0.0, now: float | None = None) -> Entry:
        """Count tokens received from (or served to) ``identity``."""
        now = time.time() if now is None else now
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                old = self._entry(identity, now)
                new = Entry(identity, old.received + max(0.0, received), old.served + max(0.0, served), now)
                self._db.execute(
                    "INSERT INTO ledger (identity, received, served, updated_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(identity) DO UPDATE SET received=excluded.received, served=excluded.served, "
                    "updated_at=excluded.updated_at", (identity, new.received, new.served, now))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return new

    def settle(self, earned: dict[str, float], blamed: set[str], now: float | None = None) -> None:
        """One accepted answer: credit each peer the tokens it gave, except those caught lying
        in it (a spot check, a bad signature), who lose every token of credit they had here."""
        for identity in blamed:
            self.forfeit(identity, now)
        for identity, tokens in earned.items():
            if identity not in blamed and tokens > 0:
                self.add(identity, received=tokens, now=now)

    def forfeit(self, identity: str, now: float | None = None) -> None:
        """``identity`` was caught lying to this machine: what it gave counts for nothing, so
        its user is admitted here as a stranger again (what we served it stays counted)."""
        now = time.time() if now is None else now
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                old = self._entry(identity, now)
                self._db.execute(
                    "INSERT INTO ledger (identity, received, served, updated_at) VALUES (?, 0, ?, ?) "
                    "ON CONFLICT(identity) DO UPDATE SET received=0, served=excluded.served, "
                    "updated_at=excluded.updated_at", (identity, old.served, now))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def get(self, identity: str, now: float | None = None) -> Entry:
        with self._lock:
            return self._entry(identity, time.time() if now is None else now)

    def credit(self, identity: str, now: float | None = None) -> float:
        """What ``identity`` gave this machine, decayed: its place in our queue."""
        return self.get(identity, now).received

    def entries(self, now: float | None = None) -> list[Entry]:
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute("SELECT identity, received, served, updated_at FROM ledger").fetchall()
        return sorted((Entry(i, _decay(r, t, now), _decay(s, t, now), now) for i, r, s, t in rows),
                      key=lambda e: -(e.received + e.served))

    def _entry(self, identity: str, now: float) -> Entry:
        row = self._db.execute("SELECT received, served, updated_at FROM ledger WHERE identity = ?",
                               (identity,)).fetchone()
        if row is None:
            return Entry(identity, 0.0, 0.0, now)
        return Entry(identity, _decay(row[0], row[2], now), _decay(row[1], row[2], now), now)

    def close(self) -> None:
        with self._lock:
            self._db.close()
