"""Carry engine events from the decode thread into trio.

The engine calls ``emit`` from its own thread; ``TrioToken.run_sync_soon`` is the cheapest
thread-safe hop into the trio run and never blocks the decode loop.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import trio

from .base import Event, Failed, Finished


class EventChannel:
    """One job's events, iterated in trio up to and including ``Finished`` or ``Failed``."""

    __slots__ = ("_send", "_recv", "_token")

    def __init__(self) -> None:
        self._send, self._recv = trio.open_memory_channel[Event](math.inf)
        self._token = trio.lowlevel.current_trio_token()

    def emit(self, ev: Event) -> None:
        try:
            self._token.run_sync_soon(self._send.send_nowait, ev)
        except trio.RunFinishedError:
            pass  # the consumer's trio run is gone; nobody is listening

    async def receive(self) -> Event:
        return await self._recv.receive()

    async def __aiter__(self) -> AsyncIterator[Event]:
        async for ev in self._recv:
            yield ev
            if isinstance(ev, (Finished, Failed)):
                return
