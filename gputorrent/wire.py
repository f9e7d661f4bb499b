"""Messages, framing and the signed channel.

A frame is a 4-byte big-endian length and a msgpack payload, capped at ``MAX_FRAME`` bytes.
Requesters send plain frames (the libp2p Noise channel already authenticates them). Servers
send every frame as a signed envelope ``[seq, body, sig]`` where ``sig`` is Ed25519 over
``(protocol, request id, seq, body)``. Token frames chain a transcript hash and ``Done`` carries
its final value, so a requester ends up holding a signed receipt of exactly what it received.

Request validation lives in the types (``msgspec.Meta``): the server's strict decode is the
check, and the client runs the same decode before it sends anything.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Annotated, Any, Literal, Protocol

import msgspec
from msgspec import Meta

from .errors import GputorrentError
from .identity import Identity, Verifier
from .limits import MAX_TOKENS

MAX_FRAME = 1 << 20
_LEN = struct.Struct(">I")
_SEQ = struct.Struct(">Q")
_DOMAIN = b"gputorrent/frame/1\0"

# --- requests (requester -> server) ------------------------------------------------------

MaxTokens = Annotated[int, Meta(ge=1, le=MAX_TOKENS)]
Temperature = Annotated[float, Meta(ge=0.0, le=5.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
TopK = Annotated[int, Meta(ge=0, le=1 << 17)]
Seed = Annotated[int, Meta(ge=-1, le=2**32 - 1)]
Stop = Annotated[list[Annotated[str, Meta(min_length=1, max_length=256)]], Meta(max_length=16)]
Grammar = Annotated[str, Meta(max_length=64 * 1024)]  # GBNF; "" is none
RequestId = Annotated[bytes, Meta(min_length=8, max_length=32)]
Role = Literal["system", "user", "assistant"]


class ChatMessage(msgspec.Struct, array_like=True, frozen=True):
    role: Role
    content: str


class Params(msgspec.Struct, frozen=True, kw_only=True):
    """Sampling parameters; defaults are those of ``gputorrent ask``."""

    max_tokens: MaxTokens = 256
    temperature: Temperature = 0.7
    top_p: TopP = 0.95
    top_k: TopK = 40
    seed: Seed = -1
    stop: Stop = []
    # A llama.cpp grammar (GBNF) every token must follow: JSON mode and json_schema travel as
    # one, so the serving peer constrains its own sampling and a spot check compares like with
    # like. An older peer ignores the field: a requester that needs it checks the answer.
    grammar: Grammar = ""


class Link(msgspec.Struct, array_like=True, frozen=True):
    """"Requester key ``member`` is mine", signed by the serving identity ``owner``: what the
    owner's serve gave other peers is credited when its user asks (reciprocity). The member is
    the peer id of the connection the request came on, so a link cannot be lent or replayed."""

    owner: Annotated[str, Meta(max_length=64)]
    member: Annotated[str, Meta(max_length=64)]
    signature: Annotated[bytes, Meta(max_length=64)]


class LinkError(GputorrentError):
    """A link statement that does not hold."""


def _link_message(owner: str, member: str) -> bytes:
    return b"gputorrent-link/1\0" + owner.encode() + b"\0" + member.encode()


def make_link(owner: Identity, member: str) -> Link:
    return Link(owner.peer_id, member, owner.sign(_link_message(owner.peer_id, member)))


def check_link(link: Link, sender: str) -> str:
    """The owner whose credit a request from ``sender`` (the connection's peer id) carries."""
    if link.member != sender:
        raise LinkError(f"the link names requester {link.member}, but the request came from {sender}")
    try:
        ok = Verifier(link.owner).verify(_link_message(link.owner, link.member), link.signature)
    except Exception as exc:
        raise LinkError(f"the link's owner {link.owner[:16]!r} is not a peer id: {exc}") from exc
    if not ok:
        raise LinkError(f"the link is not signed by {link.owner}")
    return link.owner


class InferRequest(msgspec.Struct, tag="req", array_like=True, kw_only=True):
    request_id: RequestId
    model: Annotated[str, Meta(max_length=256)] = ""  # model id, alias or "" for whatever the peer serves
    messages: Annotated[list[ChatMessage], Meta(max_length=4096)] | None = None
    prompt: str | None = None
    params: Params = Params()
    # Token ids already received from a failed peer: the server replays them as its own
    # first samples (one decode step each, as the first peer computed them) and sends only
    # what follows. ``params.max_tokens`` still counts the whole answer, these included.
    resume_ids: list[Annotated[int, Meta(ge=0, lt=1 << 31)]] = []
    deadline_ms: Annotated[int, Meta(ge=1, le=3_600_000)] = 600_000
    link: Link | None = None  # the requester's serving identity, for reciprocity (make_link)


class Cancel(msgspec.Struct, tag="cancel", array_like=True):
    reason: str = ""


class Ping(msgspec.Struct, tag="ping", array_like=True):
    nonce: RequestId


# Shards (``/gputorrent/shard/2``): one stream per session and hop. Hidden states are f32 (f16
# overflows: SmolLM2's residual reaches ~24,800; bf16 moved logits by up to 1.2), and a step's
# states go in parts of at most HIDDEN_PART bytes so every frame stays under the 1 MiB cap.
HIDDEN_PART = 512 * 1024
MAX_STEP = 512  # positions in one step: the largest prompt chunk of both engines
FINE_STEP = 32  # prompt chunks below position MAX_STEP


def chunk_end(pos: int, total: int) -> int:
    """Where the prompt chunk that starts at ``pos`` ends, for a prompt of ``total`` tokens.

    Every engine and every chain cuts prompts on these borders (32 positions up to 512, then
    512), never on what else is running or what is cached. A chunk computed as part of one
    request is then bit for bit the chunk another request computes for the same tokens: a
    cached prefix can be reused (measured here: splitting a prefill anywhere else moved logits
    by up to 0.8), and a failover resume on a fresh peer computes what the first peer did. The
    fine chunks cost ~13 % more prefill time than 512-position ones below 512 (measured), and
    let prefixes of 32 tokens and up be reused."""
    size = FINE_STEP if pos < MAX_STEP else MAX_STEP
    return min(total, (pos // size + 1) * size)


def reusable_prefix(cached: list[int], prompt: list[int]) -> int:
    """How many leading positions of ``prompt`` a cache filled by prefilling ``cached`` can
    give (a chunk border, and at least one token left to compute for the first sample)."""
    limit = min(len(cached), len(prompt) - 1)
    same = 0
    while same < limit and cached[same] == prompt[same]:
        same += 1
    border = 0
    while (nxt := chunk_end(border, len(cached))) <= same and nxt > border and (nxt - border) in (FINE_STEP, MAX_STEP):
        border = nxt
    return border
TokenId = Annotated[int, Meta(ge=0, lt=1 << 31)]


class ShardOpen(msgspec.Struct, tag="sopen", array_like=True, kw_only=True):
    """Opens a session on a shard. The first shard gets the prompt (it has the tokenizer and
    answers with the prompt's ids); the last gets the sampling parameters."""

    request_id: RequestId
    model: Annotated[str, Meta(max_length=256)]
    first_block: Annotated[int, Meta(ge=0, le=1 << 16)]
    end_block: Annotated[int, Meta(ge=1, le=1 << 16)]
    params: Params = Params()
    messages: Annotated[list[ChatMessage], Meta(max_length=4096)] | None = None
    prompt: str | None = None


class ShardStep(msgspec.Struct, tag="step", array_like=True, kw_only=True):
    """Positions ``pos`` .. ``pos + n - 1`` of the session: token ids for the first shard,
    hidden states (``n x n_embd`` f32, little-endian) for the others, sent in parts: every
    part but the last has ``more`` set. ``sample``: the last shard samples the last position.
    ``replay``: a replacement catching up; it answers without output, and the last shard
    accepts ``forced`` (the token the chain used) in place of the one it draws."""

    pos: Annotated[int, Meta(ge=0, lt=1 << 24)]
    n: Annotated[int, Meta(ge=1, le=MAX_STEP)]
    tokens: Annotated[list[TokenId], Meta(max_length=MAX_STEP)] = []
    hidden: Annotated[bytes, Meta(max_length=HIDDEN_PART)] = b""
    more: bool = False
    sample: bool = False
    forced: Annotated[int, Meta(ge=-1, lt=1 << 31)] = -1
    replay: bool = False


Inbound = InferRequest | Cancel | Ping | ShardOpen | ShardStep

# --- replies (server -> requester), each signed ------------------------------------------


class Accepted(msgspec.Struct, tag="ok", array_like=True):
    model_id: str
    prompt_tokens: int
    n_ctx: int


class Busy(msgspec.Struct, tag="busy", array_like=True):
    retry_after_ms: int
    reason: str


class Queued(msgspec.Struct, tag="queued", array_like=True):
    """Sent about every second while nothing else is: the request waits for a slot
    (``position`` 1 is next) or, at 0, its prompt is being computed. It tells the requester the
    peer is alive, so a wait in a queue is never mistaken for a stall."""

    position: int


class Token(msgspec.Struct, tag="tok", array_like=True):
    ids: list[int]
    text: str
    transcript: bytes


class Usage(msgspec.Struct, array_like=True):
    prompt_tokens: int
    completion_tokens: int


class Done(msgspec.Struct, tag="done", array_like=True):
    finish_reason: Literal["stop", "length", "cancelled", "deadline"]
    usage: Usage
    ttft_ms: float
    decode_ms: float
    transcript: bytes


class Error(msgspec.Struct, tag="err", array_like=True):
    code: str
    message: str


class Pong(msgspec.Struct, tag="pong", array_like=True):
    """Live load, fresher than the advert (which is up to one announce interval old)."""

    active: int
    queued: int
    slots: int
    free_memory_mb: int  # free VRAM on a GPU peer, free RAM on a CPU peer
    tokens_per_s: float


class ShardReady(msgspec.Struct, tag="sready", array_like=True):
    model_id: str
    n_ctx: int
    prompt_ids: list[int]  # from the first shard: the prompt, tokenized with the model's template


class StepOut(msgspec.Struct, tag="sout", array_like=True):
    """A step's result, in parts like its input: hidden states from a shard that is not last,
    the sampled token and its text from the last. ``transcript`` chains the digest of every
    step's input and every part's output, so the final one is a signed receipt of the session."""

    hidden: bytes
    more: bool
    token: int
    text: str
    finish: str
    transcript: bytes
    # Microseconds this hop's engine spent on the step (its decode), on the last part only. What
    # the hop says, so only for measuring a chain's overhead; never for choosing or trusting it.
    compute_us: int = 0


Reply = Accepted | Busy | Queued | Token | Done | Error | Pong | ShardReady | StepOut


class _Envelope(msgspec.Struct, array_like=True):
    seq: int
    body: bytes
    sig: bytes


# --- errors -------------------------------------------------------------------------------


class ProtocolError(GputorrentError):
    """The other side broke the framing or sent something undecodable."""


class FrameTooLarge(ProtocolError):
    pass


class IntegrityError(ProtocolError):
    """A server frame failed verification: bad signature, sequence gap or repeat, or a
    transcript that does not match what was received."""


# --- framing ------------------------------------------------------------------------------


class ByteStream(Protocol):
    async def read(self, n: int | None = None) -> bytes: ...
    async def write(self, data: bytes) -> None: ...


def frame(payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME:
        raise FrameTooLarge(f"frame of {len(payload)} bytes exceeds the {MAX_FRAME}-byte cap")
    return _LEN.pack(len(payload)) + payload


class FrameReader:
    """Reads length-prefixed frames from a stream that returns arbitrary chunks."""

    __slots__ = ("_stream", "_buf", "_max")

    def __init__(self, stream: ByteStream, max_frame: int = MAX_FRAME) -> None:
        self._stream = stream
        self._buf = bytearray()
        self._max = max_frame

    async def _fill(self, n: int) -> bool:
        while len(self._buf) < n:
            try:
                chunk = await self._stream.read(max(n - len(self._buf), 65536))
            except EOFError:  # py-libp2p signals a clean end of stream by raising StreamEOF
                chunk = b""
            if not chunk:
                return False
            self._buf += chunk
        return True

    async def read_frame(self) -> bytes | None:
        """The next frame's payload, or ``None`` on a clean end of stream."""
        if not await self._fill(4):
            if self._buf:
                raise ProtocolError("stream ended inside a frame header")
            return None
        (size,) = _LEN.unpack_from(self._buf)
        if size > self._max:
            raise FrameTooLarge(f"peer announced a {size}-byte frame; the cap is {self._max}")
        if not await self._fill(4 + size):
            raise ProtocolError("stream ended inside a frame")
        payload = bytes(self._buf[4 : 4 + size])
        del self._buf[: 4 + size]
        return payload


_inbound_decoder = msgspec.msgpack.Decoder(Inbound)
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_envelope_decoder = msgspec.msgpack.Decoder(_Envelope)
_encoder = msgspec.msgpack.Encoder()


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decode_inbound(payload: bytes) -> InferRequest | Cancel | Ping | ShardOpen | ShardStep:
    try:
        return _inbound_decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid request: {exc}") from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec lets bad UTF-8 through as this
        raise ProtocolError(f"malformed frame: {exc}") from exc


class RequestTooLarge(GputorrentError, ValueError):
    """A request that could not be sent in one frame: the asker's fault, not any peer's."""


def validate_request(req: InferRequest) -> InferRequest:
    """Run the server's own strict decode on a request before it is sent, and check that it
    fits a frame with room for the token ids a failover would add (5 bytes each at most)."""
    payload = encode(req)
    room = MAX_FRAME - 5 * req.params.max_tokens
    if len(payload) > room:
        raise RequestTooLarge(f"the request is {len(payload):,} bytes; with max_tokens {req.params.max_tokens} it must "
                              f"stay under {room:,} bytes: shorten the prompt")
    return decode_inbound(payload)  # type: ignore[return-value]


# --- the signed channel -------------------------------------------------------------------


def request_digest(request_payload: bytes) -> bytes:
    return hashlib.sha256(request_payload).digest()


def _transcript_start(digest: bytes) -> bytes:
    return hashlib.sha256(b"gputorrent/transcript/1\0" + digest).digest()


def _transcript_next(prev: bytes, ids: list[int], text: str) -> bytes:
    h = hashlib.sha256(prev)
    h.update(struct.pack(f"<{len(ids)}I", *ids))
    h.update(text.encode())
    return h.digest()


def step_digest(step: ShardStep, hidden: bytes) -> bytes:
    """What a step's transcript entry covers of its input (``hidden``: every part joined)."""
    h = hashlib.sha256(_SEQ.pack(step.pos) + _SEQ.pack(step.n) + bytes([step.sample, step.replay]))
    h.update(struct.pack(f"<{len(step.tokens)}I", *step.tokens))
    h.update(struct.pack("<q", step.forced))
    h.update(hidden)
    return h.digest()


def _step_next(prev: bytes, input_digest: bytes, out: StepOut) -> bytes:
    h = hashlib.sha256(prev + input_digest)
    h.update(out.hidden)
    h.update(struct.pack("<?q", out.more, out.token))
    h.update(out.text.encode() + b"\0" + out.finish.encode())
    return h.digest()


def _signed_message(protocol: bytes, request_id: bytes, seq: int, body: bytes) -> bytes:
    return b"".join((_DOMAIN, protocol, b"\0", request_id, _SEQ.pack(seq), body))


class ReplySigner:
    """Server side of one request: numbers, chains and signs every reply frame."""

    __slots__ = ("_key", "_protocol", "_request_id", "_seq", "transcript")

    def __init__(self, identity: Identity, protocol: str, request_id: bytes, digest: bytes) -> None:
        self._key = identity.signing_key
        self._protocol = protocol.encode()
        self._request_id = request_id
        self._seq = 0
        self.transcript = _transcript_start(digest)

    def token(self, ids: list[int], text: str) -> Token:
        self.transcript = _transcript_next(self.transcript, ids, text)
        return Token(ids, text, self.transcript)

    def step(self, input_digest: bytes, hidden: bytes = b"", more: bool = False, token: int = -1, text: str = "",
             finish: str = "", compute_us: int = 0) -> StepOut:
        out = StepOut(hidden, more, token, text, finish, b"", compute_us)
        self.transcript = _step_next(self.transcript, input_digest, out)
        out.transcript = self.transcript
        return out

    def seal(self, msg: Reply) -> bytes:
        """The framed, signed bytes of ``msg``; advances the sequence number."""
        body = _encoder.encode(msg)
        seq = self._seq
        self._seq += 1
        sig = self._key.sign(_signed_message(self._protocol, self._request_id, seq, body)).signature
        return frame(_encoder.encode(_Envelope(seq, body, sig)))


class ReplyVerifier:
    """Requester side of one request: checks signature, sequence and transcript of each frame.

    Any failure raises ``IntegrityError``; the caller drops the stream and blames the peer.
    """

    __slots__ = ("_verifier", "_protocol", "_request_id", "_seq", "transcript", "step_input")

    def __init__(self, peer_id: str, protocol: str, request_id: bytes, digest: bytes) -> None:
        self.step_input = b""  # the digest of the shard step whose output is awaited
        self._verifier = Verifier(peer_id)
        self._protocol = protocol.encode()
        self._request_id = request_id
        self._seq = 0
        self.transcript = _transcript_start(digest)

    def open(self, payload: bytes) -> Reply:
        try:
            env = _envelope_decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            raise IntegrityError(f"malformed reply envelope: {exc}") from exc
        if env.seq != self._seq:
            what = "repeat" if env.seq < self._seq else "gap"
            raise IntegrityError(f"sequence {what}: expected {self._seq}, got {env.seq}")
        msg_bytes = _signed_message(self._protocol, self._request_id, env.seq, env.body)
        if not self._verifier.verify(msg_bytes, env.sig):
            raise IntegrityError(f"bad signature on frame {env.seq}")
        self._seq += 1
        try:
            msg = _reply_decoder.decode(env.body)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            raise IntegrityError(f"malformed signed reply: {exc}") from exc
        if isinstance(msg, Token):
            self.transcript = _transcript_next(self.transcript, msg.ids, msg.text)
            if msg.transcript != self.transcript:
                raise IntegrityError("transcript hash does not match the tokens received")
        elif isinstance(msg, StepOut):
            self.transcript = _step_next(self.transcript, self.step_input, msg)
            if msg.transcript != self.transcript:
                raise IntegrityError("transcript hash does not match the step sent and the output received")
        elif isinstance(msg, Done) and msg.transcript != self.transcript:
            raise IntegrityError("receipt does not match the tokens received")
        return msg


def params_from(**kw: Any) -> Params:
    """Sampling parameters from keywords, checked (``ValueError`` names the bad one). An
    unknown keyword is a ``TypeError``, as for any Python call: a typo must not silently
    run with the defaults."""
    known = Params.__struct_fields__
    for key in kw:
        if key not in known:
            import difflib

            near = difflib.get_close_matches(key, known, n=1)
            raise TypeError(f"unexpected keyword argument {key!r}" + (f"; did you mean {near[0]!r}?" if near else
                                                                       f" (generation keywords: {', '.join(known)})"))
    given = {k: v for k, v in kw.items() if v is not None}
    try:
        return msgspec.convert(given, Params)
    except msgspec.ValidationError as exc:
        raise ValueError(f"bad generation parameter: {exc}") from exc
