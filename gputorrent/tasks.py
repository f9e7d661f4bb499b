"""Small trio helpers shared by the DHT and the requester."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio


async def gather(fns: Sequence[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Run the coroutine functions at once; their results in order (the first error cancels
    the rest and propagates, as a nursery does)."""
    out: list[Any] = [None] * len(fns)

    async def one(i: int) -> None:
        out[i] = await fns[i]()

    async with trio.open_nursery() as n:
        for i in range(len(fns)):
            n.start_soon(one, i)
    return out
