"""The transport's floor: the round trip of one step-sized frame between two processes on
loopback, over a py-libp2p stream (Noise, yamux: what a chain hop's step crosses) and over a
plain TCP socket, and the CPU each round trip costs this side. What a hop adds beyond these
is its own handling (the hand-off to its decode thread and back, signing its reply).

``python benchmarks/echo.py`` prints the figures; ``benchmarks/shards.py`` reports them
beside the per-hop overhead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass

import trio

PROTOCOL = "/gputorrent-bench/echo/1"
FRAME_BYTES = 2400  # a decode step's hidden state (576 x 4 bytes) and its envelope


@dataclass(frozen=True)
class Floor:
    libp2p_ms: float  # median round trip over a py-libp2p stream
    libp2p_cpu_ms: float  # this process's CPU per round trip (all threads)
    libp2p_write_ms: float  # median time of the write alone (this side; no waiting in it)
    tcp_ms: float  # median round trip over a plain TCP socket
    tcp_cpu_ms: float


async def _serve() -> None:
    from gputorrent import wire
    from gputorrent.identity import Identity
    from gputorrent.net.host import full_addrs, running_host

    async def echo_tcp(stream: trio.SocketStream) -> None:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)

    ident = Identity.generate()
    async with running_host(ident, ["/ip4/127.0.0.1/tcp/0"]) as host, trio.open_nursery() as n:

        async def echo_libp2p(stream) -> None:
            reader = wire.FrameReader(stream)
            while (payload := await reader.read_frame()) is not None:
                await stream.write(wire.frame(payload))

        host.set_stream_handler(PROTOCOL, echo_libp2p)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        n.start_soon(trio.serve_listeners, echo_tcp, listeners)
        print(full_addrs(host)[0], listeners[0].socket.getsockname()[1], flush=True)
        await trio.sleep_forever()


async def _measure(addr: str, port: int, rounds: int) -> Floor:
    from gputorrent import wire
    from gputorrent.identity import Identity
    from gputorrent.net.host import connect, new_stream, running_host

    payload = os.urandom(FRAME_BYTES - 4)

    writes: list[float] = []

    async def timed(one_trip) -> tuple[float, float]:
        for _ in range(rounds // 10):  # warm up
            await one_trip()
        writes.clear()
        trips, cpu = [], time.process_time()
        for _ in range(rounds):
            t = time.perf_counter()
            await one_trip()
            trips.append(time.perf_counter() - t)
        cpu = time.process_time() - cpu
        return sorted(trips)[len(trips) // 2] * 1000, cpu / rounds * 1000

    ident = Identity.generate()
    async with running_host(ident) as host:
        stream = await new_stream(host, await connect(host, addr), [PROTOCOL])
        reader = wire.FrameReader(stream)

        async def libp2p_trip() -> None:
            t = time.perf_counter()
            await stream.write(wire.frame(payload))
            writes.append(time.perf_counter() - t)
            await reader.read_frame()

        libp2p = await timed(libp2p_trip)
        write_ms = sorted(writes)[len(writes) // 2] * 1000
        await stream.close()
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    framed = wire.frame(payload)

    async def tcp_trip() -> None:
        await sock.send_all(framed)
        got = 0
        while got < len(framed):
            got += len(await sock.receive_some(65536))

    tcp = await timed(tcp_trip)
    await sock.aclose()
    return Floor(*libp2p, write_ms, *tcp)


def floor(rounds: int = 600) -> Floor:
    """The floor, measured against an echo server in a process of its own."""
    server = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)
    try:
        addr, port = server.stdout.readline().split()  # type: ignore[union-attr]
        return trio.run(_measure, addr, int(port), rounds)
    finally:
        server.kill()
        server.wait(10)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        trio.run(_serve)
    else:
        print(floor())
