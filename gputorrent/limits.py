"""Bounds every face shares (CLI flags, ``api.Peer``, the wire's own checks).

Kept free of imports so the CLI can use them in ``--help`` without loading trio or msgspec.
"""

from __future__ import annotations

# 128k: a failover resume carries every token so far (5 bytes each at most) in one 1 MiB frame.
MAX_TOKENS = 1 << 17

MAX_SLOTS = 64  # sequences in one llama.cpp context
MIN_CTX = 16
MAX_CTX = 1 << 20


def check_options(*, slots: int, queue: int, ctx: int, rate_limit: int, announce_interval: float) -> None:
    """The bounds of serving options, for every face that takes them (the CLI's argparse
    types use the same constants); ``ValueError`` names the bad one."""
    for name, value, lo, hi in (("slots", slots, 1, MAX_SLOTS), ("queue", queue, 0, 4096),
                                ("ctx", ctx, MIN_CTX, MAX_CTX), ("rate_limit", rate_limit, 0, None)):
        if value < lo or (hi is not None and value > hi):
            raise ValueError(f"{name} must be {lo} or more" if hi is None else f"{name} must be between {lo} and {hi}")
    if not announce_interval > 0:
        raise ValueError("announce_interval must be positive")
