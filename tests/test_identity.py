import os
import stat

import pytest

from gputorrent.identity import (Identity, IdentityError, b58decode, b58encode, public_key_from_peer_id,
                                 verify)


def test_key_file_created_0600_and_stable(tmp_path):
    path = tmp_path / "sub" / "id.key"
    first = Identity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = Identity.load_or_create(path)
    assert again.peer_id == first.peer_id
    assert first.peer_id.startswith("12D3KooW")


def test_peer_id_is_libp2p_peer_id_of_the_same_key():
    from libp2p.peer.id import ID

    ident = Identity.generate()
    assert ID.from_pubkey(ident.libp2p_key_pair().public_key).to_base58() == ident.peer_id
    assert public_key_from_peer_id(ident.peer_id) == ident.public_key


def test_peer_id_alone_verifies_a_signature():
    ident, other = Identity.generate(), Identity.generate()
    sig = ident.sign(b"hello")
    assert verify(ident.peer_id, b"hello", sig)
    assert not verify(ident.peer_id, b"hellO", sig)
    assert not verify(other.peer_id, b"hello", sig)
    assert not verify("not-a-peer-id", b"hello", sig)


def test_world_readable_key_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "id.key"
    Identity.load_or_create(path)
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        Identity.load(path)


def test_damaged_key_file_is_refused(tmp_path):
    path = tmp_path / "id.key"
    path.write_bytes(b"short")
    os.chmod(path, 0o600)
    with pytest.raises(IdentityError, match="not a gputorrent identity"):
        Identity.load(path)


def test_base58_roundtrip_with_leading_zeros():
    for data in (b"", b"\0", b"\0\0abc", bytes(range(40))):
        assert b58decode(b58encode(data)) == data
