"""The fetching side of ``/gputorrent/pieces/1``: a file from several seeding peers at once,
each piece checked against a trusted manifest before it is written.

Every source peer gets ``STREAMS_PER_PEER`` streams, each asking for one piece at a time from a
shared list of missing pieces; a faster peer simply comes back for more. Once nothing is left
to hand out, idle streams ask for pieces still in flight elsewhere (BitTorrent's endgame), so
one slow peer cannot hold up the last piece. A piece that fails its hash gets its sender
dropped (``caught``) and is fetched from another; a peer that times out or refuses twice is
dropped too. Written pieces stay on disk in ``DEST.part``: a fetch cut off resumes from them.

A fetch always ends: when its last source is dropped (or refused every stream as busy) it
fails at once, naming each source and why, and when no piece lands for ``STALL_S`` it fails
too. Memory is bounded by streams x piece size: a manifest's piece size is a function of the
file's size (``Manifest.well_formed``), and a piece's bytes are kept only as they arrive.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import trio

from .. import protocol, wire
from ..errors import GputorrentError
from ..models import pieces
from ..net.host import connect, direct_ip, finish_stream

log = logging.getLogger("gputorrent.fetch")

STREAMS_PER_PEER = 2
DIAL_S = 10.0
MANIFEST_S = 10.0
PIECE_MIN_S = 15.0  # one piece, at least; more for large pieces (at 0.5 MB/s)
STRIKES = 2  # timeouts or refusals before a peer is dropped
STALL_S = 60.0  # no piece landed from any source for this long: the fetch fails


class FetchError(GputorrentError):
    """A fetch that could not complete; what was written is kept for the next try."""


class PieceFailed(Exception):
    """A request that came back refused (the reason is the message; ``code`` is the seeder's)."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class Source:
    peer_id: str
    addrs: list[str]


@dataclass(slots=True)
class FetchReport:
    pieces_from: dict[str, int] = field(default_factory=dict)  # peer id -> verified pieces it sent
    caught: dict[str, str] = field(default_factory=dict)  # peer id -> why it was dropped for lying
    dropped: dict[str, str] = field(default_factory=dict)  # peer id -> why it was dropped otherwise
    resumed: int = 0  # pieces already on disk from an earlier try
    duplicates: int = 0  # endgame pieces that arrived twice
    direct: set[str] = field(default_factory=set)  # peers that sent pieces on the direct path
    sha256: str = ""  # of the whole file as written, once complete


async def fetch_manifest(host: Any, source: Source, file_id: str) -> pieces.Manifest:
    """The piece list ``source`` gives for ``file_id`` (not yet checked against any root)."""
    with trio.fail_after(DIAL_S + MANIFEST_S):
        await connect(host, source.addrs)
        stream = await host.new_stream(_id(source.peer_id), [protocol.PIECES])
        try:
            await stream.write(wire.frame(pieces.encoder.encode(pieces.PieceAsk(file_id, -1))))
            reply = _decode(await wire.FrameReader(stream).read_frame())
        finally:
            await finish_stream(stream)
    if not isinstance(reply, pieces.ManifestReply):
        raise _refused(reply)
    return pieces.Manifest(reply.size, reply.piece_size, reply.hashes)


def have_pieces(part: Path, manifest: pieces.Manifest) -> set[int]:
    """Pieces of an earlier, cut-off fetch already in ``part`` and matching the manifest."""
    if not part.is_file():
        return set()
    have = set()
    with open(part, "rb") as f:
        for i in range(manifest.count):
            offset, length = manifest.span(i)
            f.seek(offset)
            if manifest.check(i, f.read(length)):
                have.add(i)
    return have


async def fetch_file(host: Any, sources: Sequence[Source], file_id: str, manifest: pieces.Manifest, part: Path,
                     progress: Callable[[int, int, int], None] | None = None, *,
                     report: FetchReport | None = None) -> FetchReport:
    """Fill ``part`` with every piece of ``manifest`` from ``sources``. ``progress`` gets
    (bytes done, bytes total, peers sending). Raises ``FetchError`` when every source is gone
    with pieces missing; the verified pieces stay in ``part``, and ``report`` (when given)
    says who was dropped and why."""
    report = FetchReport() if report is None else report
    if not manifest.well_formed():  # callers check; a bound that allocation depends on is checked here too
        raise FetchError(f"refusing a piece list of {manifest.size} bytes in pieces of {manifest.piece_size}")
    _check_room(part, manifest.size)
    have = await trio.to_thread.run_sync(have_pieces, part, manifest)
    report.resumed = len(have)
    todo = [i for i in range(manifest.count) if i not in have]
    in_flight: dict[int, int] = {}
    done_bytes = sum(manifest.span(i)[1] for i in have)
    sending: set[str] = set()
    complete = trio.Event()
    written = trio.Event()  # set when a piece is written (the whole-file hash follows them)
    changed = [trio.Event()]  # set (and replaced) whenever a piece goes back to the list

    landed = set(have)  # verified and written, or being written

    def give_back(index: int) -> None:
        if index not in landed and index not in todo:
            todo.insert(0, index)
        changed[0].set()
        changed[0] = trio.Event()
    if not todo:
        complete.set()

    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, manifest.size)

        def next_piece(mine: set[int]) -> int | None:
            if todo:
                return todo.pop(0)
            spare = [i for i in in_flight if i not in landed and i not in mine]  # endgame
            return min(spare, key=in_flight.__getitem__) if spare else None

        async def worker(src: Source, gone: trio.CancelScope, strikes: list[int], busy: list[int]) -> None:
            nonlocal done_bytes
            mine: set[int] = set()
            channel: _Channel | None = None
            try:
                try:
                    with trio.fail_after(DIAL_S):
                        channel = await _open_channel(host, src, file_id)
                except PieceFailed as exc:
                    if exc.code == "busy":  # seeding to others already: its other streams go on
                        busy[0] += 1
                        return
                    raise
                if isinstance(channel, _Direct):
                    report.direct.add(src.peer_id)
                while not complete.is_set():
                    index = next_piece(mine)
                    if index is None:  # all handed out: wait in case one comes back (its sender dropped)
                        await changed[0].wait()
                        continue
                    mine.add(index)
                    in_flight[index] = in_flight.get(index, 0) + 1
                    try:
                        length = manifest.span(index)[1]
                        with trio.fail_after(max(PIECE_MIN_S, length / 500_000)):
                            data = await channel.get(index, length)
                        if not await trio.to_thread.run_sync(manifest.check, index, data):  # off the event loop
                            report.caught[src.peer_id] = f"piece {index} failed its sha256"
                            gone.cancel()
                            return
                        if index in landed:  # the endgame's other copy got here first
                            report.duplicates += 1
                            continue
                        landed.add(index)
                        with trio.CancelScope(shield=True):  # landed is written, even if we are cancelled now
                            await trio.to_thread.run_sync(os.pwrite, fd, data, manifest.span(index)[0])
                        have.add(index)
                        written.set()
                        stall.deadline = trio.current_time() + STALL_S
                    except (PieceFailed, trio.TooSlowError, wire.ProtocolError) as exc:
                        # The stream is done either way (a seeder closes it after a refusal).
                        strikes[0] += 1
                        if isinstance(exc, trio.TooSlowError) or strikes[0] >= STRIKES:
                            report.dropped[src.peer_id] = str(exc) or "a piece timed out"
                            gone.cancel()
                        return
                    finally:  # also when cancelled: a piece nobody is fetching any more goes back
                        mine.discard(index)
                        in_flight[index] -= 1
                        if not in_flight[index]:
                            del in_flight[index]
                            if index not in landed:
                                give_back(index)
                    done_bytes += len(data)
                    report.pieces_from[src.peer_id] = report.pieces_from.get(src.peer_id, 0) + 1
                    sending.add(src.peer_id)
                    if progress:
                        progress(done_bytes, manifest.size, len(sending))
                    if len(have) == manifest.count:
                        complete.set()
            except Exception as exc:  # noqa: BLE001 (a dial or stream failure ends that source only)
                if src.peer_id not in report.caught:
                    report.dropped.setdefault(src.peer_id, f"{type(exc).__name__}: {exc}"[:200])
            finally:
                sending.discard(src.peer_id)
                if channel is not None:
                    await channel.close(reset=not complete.is_set())

        live = [len(sources)]  # sources not yet dropped

        async def peer(src: Source, everyone: trio.CancelScope) -> None:
            strikes, busy = [0], [0]
            try:
                with trio.CancelScope() as gone:
                    async with trio.open_nursery() as n:
                        for _ in range(STREAMS_PER_PEER):
                            n.start_soon(worker, src, gone, strikes, busy)
            finally:  # every stream of this source has ended
                live[0] -= 1
                if not complete.is_set() and src.peer_id not in report.caught and not stall.cancel_called:
                    report.dropped.setdefault(src.peer_id, "refused every stream as busy" if busy[0]
                                              else "stopped sending")
                if not live[0]:  # nobody left to send what is missing: end now, not never
                    everyone.cancel()

        async def whole_file_hash() -> None:
            """The file's sha256, over the written prefix as it grows: by the last piece it is
            nearly done, where hashing the finished file took as long as a third of the fetch."""
            nonlocal written
            digest, next_index = hashlib.sha256(), 0
            while next_index < manifest.count:
                if next_index not in have:
                    await written.wait()
                    written = trio.Event()
                    continue
                offset, length = manifest.span(next_index)
                data = await trio.to_thread.run_sync(os.pread, fd, length, offset)
                await trio.to_thread.run_sync(digest.update, data)
                next_index += 1
            report.sha256 = digest.hexdigest()

        stall = trio.CancelScope(deadline=trio.current_time() + STALL_S)
        async with trio.open_nursery() as n:
            with stall:
                async with trio.open_nursery() as peers:
                    for src in sources:
                        peers.start_soon(peer, src, peers.cancel_scope)

                    async def until_complete() -> None:
                        await complete.wait()
                        peers.cancel_scope.cancel()

                    peers.start_soon(until_complete)
                    n.start_soon(whole_file_hash)
                    if not sources:
                        peers.cancel_scope.cancel()
            if stall.cancelled_caught and not complete.is_set():
                for src in sources:
                    if src.peer_id not in report.caught:
                        report.dropped.setdefault(src.peer_id, f"sent no piece in {STALL_S:g} s")
            if not complete.is_set():
                n.cancel_scope.cancel()
    finally:
        os.close(fd)
    if len(have) < manifest.count:
        raise FetchError(f"{manifest.count - len(have)} of {manifest.count} pieces are still missing: every peer "
                         f"that seeds it was dropped ({_summary(report)}); run the pull again to resume")
    return report


