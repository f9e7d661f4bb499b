"""Throw malformed, truncated, oversized and absurd frames at a real serve process.

``benchmarks/fuzz.py`` (100,000 frames) and ``tests/test_hostile.py`` (a short run) drive this.
Workers open infer streams and send one of: random bytes, a truncated frame, a length header
past the cap, msgpack of the wrong shape, a request with absurd values, a valid request
followed by garbage, a stream half-closed at once, or one opened and reset at once. Every
stream must end (a reply, a close or a reset) within ``STREAM_DEADLINE_S``; one that does not
is "hung". Meanwhile a pinger measures the peer's pong time.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio

from .. import protocol, wire
from ..asking.client import ping
from ..net.host import finish_stream, new_stream

STREAM_DEADLINE_S = 15.0
# What each fuzzing stream does, and how often. A truncated frame left open makes the peer wait
# for the rest (up to its 10 s first-frame deadline), so it is rare: it would set the pace.
KINDS = ["random", "truncated", "slow-truncated", "oversized", "wrong-type", "absurd", "valid+garbage",
         "half-open", "open-reset", "valid+cancel"]
WEIGHTS = [10, 10, 0.5, 10, 10, 15, 15, 5, 10, 10]


@dataclass(slots=True)
class FuzzResult:
    frames: int = 0
    streams: int = 0
    hung: int = 0
    refused_open: int = 0  # stream opens the peer turned away (it may, under a flood)
    kinds: dict[str, int] = field(default_factory=dict)
    worst_ping_ms: float = 0.0
    pings: int = 0


def _absurd_request(rng: random.Random) -> bytes:
    """A request-shaped array with values out of every range, or of the wrong types."""
    choices: list[Any] = [
        ["req", os.urandom(16), "", None, "hi", {"max_tokens": rng.choice([0, -1, 1 << 40])}, [], 1000],
        ["req", os.urandom(16), "", None, "hi", {}, [rng.choice([-1, 1 << 31, 49152, 2**63 - 1])], 1000],
        ["req", os.urandom(16), "m" * rng.randint(300, 5000), None, "hi", {}, [], 1000],
        ["req", os.urandom(16), "", [["user", "x"]] * rng.randint(1, 5000), None, {}, [], 1000],
        ["req", os.urandom(16), "", None, "", {}, [], 1000],  # empty prompt
        ["req", b"", "", None, "hi", {}, [], 1000],
        ["req", os.urandom(16), "", None, "hi", {"temperature": "hot"}, [], 0],
        ["req", os.urandom(16), 5, {"a": 1}, ["x"], [], "no", -5],
        ["ping", os.urandom(16)],
        ["cancel", "now"],
        [rng.random(), None, True],
    ]
    return msgspec.msgpack.encode(rng.choice(choices))


def _valid_request(rng: random.Random, max_tokens: int) -> bytes:
    return wire.encode(wire.InferRequest(request_id=os.urandom(16), prompt=rng.choice(["Hi", "Tell me a story."]),
                                         params=wire.Params(max_tokens=max_tokens)))


async def _one_stream(host: Any, peer_id: str, rng: random.Random, result: FuzzResult, frames_left: list[int]) -> None:
    kind = rng.choices(KINDS, weights=WEIGHTS)[0]
    result.kinds[kind] = result.kinds.get(kind, 0) + 1
    try:
        with trio.fail_after(3):
            stream = await new_stream(host, peer_id, [protocol.INFER])
    except Exception:  # noqa: BLE001 (the fuzzer counts any refusal)
        result.refused_open += 1
        return
    result.streams += 1
    sent = 0
    try:
        with trio.fail_after(STREAM_DEADLINE_S):
            if kind == "open-reset":
                await stream.reset()
                return
            if kind == "half-open":
                await stream.close()
                await _drain(stream)
                return
            if kind == "random":
                data, sent = os.urandom(rng.randint(1, 2048)), 1
            elif kind in ("truncated", "slow-truncated"):
                full = wire.frame(_valid_request(rng, 4))
                data, sent = full[: rng.randint(1, len(full) - 1)], 1
            elif kind == "oversized":
                data, sent = (wire.MAX_FRAME + rng.randint(1, 1 << 30)).to_bytes(4, "big") + os.urandom(64), 1
            elif kind == "wrong-type":
                data, sent = wire.frame(msgspec.msgpack.encode(rng.choice([1, "x", None, {"a": [1]}, 3.5]))), 1
            elif kind == "absurd":
                payload = _absurd_request(rng)
                data, sent = (wire.frame(payload) if len(payload) <= wire.MAX_FRAME else payload[:1024]), 1
            else:
                follow = rng.randint(1, 40)
                extra = (wire.frame(wire.encode(wire.Cancel("fuzz"))) if kind == "valid+cancel" else
                         b"".join(wire.frame(os.urandom(rng.randint(0, 64))) for _ in range(follow)))
                data, sent = wire.frame(_valid_request(rng, 8)) + extra, 1 + (1 if kind == "valid+cancel" else follow)
            await stream.write(data)
            if kind != "slow-truncated":  # that one leaves the peer waiting for the rest
                await stream.close()
            await _drain(stream)
    except trio.TooSlowError:
        result.hung += 1
    except Exception:  # noqa: BLE001, S110 (a reset or a refusal: the peer ended the stream, as it may)
        pass  # a reset or a refusal: the peer ended the stream, as it may
    finally:
        result.frames += sent
        frames_left[0] -= sent
        await finish_stream(stream, reset=True)


async def _drain(stream: Any) -> None:
    """Read until the peer ends the stream (EOF or reset)."""
    while True:
        try:
            chunk = await stream.read(65536)
        except Exception:  # noqa: BLE001 (the stream ended, however)
            return
        if not chunk:
            return


async def fuzz(host: Any, peer_id: str, *, frames: int, workers: int = 16, seed: int = 1) -> FuzzResult:
    """Send at least ``frames`` frames over many streams, ``workers`` at once."""
    result = FuzzResult()
    rng = random.Random(seed)
    left = [frames]
    done = trio.Event()

    async def worker() -> None:
        while left[0] > 0:
            await _one_stream(host, peer_id, rng, result, left)

    async def pinger() -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            try:
                await ping(host, peer_id, 10.0)
            except Exception:  # noqa: BLE001, S110 (a failed ping is what the fuzzer measures, not an error)
                pass
            result.worst_ping_ms = max(result.worst_ping_ms, (time.perf_counter() - t0) * 1000)
            result.pings += 1
            with trio.move_on_after(0.25):
                await done.wait()

    async with trio.open_nursery() as n:
        n.start_soon(pinger)
        async with trio.open_nursery() as w:
            for _ in range(workers):
                w.start_soon(worker)
        done.set()
    return result


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")
