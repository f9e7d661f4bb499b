"""Signed adverts and DHT keys: pure data and checks, no networking.

An advert says who a serving peer is, where it listens, what it runs, what it serves and how
loaded it is. It is signed by the peer's own key and stored under a key derived from its peer
id, so the validator can tell that the signer owns the key. The sequence number is the issue
time in milliseconds: it only grows, even across restarts, with no counter to persist.
"""

from __future__ import annotations

import hashlib
import time
from typing import Literal

import msgspec

from ..errors import GputorrentError
from ..identity import Identity, Verifier

NAMESPACE = "gt"
MAX_RECORD = 8 * 1024
MAX_TTL_S = 3600.0
MAX_CLOCK_SKEW_S = 60.0
ANNOUNCE_INTERVAL_S = 30.0
ADVERT_TTL_S = 120.0
PROVIDE_INTERVAL_S = 600.0  # provider records are renewed this often (adverts every announce interval)
_DOMAIN = b"gputorrent/advert/1\0"


class RecordError(GputorrentError, ValueError):
    """A record the DHT must not store or believe."""


class Device(msgspec.Struct, kw_only=True, frozen=True):
    kind: Literal["cpu", "gpu"]
    name: str
    cores: int = 0
    ram_mb: int = 0
    vram_total_mb: int = 0
    vram_free_mb: int = 0
    compute: str = ""
    gpu_layers: int = 0  # layers the engine really runs on the GPU (kind "gpu" only then)


class ServedModel(msgspec.Struct, kw_only=True, frozen=True):
    model_id: str
    alias: str
    quantization: str
    context_length: int
    first_block: int = 0
    end_block: int = 0  # exclusive; end_block == total_blocks for a whole model
    total_blocks: int = 0
    # The Merkle root of this peer's piece list for the model file (models/pieces.py); "" when it
    # does not seed the file (serve --no-seed, or a shard).
    seed_root: str = ""

    @property
    def whole(self) -> bool:
        """The whole model, not a shard of it."""
        return self.first_block == 0 and self.end_block >= self.total_blocks

    @property
    def blocks(self) -> str:
        return "all" if self.whole else f"{self.first_block}:{self.end_block}"


class Load(msgspec.Struct, kw_only=True, frozen=True):
    active: int = 0
    queued: int = 0
    slots: int = 0


class Advert(msgspec.Struct, kw_only=True, frozen=True):
    peer_id: str
    seq: int
    issued_at: float
    expires_at: float
    addrs: list[str]
    name: str = ""
    device: Device
    models: list[ServedModel] = []
    load: Load = Load()
    tokens_per_s: float = 0.0
    version: str = ""
    leaving: bool = False
    # "public", "private" (behind NAT: ``addrs`` are circuits through relays, none if it holds no
    # reservation), "unknown". What the peer says; requesters still only dial what they can.
    reachability: str = "unknown"

    def serves(self, spec: str) -> ServedModel | None:
        """The served model named by alias or model id (a prefix of 8+ hex digits counts)."""
        spec = spec.strip().lower()
        for m in self.models:
            if spec in (m.alias, m.model_id) or (len(spec) >= 8 and m.model_id.startswith(spec)):
                return m
        return None

    def live(self, now: float | None = None) -> bool:
        return not self.leaving and self.expires_at > (time.time() if now is None else now)


class _Signed(msgspec.Struct, array_like=True):
    body: bytes
    sig: bytes


_enc = msgspec.msgpack.Encoder()
_signed_dec = msgspec.msgpack.Decoder(_Signed)
_advert_dec = msgspec.msgpack.Decoder(Advert)


def advert_key(peer_id: str) -> str:
    """The DHT key of a peer's advert. Hashed: py-libp2p rejects plain keys over 50 bytes."""
    return f"/{NAMESPACE}/{hashlib.blake2b(peer_id.encode(), digest_size=20).hexdigest()}"


def provider_key(kind: str, name: str) -> str:
    """Hex multihash (sha2-256) for provide/find_providers: ``kind`` is model, alias, swarm, or
    shard-model and shard-alias (the keys of peers holding blocks of a model, not all of it)."""
    return "1220" + hashlib.sha256(f"gputorrent/{kind}/{name}".encode()).hexdigest()


def lookup_key(spec: str, *, shards: bool = False) -> str:
    """The provider key a lookup of ``spec`` (an alias, or a model id in hex) reads: whole-model
    peers, or with ``shards`` the peers holding blocks of it."""
    spec = spec.strip().lower()
    kind = "model" if is_model_id(spec) else "alias"
    return provider_key(f"shard-{kind}" if shards else kind, spec)


def is_model_id(spec: str) -> bool:
    """A model id or a prefix of one (8+ hex digits); anything else is a name."""
    spec = spec.strip().lower()
    return len(spec) >= 8 and all(c in "0123456789abcdef" for c in spec)


def model_keys(model: ServedModel) -> list[str]:
    """The keys a peer provides for ``model``. Shard peers go under keys of their own: at scale
    a popular model's key would otherwise fill with peers a whole-model requester cannot use
    (each node keeps a bounded number of providers per key, and an answer samples 20 of them),
    and each would cost that requester an advert fetch. A chain's lookup reads the shard keys."""
    if model.whole:
        return [lookup_key(model.model_id), lookup_key(model.alias)]
    return [lookup_key(model.model_id, shards=True), lookup_key(model.alias, shards=True)]


def sign_advert(identity: Identity, advert: Advert) -> bytes:
    if advert.peer_id != identity.peer_id:
        raise RecordError("an advert can only be signed by the peer it describes")
    body = _enc.encode(advert)
    return _enc.encode(_Signed(body, identity.sign(_DOMAIN + body)))


def open_advert(key: str | None, value: bytes, now: float | None = None) -> Advert:
    """Verify and decode a stored advert; raises ``RecordError`` saying what is wrong."""
    if len(value) > MAX_RECORD:
        raise RecordError(f"advert of {len(value)} bytes exceeds {MAX_RECORD}")
    try:
        signed = _signed_dec.decode(value)
        advert = _advert_dec.decode(signed.body)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise RecordError(f"malformed advert: {exc}") from exc
    if key is not None and key != advert_key(advert.peer_id):
        raise RecordError("advert stored under another peer's key")
    try:
        ok = Verifier(advert.peer_id).verify(_DOMAIN + signed.body, signed.sig)
    except Exception:  # noqa: BLE001 (a malformed key or signature is a bad record, whatever raised)
        ok = False
    if not ok:
        raise RecordError(f"advert signature does not verify for {advert.peer_id}")
    now = time.time() if now is None else now
    if advert.expires_at <= now:
        raise RecordError("advert has expired")
    if advert.issued_at > now + MAX_CLOCK_SKEW_S or advert.expires_at - advert.issued_at > MAX_TTL_S:
        raise RecordError("advert is dated too far in the future")
    return advert


def best_index(key: str, values: list[bytes]) -> int:
    """Index of the valid advert with the highest sequence number (0 when none is valid)."""
    best, best_seq = 0, -1
    for i, value in enumerate(values):
        try:
            seq = open_advert(key, value).seq
        except RecordError:
            continue
        if seq > best_seq:
            best, best_seq = i, seq
    return best