class _Channel:
    """One connection to a seeder, asking for one piece at a time."""

    async def get(self, index: int, length: int) -> bytes:
        raise NotImplementedError

    async def close(self, reset: bool) -> None:
        raise NotImplementedError


class _Stream(_Channel):
    """Pieces as frames on the libp2p stream."""

    def __init__(self, stream: Any, file_id: str) -> None:
        self.stream = stream
        self.reader = wire.FrameReader(stream)
        self.file_id = file_id

    async def ticket(self) -> pieces.Ticket:
        await self.stream.write(wire.frame(pieces.encoder.encode(pieces.TicketAsk(self.file_id))))
        reply = _decode(await self.reader.read_frame())
        if not isinstance(reply, pieces.Ticket):
            raise _refused(reply)
        return reply

    async def get(self, index: int, length: int) -> bytes:
        await self.stream.write(wire.frame(pieces.encoder.encode(pieces.PieceAsk(self.file_id, index))))
        head = _decode(await self.reader.read_frame())
        if not isinstance(head, pieces.PieceHead):
            raise _refused(head)
        if head.index != index or head.size != length:
            raise wire.ProtocolError(f"asked for piece {index} ({length} bytes), got {head.index} ({head.size})")
        data = bytearray()
        while len(data) < length:
            part = await self.reader.read_frame()
            if part is None:
                raise wire.ProtocolError("the stream ended inside a piece")
            data += part
        if len(data) != length:
            raise wire.ProtocolError(f"piece {index} came with {len(data)} bytes, not {length}")
        return bytes(data)

    async def close(self, reset: bool) -> None:
        await finish_stream(self.stream, reset=reset)


