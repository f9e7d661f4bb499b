"""The fetching side of ``/gputorrent/pieces/1``: a file from several seeding peers at once,
each piece checked against a trusted manifest before it is written.

Every source peer gets ``STREAMS_PER_PEER`` streams, each asking for one piece at a time from a
shared list of missing pieces; a faster peer simply comes back for more. Once nothing is left
to hand out, idle streams ask for pieces still in flight elsewhere (BitTorrent's endgame), so
one slow peer cannot hold up the last piece. A piece that fails its hash gets its sender
dropped (``caught``) and is fetched from another; a peer that times out or refuses twice is
dropped too. Written pieces stay on disk in ``DEST.part``: a fetch cut off resumes from them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import trio

from .. import wire
from ..errors import GputorrentError
from ..models import pieces
from ..net.host import connect, finish_stream
from . import protocol

log = logging.getLogger("gputorrent.fetch")

STREAMS_PER_PEER = 2
DIAL_S = 10.0
MANIFEST_S = 10.0
PIECE_MIN_S = 15.0  # one piece, at least; more for large pieces (at 0.5 MB/s)
STRIKES = 2  # timeouts or refusals before a peer is dropped


class FetchError(GputorrentError):
    """A fetch that could not complete; what was written is kept for the next try."""


class PieceFailed(Exception):
    """A piece request that came back without the piece (the reason is the message)."""


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
        raise PieceFailed(_why(reply))
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
                     progress: Callable[[int, int, int], None] | None = None) -> FetchReport:
    """Fill ``part`` with every piece of ``manifest`` from ``sources``. ``progress`` gets
    (bytes done, bytes total, peers sending). Raises ``FetchError`` when every source is gone
    with pieces missing; the verified pieces stay in ``part``."""
    report = FetchReport()
    have = await trio.to_thread.run_sync(have_pieces, part, manifest)
    report.resumed = len(have)
    todo = [i for i in range(manifest.count) if i not in have]
    in_flight: dict[int, int] = {}
    done_bytes = sum(manifest.span(i)[1] for i in have)
    sending: set[str] = set()
    complete = trio.Event()
    changed = [trio.Event()]  # set (and replaced) whenever a piece goes back to the list

    def give_back(index: int) -> None:
        if index not in have and index not in todo:
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
            spare = [i for i in in_flight if i not in have and i not in mine]  # endgame
            return min(spare, key=in_flight.__getitem__) if spare else None

        async def worker(src: Source, gone: trio.CancelScope, strikes: list[int]) -> None:
            nonlocal done_bytes
            mine: set[int] = set()
            stream = None
            try:
                with trio.fail_after(DIAL_S):
                    await connect(host, src.addrs)
                    stream = await host.new_stream(_id(src.peer_id), [protocol.PIECES])
                reader = wire.FrameReader(stream)
                while not complete.is_set():
                    index = next_piece(mine)
                    if index is None:  # all handed out: wait in case one comes back (its sender dropped)
                        await changed[0].wait()
                        continue
                    mine.add(index)
                    in_flight[index] = in_flight.get(index, 0) + 1
                    try:
                        data = await _ask_piece(stream, reader, file_id, index, manifest)
                        if not manifest.check(index, data):
                            report.caught[src.peer_id] = f"piece {index} failed its sha256"
                            gone.cancel()
                            return
                        if index in have:
                            report.duplicates += 1
                            continue
                        await trio.to_thread.run_sync(os.pwrite, fd, data, manifest.span(index)[0])
                        have.add(index)
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
                            if index not in have:
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
                if stream is not None:
                    await finish_stream(stream, reset=not complete.is_set())

        async def peer(src: Source) -> None:
            strikes = [0]
            with trio.CancelScope() as gone:
                async with trio.open_nursery() as n:
                    for _ in range(STREAMS_PER_PEER):
                        n.start_soon(worker, src, gone, strikes)

        async with trio.open_nursery() as n:
            async def until_complete() -> None:
                await complete.wait()
                n.cancel_scope.cancel()

            n.start_soon(until_complete)
            async with trio.open_nursery() as peers:
                for src in sources:
                    peers.start_soon(peer, src)
            n.cancel_scope.cancel()
        os.fsync(fd)
    finally:
        os.close(fd)
    if len(have) < manifest.count:
        raise FetchError(f"{manifest.count - len(have)} of {manifest.count} pieces are still missing: every peer "
                         f"that seeds it was dropped ({_summary(report)}); run the pull again to resume")
    return report


async def _ask_piece(stream: Any, reader: wire.FrameReader, file_id: str, index: int,
                     manifest: pieces.Manifest) -> bytes:
    length = manifest.span(index)[1]
    with trio.fail_after(max(PIECE_MIN_S, length / 500_000)):
        await stream.write(wire.frame(pieces.encoder.encode(pieces.PieceAsk(file_id, index))))
        head = _decode(await reader.read_frame())
        if not isinstance(head, pieces.PieceHead):
            raise PieceFailed(_why(head))
        if head.index != index or head.size != length:
            raise wire.ProtocolError(f"asked for piece {index} ({length} bytes), got {head.index} ({head.size})")
        data = bytearray()
        while len(data) < length:
            part = await reader.read_frame()
            if part is None:
                raise wire.ProtocolError("the stream ended inside a piece")
            data += part
        if len(data) != length:
            raise wire.ProtocolError(f"piece {index} came with {len(data)} bytes, not {length}")
        return bytes(data)


def _decode(payload: bytes | None) -> Any:
    if payload is None:
        raise wire.ProtocolError("the seeder closed the stream")
    try:
        return pieces.reply_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise wire.ProtocolError(f"malformed reply from a seeder: {exc}") from exc


def _why(reply: Any) -> str:
    if isinstance(reply, pieces.PieceRefused):
        return f"{reply.code}: {reply.message}"
    return f"unexpected {type(reply).__name__}"


def _summary(report: FetchReport) -> str:
    why = {**report.dropped, **report.caught}
    return "; ".join(f"{p[-8:]}: {r}" for p, r in why.items()) or "none answered"


def _id(peer_id: str) -> Any:
    from libp2p.peer.id import ID

    return ID.from_base58(peer_id)
