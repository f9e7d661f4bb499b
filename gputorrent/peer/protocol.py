"""Protocol ids and the error codes both sides agree on."""

INFER = "/gputorrent/infer/2"  # 2: resume_ids replayed within max_tokens; Queued frames
PING = "/gputorrent/ping/1"
SHARD = "/gputorrent/shard/1"  # one session on blocks [first, end) of a model

# Error codes in a signed ``Error`` frame. A requester may try another peer after the
# "peer" kind; the "request" kind would fail anywhere, so it stops.
BAD_REQUEST = "bad_request"  # malformed or out-of-range: fix the request
UNKNOWN_MODEL = "unknown_model"  # this peer does not serve that model
CONTEXT_EXCEEDED = "context_exceeded"  # the prompt does not fit this peer's context
ENGINE = "engine"  # the model failed while generating
NOT_ALLOWED = "not_allowed"  # this peer serves only an allowlist of requesters
WRONG_BLOCKS = "wrong_blocks"  # this peer holds other blocks of the model

RETRY_ELSEWHERE = frozenset({UNKNOWN_MODEL, CONTEXT_EXCEEDED, ENGINE, NOT_ALLOWED, WRONG_BLOCKS})