class _Direct(_Channel):
    """Pieces on a plain TCP connection opened with a ticket (models/pieces.py)."""

    def __init__(self, conn: trio.SocketStream) -> None:
        self.conn = conn

    async def get(self, index: int, length: int) -> bytes:
        await self.conn.send_all(pieces.INDEX.pack(index))
        head = await self._exactly(pieces.LENGTH.size)
        (size,) = pieces.LENGTH.unpack(head)
        if size != length:
            raise wire.ProtocolError(f"asked for piece {index} ({length} bytes), got {size} bytes")
        return await self._exactly(size)

    async def _exactly(self, n: int) -> bytes:
        """``n`` bytes, kept as they arrive: a seeder that names a length and stalls costs
        what it sent, not ``n`` (and ``n`` was checked against the manifest before this)."""
        buf = bytearray()
        while len(buf) < n:
            chunk = await self.conn.receive_some(min(n - len(buf), 1 << 20))
            if not chunk:
                raise wire.ProtocolError("the seeder closed the connection inside a piece")
            buf += chunk
        return bytes(buf)

    async def close(self, reset: bool) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await self.conn.aclose()


async def _open_channel(host: Any, src: Source, file_id: str) -> _Channel:
    """The direct path when the seeder offers one at an address we can dial, else the stream."""
    await connect(host, src.addrs)
    stream = await host.new_stream(_id(src.peer_id), [protocol.PIECES])
    channel = _Stream(stream, file_id)
    ip = direct_ip(src.addrs)
    if ip is None:
        return channel
    try:
        ticket = await channel.ticket()
    except PieceFailed as exc:
        await channel.close(reset=True)
        if exc.code != "bad_request":
            raise
        # A seeder that knows no tickets refused the request: pieces on a fresh stream.
        return _Stream(await host.new_stream(_id(src.peer_id), [protocol.PIECES]), file_id)
    if not ticket.port:
        return channel
    await channel.close(reset=False)  # its slot at the seeder goes to the direct connection
    try:
        conn = await trio.open_tcp_stream(ip, ticket.port)
    except OSError as exc:
        log.debug("no direct path to %s (%s); pieces come over libp2p", src.peer_id, exc)
        return _Stream(await host.new_stream(_id(src.peer_id), [protocol.PIECES]), file_id)
    await conn.send_all(ticket.token)
    return _Direct(conn)


