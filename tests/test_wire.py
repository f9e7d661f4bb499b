import msgspec
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from gputorrent import wire
from gputorrent.identity import Identity

PROTO = "/gputorrent/infer/1"
RID = b"r" * 16


def _pair(digest=b"d" * 32):
    ident = Identity.generate()
    return ident, wire.ReplySigner(ident, PROTO, RID, digest), wire.ReplyVerifier(ident.peer_id, PROTO, RID, digest)


def _payload(framed: bytes) -> bytes:
    return framed[4:]


def test_signed_stream_verifies_and_receipt_matches():
    _, signer, verifier = _pair()
    frames = [signer.seal(wire.Accepted("m", 3, 2048)), signer.seal(signer.token([1, 2], "Pa")),
              signer.seal(signer.token([3], "ris")),
              signer.seal(wire.Done("stop", wire.Usage(3, 3), 1.0, 2.0, signer.transcript))]
    got = [verifier.open(_payload(f)) for f in frames]
    assert [type(m).__name__ for m in got] == ["Accepted", "Token", "Token", "Done"]
    assert got[-1].transcript == verifier.transcript


def test_flipped_signature_bit_is_refused():
    _, signer, verifier = _pair()
    f = bytearray(signer.seal(signer.token([1], "x")))
    f[-1] ^= 1
    with pytest.raises(wire.IntegrityError, match="bad signature"):
        verifier.open(_payload(bytes(f)))


def test_frame_signed_by_another_key_is_refused():
    _, _, verifier = _pair()
    impostor = wire.ReplySigner(Identity.generate(), PROTO, RID, b"d" * 32)
    with pytest.raises(wire.IntegrityError, match="bad signature"):
        verifier.open(_payload(impostor.seal(impostor.token([1], "x"))))


def test_frame_replayed_into_another_request_is_refused():
    ident = Identity.generate()
    signer = wire.ReplySigner(ident, PROTO, b"a" * 16, b"d" * 32)
    verifier = wire.ReplyVerifier(ident.peer_id, PROTO, b"b" * 16, b"d" * 32)
    with pytest.raises(wire.IntegrityError):
        verifier.open(_payload(signer.seal(signer.token([1], "x"))))


def test_gap_and_repeat_are_refused():
    _, signer, verifier = _pair()
    first = signer.seal(signer.token([1], "a"))
    second = signer.seal(signer.token([2], "b"))
    third = signer.seal(signer.token([3], "c"))
    verifier.open(_payload(first))
    with pytest.raises(wire.IntegrityError, match="repeat"):
        verifier.open(_payload(first))
    with pytest.raises(wire.IntegrityError, match="gap"):
        verifier.open(_payload(third))
    assert isinstance(verifier.open(_payload(second)), wire.Token)


def test_receipt_over_other_tokens_is_refused():
    _, signer, verifier = _pair()
    verifier.open(_payload(signer.seal(signer.token([1], "a"))))
    forged = signer.seal(wire.Done("stop", wire.Usage(1, 1), 0, 0, b"\0" * 32))
    with pytest.raises(wire.IntegrityError, match="receipt"):
        verifier.open(_payload(forged))


def test_oversized_frame_is_refused_both_ways():
    with pytest.raises(wire.FrameTooLarge):
        wire.frame(b"x" * (wire.MAX_FRAME + 1))

    class Stream:
        def __init__(self, data):
            self.data = data

        async def read(self, n=None):
            out, self.data = self.data[:7], self.data[7:]  # awkward chunking on purpose
            return out

    async def main():
        ok = wire.FrameReader(Stream(wire.frame(b"hello") + wire.frame(b"world")))
        assert [await ok.read_frame(), await ok.read_frame(), await ok.read_frame()] == [b"hello", b"world", None]
        big = wire.FrameReader(Stream((wire.MAX_FRAME + 1).to_bytes(4, "big") + b"x"))
        with pytest.raises(wire.FrameTooLarge):
            await big.read_frame()
        cut = wire.FrameReader(Stream(wire.frame(b"hello")[:-1]))
        with pytest.raises(wire.ProtocolError):
            await cut.read_frame()

        class RaisesAtEnd(Stream):  # py-libp2p raises StreamEOF (an EOFError) instead of b""
            async def read(self, n=None):
                if not self.data:
                    raise EOFError
                return await super().read(n)

        ends = wire.FrameReader(RaisesAtEnd(wire.frame(b"x")))
        assert (await ends.read_frame(), await ends.read_frame()) == (b"x", None)

    trio.run(main)


@pytest.mark.parametrize("params, field", [
    ({"max_tokens": -1}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"temperature": -0.1}, "temperature"),
    ({"temperature": 9.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"stop": [""]}, "stop"),
])
def test_absurd_parameters_fail_the_same_check_on_both_sides(params, field):
    with pytest.raises(msgspec.ValidationError, match=field):
        msgspec.convert(params, wire.Params)
    req = wire.InferRequest(request_id=RID, prompt="hi", params=msgspec.structs.replace(wire.Params(), **params))
    with pytest.raises(wire.ProtocolError, match=field):
        wire.validate_request(req)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_any_bytes_decode_to_a_request_or_a_protocol_error(data):
    try:
        msg = wire.decode_inbound(data)
    except wire.ProtocolError:
        return
    assert isinstance(msg, (wire.InferRequest, wire.Cancel))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=256))
def test_any_bytes_from_a_server_are_an_integrity_error_or_a_verified_reply(data):
    _, _, verifier = _pair()
    with pytest.raises(wire.IntegrityError):
        verifier.open(data)


def test_invalid_utf8_in_a_string_field_is_a_protocol_error():
    # Found by hypothesis: msgspec raises UnicodeDecodeError, not DecodeError, for this.
    with pytest.raises(wire.ProtocolError):
        wire.decode_inbound(b"\x92\xa3req\xa1\x80")
    with pytest.raises(wire.ProtocolError):
        wire.decode_inbound(b"\xa1\x80")
