"""Protocol ids and the error codes both sides agree on."""

# 3: prompts are computed on wire.chunk_end's borders (32 positions below 512), so that peers
# of version 2 (512-position chunks) and 3 never resume each other's answers: their logits differ.
INFER = "/gputorrent/infer/3"
PING = "/gputorrent/ping/1"
SHARD = "/gputorrent/shard/2"  # one session on blocks [first, end) of a model; 2: chunk_end's borders
PIECES = "/gputorrent/pieces/1"  # pieces of the model file a peer serves (serving/seeder.py)

# Error codes in a signed ``Error`` frame. A requester may try another peer after the
# "peer" kind; the "request" kind would fail anywhere, so it stops.
BAD_REQUEST = "bad_request"  # malformed or out-of-range: fix the request
UNKNOWN_MODEL = "unknown_model"  # this peer does not serve that model
CONTEXT_EXCEEDED = "context_exceeded"  # the prompt does not fit this peer's context
ENGINE = "engine"  # the model failed while generating
NOT_ALLOWED = "not_allowed"  # this peer serves only an allowlist of requesters
WRONG_BLOCKS = "wrong_blocks"  # this peer holds other blocks of the model

RETRY_ELSEWHERE = frozenset({UNKNOWN_MODEL, CONTEXT_EXCEEDED, ENGINE, NOT_ALLOWED, WRONG_BLOCKS})