def _check_room(part: Path, size: int) -> None:
    """Refuse a file the disk cannot hold, in words, before ``ftruncate`` says ``Errno 27``."""
    import shutil

    part.parent.mkdir(parents=True, exist_ok=True)
    held = part.stat().st_size if part.is_file() else 0
    free = shutil.disk_usage(part.parent).free
    if size - held > free:
        raise FetchError(f"the file is {size / 1e9:.1f} GB and {part.parent} has {free / 1e9:.1f} GB free; "
                         "free some space (or set GPUTORRENT_CACHE_DIR elsewhere) and pull again")


def _decode(payload: bytes | None) -> Any:
    if payload is None:
        raise wire.ProtocolError("the seeder closed the stream")
    try:
        return pieces.reply_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise wire.ProtocolError(f"malformed reply from a seeder: {exc}") from exc


def _refused(reply: Any) -> PieceFailed:
    if isinstance(reply, pieces.PieceRefused):
        return PieceFailed(f"{reply.code}: {reply.message}", reply.code)
    return PieceFailed(f"unexpected {type(reply).__name__}")


def _summary(report: FetchReport) -> str:
    why = {**report.dropped, **report.caught}
    return "; ".join(f"{p[-8:]}: {r}" for p, r in why.items()) or "none answered"


def _id(peer_id: str) -> Any:
    from libp2p.peer.id import ID

    return ID.from_base58(peer_id)
