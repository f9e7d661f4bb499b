"""A node's Ed25519 identity: one seed is both the libp2p peer id and the signing key.

The peer id embeds the public key (libp2p "identity" multihash), so a peer id alone is enough
to verify anything that peer signed. Nothing here imports libp2p: ``gputorrent id`` and
signature checks stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import base58
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from .errors import GputorrentError
from .files import create_private, read_small, readable_by_others

SEED_BYTES = 32
# libp2p PublicKey protobuf for Ed25519: field 1 (KeyType) = 1, field 2 (Data) = 32 bytes.
_PROTO_PREFIX = b"\x08\x01\x12\x20"
# identity multihash: code 0x00, length 36 (the protobuf above).
_MULTIHASH_PREFIX = b"\x00\x24"


class IdentityError(GputorrentError):
    """An identity file or peer id that cannot be used."""


def peer_id_from_public_key(public_key: bytes) -> str:
    """The libp2p peer id (base58, ``12D3KooW…``) of an Ed25519 public key."""
    return base58.b58encode(_MULTIHASH_PREFIX + _PROTO_PREFIX + public_key).decode()


def public_key_from_peer_id(peer_id: str) -> bytes:
    """Recover the Ed25519 public key embedded in a peer id; raises on other key types."""
    try:
        raw = base58.b58decode(peer_id)
    except ValueError as exc:
        raise IdentityError(f"{peer_id!r} is not a peer id (not base58)") from exc
    head = _MULTIHASH_PREFIX + _PROTO_PREFIX
    if len(raw) != len(head) + 32 or not raw.startswith(head):
        raise IdentityError(f"{peer_id!r} is not an Ed25519 libp2p peer id")
    return raw[len(head) :]


def short_id(peer_id: str) -> str:
    """Enough of a peer id to tell peers apart on screen. The tail, since the base58 head
    ("12D3KooW...") is the same for every Ed25519 key."""
    return f"…{peer_id[-10:]}"



class Verifier:
    """Verifies many signatures from one peer without re-decoding its key each time."""

    __slots__ = ("peer_id", "_key")

    def __init__(self, peer_id: str) -> None:
        self.peer_id = peer_id
        self._key = VerifyKey(public_key_from_peer_id(peer_id))

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            self._key.verify(message, signature)
        except (BadSignatureError, ValueError):
            return False
        return True


@dataclass(frozen=True, slots=True)
class Identity:
    """A loaded Ed25519 seed with its derived peer id."""

    seed: bytes

    @property
    def signing_key(self) -> SigningKey:
        return SigningKey(self.seed)

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.signing_key.sign(message).signature

    def libp2p_key_pair(self):  # -> libp2p.crypto.keys.KeyPair (imported lazily: it is slow)
        from libp2p.crypto.ed25519 import create_new_key_pair

        return create_new_key_pair(self.seed)

    @classmethod
    def generate(cls) -> Identity:
        return cls(bytes(SigningKey.generate()))

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        """Load the seed at ``path``, creating it (mode 0600) on first use."""
        path = Path(path)
        if path.exists():
            return cls.load(path)
        ident = cls.generate()
        return ident if create_private(path, ident.seed) else cls.load(path)

    @classmethod
    def load(cls, path: Path) -> Identity:
        try:
            seed = read_small(path, 4096)
        except OSError as exc:
            raise IdentityError(f"cannot read identity {path}: {exc.strerror}") from exc
        except ValueError as exc:
            raise IdentityError(f"{exc}; point --identity at a gputorrent key file (created 0600 when absent)") from exc
        if len(seed) != SEED_BYTES:
            raise IdentityError(
                f"{path} is not a gputorrent identity ({len(seed)} bytes, expected {SEED_BYTES}); "
                "point --identity at another file or move this one away to create a new key"
            )
        if readable_by_others(path):
            mode = Path(path).stat().st_mode & 0o777
            raise IdentityError(f"{path} is readable by other users (mode {mode:o}); run: chmod 600 {path}")
        return cls(seed)


class KeyHold:
    """An exclusive hold on a key file while one process uses it, so that no two live processes
    of a machine present one peer id: two hosts with one id knock each other out of the swarm
    (one ``ask`` beside a running gateway made the gateway answer 404, then 503, for a minute).
    An advisory ``flock`` on a small file beside the key, released when the process ends,
    however it ends."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def take(cls, key: Path) -> KeyHold | None:
        """The hold on ``key``, or None when another live process has it."""
        import os

        try:
            import fcntl
        except ImportError:  # no advisory locks (Windows): every process holds its key
            return cls(-1, Path(key))
        lock = Path(key).with_name(f".{Path(key).name}.held")
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return cls(fd, Path(key))

    def release(self) -> None:
        import os

        if self._fd is not None and self._fd >= 0:
            os.close(self._fd)
        self._fd = None


def key_in_use(path: Path) -> str:
    """What to tell a user whose key another live process of this machine holds."""
    return (f"another gputorrent process of this machine is using the key {path}; two processes must never "
            "present one peer id: stop that one, or give this one a key of its own with --identity PATH")
