import os
import stat

import pytest

from gputorrent.identity import Identity, IdentityError, Verifier, public_key_from_peer_id


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
    assert Verifier(ident.peer_id).verify(b"hello", sig)
    assert not Verifier(ident.peer_id).verify(b"hellO", sig)
    assert not Verifier(other.peer_id).verify(b"hello", sig)
    with pytest.raises(IdentityError, match="not a peer id"):
        Verifier("not-a-peer-id!")


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


def test_a_device_or_huge_file_is_refused_without_reading_it():
    with pytest.raises(IdentityError, match="not a regular file"):
        Identity.load("/dev/zero")
