"""The seeding side of ``/gputorrent/pieces/1``: a serving peer hands out the pieces of the
model file it serves, so a new donor can fetch the model from the swarm instead of a hub.

Two paths: piece frames on the libp2p stream itself, or, when this peer has an address of
its own, a ticket for a plain TCP connection on the same address (models/pieces.py says why:
py-libp2p moves bulk bytes at a fifth of a plain download's speed).

Bounded and second to inference: at most ``streams`` piece streams at once, an optional cap on
upload bytes per second, and while the engine has requests running or queued, one piece
stream at a time at no more than ``busy_rate`` bytes/s (token streams first). A requester
sends ``PieceAsk`` frames on one stream, one at a time, and closes it when done; a stream
idle for ``IDLE_S`` is dropped. Private swarms seed only inside the swarm key, as every other
protocol does: the host refuses anyone without it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import trio

from .. import wire
from ..models import pieces
from ..net.host import finish_stream, remote_peer_id
from .faults import Fault

log = logging.getLogger("gputorrent.seeder")

STREAMS = 4  # piece streams served at once
BUSY_RATE = 4 << 20  # bytes/s while the engine has requests running or queued
IDLE_S = 10.0  # a piece stream with no request for this long is dropped
WRITE_S = 30.0  # one piece written in at most this long (a reader that stalls is dropped)
TICKET_S = 30.0  # a direct-path ticket is good for one connection within this long
MAX_TICKETS = 1024
GIANT = 1 << 28  # the piece size the giant-pieces fault claims


@dataclass(slots=True)
class SeedStats:
    streams: int = 0
    pieces: int = 0
    bytes: int = 0
    refused: int = 0


@dataclass(slots=True)
class Seeder:
    """Serves the files in ``files`` (file id, i.e. sha256 -> (path, manifest))."""

    files: dict[str, tuple[Path, pieces.Manifest]]
    busy: Callable[[], bool] = lambda: False
    streams: int = STREAMS
    rate: int = 0  # bytes/s, all streams together; 0: no cap
    busy_rate: int = BUSY_RATE
    allow: frozenset[str] | None = None
    fault: Fault | None = None
    stats: SeedStats = field(default_factory=SeedStats)
    direct_port: int = 0  # the direct path's TCP port once run_direct listens; 0: none
    _tickets: dict[bytes, tuple[str, float]] = field(default_factory=dict)  # token -> (file id, expiry)
    _slots: trio.Semaphore | None = None
    _busy_lock: trio.Lock = field(default_factory=trio.Lock)
    _next_send: float = 0.0  # trio time before which the rate cap lets no more bytes out

    def root(self, file_id: str) -> str:
        """The Merkle root announced for ``file_id`` (what ``wrong-manifest`` sends is not it)."""
        return self._told(self.files[file_id][1]).root

    def _told(self, manifest: pieces.Manifest) -> pieces.Manifest:
        """The piece list this peer hands out: its own, or a fault's lie (with its own root)."""
        kind = self.fault.kind if self.fault else ""
        if kind == "wrong-root-busy":  # a list of its own, announced as such; then every piece is "busy"
            return pieces.Manifest(manifest.size, manifest.piece_size, bytes(reversed(manifest.hashes)))
        if kind == "giant-pieces":  # 256 MiB pieces of a 4 GiB file, to make a fetcher allocate them
            return pieces.Manifest(GIANT * 16, GIANT, os.urandom(pieces.HASH) * 16)
        return manifest

    def _slots_now(self) -> trio.Semaphore:
        if self._slots is None:
            self._slots = trio.Semaphore(self.streams)
        return self._slots

    async def handle(self, stream: Any) -> None:
        self._slots = self._slots_now()
        requester = remote_peer_id(stream)
        if self.allow is not None and requester not in self.allow:
            await self._refuse(stream, "not_allowed", "this peer seeds only to its allowlist")
            return
        if self._slots.value == 0:
            await self._refuse(stream, "busy", f"this peer is seeding to {self.streams} peers already; "
                                               "ask another")
            return
        async with self._slots:
            self.stats.streams += 1
            try:
                await self._serve(stream)
            except Exception as exc:  # noqa: BLE001 (a piece stream that fails ends that stream only)
                log.debug("piece stream from %s ended with %r", requester, exc)
                await finish_stream(stream, reset=True)
                return
        await finish_stream(stream)

    async def _serve(self, stream: Any) -> None:
        reader = wire.FrameReader(stream, max_frame=1024)
        while True:
            payload = None
            with trio.move_on_after(IDLE_S):
                payload = await reader.read_frame()
            if payload is None:  # closed by the requester, or idle too long
                return
            try:
                ask = pieces.ask_decoder.decode(payload)
            except msgspec.ValidationError as exc:
                await self._refuse(stream, "bad_request", f"malformed piece request: {exc}")
                return
            except msgspec.DecodeError:
                await self._refuse(stream, "bad_request", "a piece request must be a msgpack PieceAsk")
                return
            held = self.files.get(ask.file_id)
            if held is None:
                await self._refuse(stream, "unknown_file", f"this peer does not seed {ask.file_id[:16]}…")
                return
            if isinstance(ask, pieces.TicketAsk) and self.fault and self.fault.kind == "wrong-root-busy":
                await self._refuse(stream, "busy", "busy")
                return
            if isinstance(ask, pieces.TicketAsk):
                await stream.write(wire.frame(pieces.encoder.encode(self._ticket(ask.file_id))))
                continue
            path, manifest = held
            if ask.index == -1:
                told = self._told(manifest)
                hashes = told.hashes
                if self.fault and self.fault.kind == "wrong-manifest":
                    hashes = bytes(reversed(hashes))
                await stream.write(wire.frame(pieces.encoder.encode(
                    pieces.ManifestReply(told.size, told.piece_size, hashes))))
                continue
            if self.fault and self.fault.kind == "wrong-root-busy":
                await self._refuse(stream, "busy", "busy")
                return
            if self.fault and self.fault.kind == "giant-pieces":
                await stream.write(wire.frame(pieces.encoder.encode(pieces.PieceHead(ask.index, GIANT))))
                await trio.sleep_forever()
            if ask.index >= manifest.count:
                await self._refuse(stream, "bad_request", f"piece {ask.index} of a {manifest.count}-piece file")
                return
            await self._send_piece(stream, path, manifest, ask.index)

    def _ticket(self, file_id: str) -> pieces.Ticket:
        if not self.direct_port:
            return pieces.Ticket(0, b"")
        now = trio.current_time()
        for token in [t for t, (_, until) in self._tickets.items() if until < now][:64]:
            del self._tickets[token]
        if len(self._tickets) >= MAX_TICKETS:
            del self._tickets[next(iter(self._tickets))]  # the oldest
        token = os.urandom(pieces.TOKEN)
        self._tickets[token] = (file_id, now + TICKET_S)
        return pieces.Ticket(self.direct_port, token)

    async def _piece(self, path: Path, manifest: pieces.Manifest, index: int) -> bytes:
        offset, length = manifest.span(index)
        data = await trio.to_thread.run_sync(_read, path, offset, length)
        if self.fault and self.fault.kind == "corrupt-pieces":
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return data

    async def _pace_part(self, n: int) -> None:
        if self.busy():  # token streams first: one piece stream at a time, slowly
            async with self._busy_lock:
                await self._pace(n, self.busy_rate)
        elif self.rate:
            await self._pace(n, self.rate)

    def _sent(self, n: int) -> None:
        self.stats.pieces += 1
        self.stats.bytes += n

    async def _send_piece(self, stream: Any, path: Path, manifest: pieces.Manifest, index: int) -> None:
        data = await self._piece(path, manifest, index)
        with trio.fail_after(WRITE_S):
            await stream.write(wire.frame(pieces.encoder.encode(pieces.PieceHead(index, len(data)))))
            for start in range(0, len(data), pieces.PART):
                part = data[start:start + pieces.PART]
                await self._pace_part(len(part))
                await stream.write(wire.frame(part))
        self._sent(len(data))

    # --- the direct path ------------------------------------------------------------------

    async def run_direct(self, ip: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen for direct-path connections on ``ip`` (the address libp2p listens on) until
        cancelled; ``direct_port`` says where."""
        listeners = await trio.open_tcp_listeners(0, host=ip)
        self.direct_port = listeners[0].socket.getsockname()[1]
        task_status.started(self.direct_port)
        try:
            await trio.serve_listeners(self._direct, listeners)
        finally:
            self.direct_port = 0

    async def _direct(self, conn: trio.SocketStream) -> None:
        async with conn:
            try:
                with trio.fail_after(IDLE_S):
                    token = await _receive_exactly(conn, pieces.TOKEN)
                held = self._tickets.pop(token or b"", None)
                if held is None or held[1] < trio.current_time():
                    return  # no ticket, a used one or an old one: nothing to say to it
                path, manifest = self.files[held[0]]
                slots = self._slots_now()
                with trio.move_on_after(IDLE_S) as waited:  # the ticket's stream is giving its slot back
                    await slots.acquire()
                if waited.cancelled_caught:
                    return
                try:
                    self.stats.streams += 1
                    await self._serve_direct(conn, path, manifest)
                finally:
                    slots.release()
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError) as exc:
                log.debug("direct piece connection ended with %r", exc)

    async def _serve_direct(self, conn: trio.SocketStream, path: Path, manifest: pieces.Manifest) -> None:
        while True:
            asked = None
            with trio.move_on_after(IDLE_S):
                asked = await _receive_exactly(conn, pieces.INDEX.size)
            if asked is None:
                return
            (index,) = pieces.INDEX.unpack(asked)
            if self.fault and self.fault.kind == "giant-pieces":
                await conn.send_all(pieces.LENGTH.pack(GIANT))
                await trio.sleep_forever()
            if index >= manifest.count:
                return
            data = await self._piece(path, manifest, index)
            with trio.fail_after(WRITE_S):
                await conn.send_all(pieces.LENGTH.pack(len(data)))
                for start in range(0, len(data), pieces.PART):
                    await self._pace_part(min(pieces.PART, len(data) - start))
                    await conn.send_all(memoryview(data)[start:start + pieces.PART])
            self._sent(len(data))

    async def _pace(self, n: int, rate: int) -> None:
        """Wait until ``n`` more bytes fit under ``rate`` bytes/s (all streams share one clock)."""
        now = trio.current_time()
        start = max(now, self._next_send)
        self._next_send = start + n / rate
        if start > now:
            await trio.sleep(start - now)

    async def _refuse(self, stream: Any, code: str, message: str) -> None:
        self.stats.refused += 1
        try:
            with trio.move_on_after(2):
                await stream.write(wire.frame(pieces.encoder.encode(pieces.PieceRefused(code, message))))
        except Exception:  # noqa: BLE001, S110 (a requester already gone needs no refusal)
            pass
        await finish_stream(stream)


async def _receive_exactly(conn: trio.SocketStream, n: int) -> bytes | None:
    """``n`` bytes, or None when the other side closed first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = await conn.receive_some(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _read(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)
