"""Trio as a guest on a running asyncio loop, so asyncio programs (and Textual) can use the
trio-native swarm.

``trio.lowlevel.start_guest_run`` runs trio's scheduler on the asyncio thread, interleaved
with asyncio's own callbacks; trio's I/O waits happen in a helper thread. Both sides run on
the same thread, so results cross over with plain ``Future.set_result`` calls. One guest run
per loop serves every ``Swarm`` and ``Peer`` on that loop; it stops when the last one closes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")
_END = object()


class TrioGuest:
    _by_loop: dict[asyncio.AbstractEventLoop, TrioGuest] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._users = 0
        self._nursery: trio.Nursery | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop = trio.Event()
        self._done: asyncio.Future[None] = loop.create_future()

    @classmethod
    async def acquire(cls) -> TrioGuest:
        """The guest run of the current asyncio loop, started on first use."""
        loop = asyncio.get_running_loop()
        guest = cls._by_loop.get(loop)
        if guest is None or guest._done.done():
            guest = cls._by_loop[loop] = cls(loop)
            await guest._start()
        guest._users += 1
        return guest

    async def release(self) -> None:
        self._users -= 1
        if self._users == 0:
            self._by_loop.pop(self._loop, None)
            self._token.run_sync_soon(self._stop.set)  # type: ignore[union-attr]
            await self._done

    async def _start(self) -> None:
        ready: asyncio.Future[None] = self._loop.create_future()

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._token = trio.lowlevel.current_trio_token()
                ready.set_result(None)
                await self._stop.wait()
                nursery.cancel_scope.cancel()

        def done(outcome: Any) -> None:
            if not ready.done():
                ready.set_exception(RuntimeError(f"trio guest run ended early: {outcome}"))
            if not self._done.done():
                self._done.set_result(None)

        trio.lowlevel.start_guest_run(
            main, run_sync_soon_threadsafe=self._loop.call_soon_threadsafe,  # type: ignore[arg-type]
            done_callback=done,
            host_uses_signal_set_wakeup_fd=True,
            # asyncio (and Textual) own Ctrl-C; the guest must not take SIGINT over.
            restrict_keyboard_interrupt_to_checkpoints=True,
        )
        await ready

    def spawn(self, fn: Callable[..., Awaitable[T]], *args: Any) -> asyncio.Future[T]:
        """Run ``fn(*args)`` as a trio task; its result (or error) lands in the future.
        Cancelling the future cancels the task."""
        fut: asyncio.Future[T] = self._loop.create_future()
        scope = trio.CancelScope()

        async def run() -> None:
            with scope:
                try:
                    result = await fn(*args)
                except BaseException as exc:
                    if not fut.done():
                        fut.set_exception(asyncio.CancelledError() if isinstance(exc, trio.Cancelled) else exc)
                    if isinstance(exc, trio.Cancelled):
                        raise
                    return
                if not fut.done():
                    fut.set_result(result)
            if not fut.done():  # cancelled before it started
                fut.cancel()

        def start() -> None:
            self._nursery.start_soon(run)  # type: ignore[union-attr]

        fut.add_done_callback(lambda f: f.cancelled() and self._token.run_sync_soon(scope.cancel))  # type: ignore[union-attr]
        self._token.run_sync_soon(start)  # type: ignore[union-attr]
        return fut

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return await self.spawn(fn, *args)

    async def iterate(self, agen: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
        """Drive a trio async iterator from asyncio; leaving the loop early cancels it."""
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for item in agen:
                    queue.put_nowait(item)
            except BaseException as exc:
                queue.put_nowait(_Raised(exc))
                raise
            finally:
                aclose = getattr(agen, "aclose", None)
                if aclose is not None:
                    with trio.CancelScope(shield=True), trio.move_on_after(5):
                        await aclose()
            queue.put_nowait(_END)

        task = self.spawn(pump)
        task.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no "never retrieved" warning
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if isinstance(item, _Raised):
                    if isinstance(item.exc, trio.Cancelled):
                        raise asyncio.CancelledError()
                    raise item.exc
                yield item
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait([task], timeout=5)


class _Raised:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def running_under_trio() -> bool:
    import sniffio

    try:
        return sniffio.current_async_library() == "trio"
    except sniffio.AsyncLibraryNotFoundError:
        return False



class Hosted:
    """Base of ``Swarm`` and ``Peer``: an async context manager whose work lives in trio.

    Under trio, ``_open``/``_close`` run in the caller's task. Under asyncio, both run in one
    trio task of the loop's guest run (a nursery must close in the task that opened it), and
    the other methods go through ``_call`` and ``_iterate``.
    """

    _guest: TrioGuest | None = None

    async def _open(self) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError

    async def _lifetime(self, ready: Callable[[], Any], closing: trio.Event) -> None:
        await self._open()
        try:
            ready()
            await closing.wait()
        finally:
            # Not under a shield: a nursery opened by _open must be closed outside any scope
            # opened after it.
            await self._close()

    async def __aenter__(self):
        if running_under_trio():
            await self._open()
            return self
        guest = await TrioGuest.acquire()
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closing = await guest.call(_new_event)
        self._life = guest.spawn(self._lifetime, lambda: ready.done() or ready.set_result(None), self._closing)
        done, _ = await asyncio.wait([ready, self._life], return_when=asyncio.FIRST_COMPLETED)
        if self._life in done:  # opening failed: give the guest back and raise its error here
            await guest.release()
            self._life.result()
        self._guest = guest
        return self

    async def __aexit__(self, *exc: object) -> None:
        guest, self._guest = self._guest, None
        if guest is None:
            await self._close()
            return
        await guest.call(_set_event, self._closing)
        try:
            await self._life
        finally:
            await guest.release()

    def _call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kw: Any) -> Awaitable[T]:
        if self._guest is None:
            return fn(*args, **kw)
        return self._guest.call(lambda: fn(*args, **kw))

    def _iterate(self, agen: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
        return self._guest.iterate(agen) if self._guest is not None else agen


async def _new_event() -> trio.Event:
    return trio.Event()


async def _set_event(ev: trio.Event) -> None:
    ev.set()
