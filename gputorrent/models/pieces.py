"""A model file in fixed pieces, each with its sha256, and the Merkle root over them.

The model id is the sha256 of the whole file: it can only be checked once every byte is in.
To check each piece as it arrives from a peer that may lie, a fetch needs the pieces' hashes
first, from a list it can trust. Each seeding peer computes that list from its own verified
file and announces its Merkle root (as BitTorrent v2 does per file); a requester takes the
root most peers announce, fetches the list from any of them and checks it against that root,
so one peer cannot pass off a wrong list. The whole-file sha256 is still checked at the end.

Also the messages of ``/gputorrent/pieces/1``: the requester asks for the manifest (index -1)
or a piece; the seeder answers with the manifest, or a ``PieceHead`` and the piece's bytes in
frames of at most ``PART`` bytes. Frames are not signed: the hashes are the check.

And the direct path: py-libp2p moves bulk bytes at ~50 MB/s on loopback (Noise and yamux in
Python, 64 KB frames), a plain HTTP download at ~230 MB/s. So a seeder with an address of its
own also hands out ``Ticket``s over the libp2p stream: a port on the same address and a one-time
token. On that plain TCP connection the requester sends the token, then 4-byte piece indices;
each answer is the piece's 8-byte length and its bytes. Only a swarm member gets a ticket (the
libp2p stream is where the swarm key and allowlist apply), and the hashes still check every
byte. A private swarm, or a peer reachable only through a relay, has no direct path.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

MIN_PIECE = 1 << 20  # 1 MiB; a larger file gets larger pieces, so a manifest stays small
MAX_PIECES = 8192  # pieces per file: its manifest is at most 256 KiB, one frame
MAX_PIECE = 1 << 27  # 128 MiB: a fetch holds at most streams x this in memory
MAX_FILE = MAX_PIECE * MAX_PIECES  # 1 TiB
PART = 512 * 1024  # bytes of a piece per frame (frames are capped at 1 MiB)
HASH = 32

Progress = Callable[[int, int], None]


def piece_size_for(size: int) -> int:
    """The smallest power-of-two piece of at least ``MIN_PIECE`` that cuts ``size`` bytes into
    at most ``MAX_PIECES`` pieces (the demo model: 94 pieces of 1 MiB; 70 GB: 16 MiB pieces)."""
    piece = MIN_PIECE
    while -(-size // piece) > MAX_PIECES:
        piece *= 2
    return piece


def merkle_root(hashes: bytes) -> bytes:
    """The root of a binary sha256 tree over the piece hashes, padded with zero hashes to a
    power of two (BitTorrent v2's layout)."""
    layer = [hashes[i:i + HASH] for i in range(0, len(hashes), HASH)] or [bytes(HASH)]
    width = 1
    while width < len(layer):
        width *= 2
    layer += [bytes(HASH)] * (width - len(layer))
    while len(layer) > 1:
        layer = [hashlib.sha256(layer[i] + layer[i + 1]).digest() for i in range(0, len(layer), 2)]
    return layer[0]


@dataclass(frozen=True, slots=True)
class Manifest:
    """A file's size, its piece size and every piece's sha256 (concatenated)."""

    size: int
    piece_size: int
    hashes: bytes

    @property
    def count(self) -> int:
        return -(-self.size // self.piece_size)

    @property
    def root(self) -> str:
        return merkle_root(self.hashes).hex()

    def span(self, index: int) -> tuple[int, int]:
        """(offset, length) of piece ``index``."""
        start = index * self.piece_size
        return start, min(self.piece_size, self.size - start)

    def check(self, index: int, data: bytes) -> bool:
        return (0 <= index < self.count and len(data) == self.span(index)[1]
                and hashlib.sha256(data).digest() == self.hashes[index * HASH:(index + 1) * HASH])

    def well_formed(self) -> bool:
        """Sizes that agree with each other: what a manifest from a peer must be before use.
        The piece size is the one ``piece_size_for`` gives the size (every honest seeder
        computes the same), so a peer cannot name giant pieces to make a fetcher hold them."""
        return (0 < self.size <= MAX_FILE and self.piece_size == piece_size_for(self.size)
                and len(self.hashes) == self.count * HASH)


def hash_pieces(path: Path, progress: Progress | None = None) -> Manifest:
    size = Path(path).stat().st_size
    piece = piece_size_for(size)
    out = bytearray()
    done = 0
    with open(path, "rb") as f:
        while data := f.read(piece):
            out += hashlib.sha256(data).digest()
            done += len(data)
            if progress:
                progress(done, size)
    return Manifest(size, piece, bytes(out))


def manifest_of(path: Path, file_id: str, cache_dir: Path | None = None) -> Manifest:
    """The manifest of a file already verified to have sha256 ``file_id``; computed once and
    kept in ``cache_dir/pieces/`` (a 70 GB model takes minutes to hash)."""
    size = Path(path).stat().st_size
    piece = piece_size_for(size)
    kept = cache_dir / "pieces" / f"{file_id}-{piece}.sha256" if cache_dir else None
    if kept is not None and kept.is_file():
        hashes = kept.read_bytes()
        manifest = Manifest(size, piece, hashes)
        if manifest.well_formed():
            return manifest
    manifest = hash_pieces(path)
    if kept is not None:
        kept.parent.mkdir(parents=True, exist_ok=True)
        tmp = kept.with_name(f".{kept.name}.{os.getpid()}.tmp")
        tmp.write_bytes(manifest.hashes)
        os.replace(tmp, kept)
    return manifest


# --- /gputorrent/pieces/1 ---------------------------------------------------------------------

FileId = Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]


class PieceAsk(msgspec.Struct, tag="pask", array_like=True):
    file_id: FileId
    index: Annotated[int, Meta(ge=-1, lt=MAX_PIECES)]  # -1: the manifest


class TicketAsk(msgspec.Struct, tag="ptick", array_like=True):
    file_id: FileId


class Ticket(msgspec.Struct, tag="pticket", array_like=True):
    port: Annotated[int, Meta(ge=0, le=65535)]  # 0: no direct path; use this stream
    token: Annotated[bytes, Meta(max_length=32)]


class ManifestReply(msgspec.Struct, tag="pman", array_like=True):
    size: Annotated[int, Meta(ge=1, le=MAX_FILE)]
    piece_size: Annotated[int, Meta(ge=MIN_PIECE, le=MAX_PIECE)]
    hashes: Annotated[bytes, Meta(max_length=MAX_PIECES * HASH)]


class PieceHead(msgspec.Struct, tag="phead", array_like=True):
    """A piece follows, in frames of raw bytes of at most ``PART`` each."""

    index: int
    size: Annotated[int, Meta(ge=0)]


class PieceRefused(msgspec.Struct, tag="pno", array_like=True):
    code: str  # "unknown_file", "bad_request", "busy"
    message: str


SeederReply = ManifestReply | PieceHead | PieceRefused | Ticket
ask_decoder = msgspec.msgpack.Decoder(PieceAsk | TicketAsk)
reply_decoder = msgspec.msgpack.Decoder(SeederReply)
encoder = msgspec.msgpack.Encoder()

TOKEN = 16  # bytes of a direct-path ticket
INDEX = struct.Struct(">I")  # a piece asked for on the direct path
LENGTH = struct.Struct(">Q")  # the length before a piece's bytes on the direct path
