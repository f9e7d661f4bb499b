"""Signed adverts: what the DHT validator accepts and refuses (pure, no network)."""

import time

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gputorrent.dht import records
from gputorrent.dht.records import Advert, Device, RecordError
from gputorrent.identity import Identity


def advert(ident: Identity, seq: int = 1, ttl: float = 120.0, issued: float | None = None, **kw) -> Advert:
    now = time.time() if issued is None else issued
    return Advert(peer_id=ident.peer_id, seq=seq, issued_at=now, expires_at=now + ttl, addrs=["/ip4/127.0.0.1/tcp/1"],
                  device=Device(kind="cpu", name="test"), **kw)


def test_signed_advert_roundtrips_under_its_key():
    ident = Identity.generate()
    value = records.sign_advert(ident, advert(ident, seq=7))
    assert records.open_advert(records.advert_key(ident.peer_id), value).seq == 7


def test_forged_advert_signed_by_another_key_is_refused():
    owner, forger = Identity.generate(), Identity.generate()
    body = msgspec.msgpack.encode(advert(owner))
    forged = msgspec.msgpack.encode([body, forger.sign(b"gputorrent/advert/1\0" + body)])
    with pytest.raises(RecordError, match="signature"):
        records.open_advert(records.advert_key(owner.peer_id), forged)
    with pytest.raises(RecordError):
        records.sign_advert(forger, advert(owner))


def test_advert_under_another_peers_key_is_refused():
    a, b = Identity.generate(), Identity.generate()
    with pytest.raises(RecordError, match="another peer's key"):
        records.open_advert(records.advert_key(b.peer_id), records.sign_advert(a, advert(a)))


def test_expired_and_future_adverts_are_refused():
    ident = Identity.generate()
    key = records.advert_key(ident.peer_id)
    with pytest.raises(RecordError, match="expired"):
        records.open_advert(key, records.sign_advert(ident, advert(ident, issued=time.time() - 300, ttl=120)))
    with pytest.raises(RecordError, match="future"):
        records.open_advert(key, records.sign_advert(ident, advert(ident, issued=time.time() + 600)))
    with pytest.raises(RecordError, match="future"):
        records.open_advert(key, records.sign_advert(ident, advert(ident, ttl=10 * 86400)))


def test_oversized_and_malformed_adverts_are_refused():
    ident = Identity.generate()
    key = records.advert_key(ident.peer_id)
    with pytest.raises(RecordError, match="exceeds"):
        records.open_advert(key, records.sign_advert(ident, advert(ident, name="x" * 10_000)))
    with pytest.raises(RecordError, match="malformed"):
        records.open_advert(key, b"\x92\xc4\x01x\xc4\x01y")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_are_refused_cleanly(data):
    with pytest.raises(RecordError):
        records.open_advert(None, data)


def test_select_prefers_the_highest_valid_sequence():
    ident = Identity.generate()
    key = records.advert_key(ident.peer_id)
    old, new = (records.sign_advert(ident, advert(ident, seq=s)) for s in (5, 9))
    assert records.best_index(key, [old, new]) == 1
    assert records.best_index(key, [new, old]) == 0
    assert records.best_index(key, [b"junk", old]) == 1


def test_keys_fit_py_libp2p_limits_and_differ_by_kind():
    ident = Identity.generate()
    assert len(records.advert_key(ident.peer_id).encode()) <= 50  # FIND_NODE rejects longer plain keys
    keys = {records.provider_key(k, "smollm2") for k in ("model", "alias", "swarm")}
    assert len(keys) == 3 and all(k.startswith("1220") and len(k) == 68 for k in keys)


def test_shard_peers_provide_under_keys_a_whole_model_lookup_never_reads():
    mid = "ab" * 32
    whole = records.ServedModel(model_id=mid, alias="smollm2", quantization="Q8_0", context_length=2048,
                                first_block=0, end_block=30, total_blocks=30)
    shard = msgspec.structs.replace(whole, first_block=10, end_block=20)
    assert set(records.model_keys(whole)) == {records.lookup_key("smollm2"), records.lookup_key(mid)}
    assert set(records.model_keys(shard)) == {records.lookup_key("smollm2", shards=True),
                                              records.lookup_key(mid.upper(), shards=True)}
    assert not set(records.model_keys(whole)) & set(records.model_keys(shard))
