"""Stream one answer and print every event as a JSON line, for tests that act mid-answer.

``python -m gputorrent.lab.streamer (--bootstrap ADDR | --peer ADDR) --identity KEY "prompt"``
prints ``{"text": …}`` per piece, ``{"failover": peer, "outcome": …}`` per failover and
``{"answer": {…}}`` at the end (or ``{"error": …}``), flushed at once: a test reading stdout can
kill a relay or a peer while the answer is still streaming, and needs no sleeps to do so.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gputorrent.lab.streamer")
    p.add_argument("prompt")
    p.add_argument("--bootstrap", action="append", default=[])
    p.add_argument("--peer", action="append", default=[], help="ask this peer (full or circuit address), no DHT")
    p.add_argument("--identity", required=True)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--asks", type=int, default=1, help="ask this many times, one after another")
    p.add_argument("--wait-direct", type=float, default=0.0, metavar="S",
                   help="between asks, wait up to S seconds for a hole punch to the peer that answered")
    args = p.parse_args(argv)

    import trio

    import gputorrent

    def say(obj: dict) -> None:
        print(json.dumps(obj), flush=True)

    async def run() -> int:
        from gputorrent.net.host import path_of

        async with gputorrent.Swarm(args.bootstrap, mdns=False, identity=args.identity,
                                    peers=args.peer) as swarm:
            for i in range(args.asks):
                try:
                    async for ev in swarm.stream(args.prompt, model=args.model, temperature=0,
                                                 max_tokens=args.max_tokens):
                        if isinstance(ev, gputorrent.Text):
                            say({"text": ev.text})
                        elif isinstance(ev, gputorrent.Failover):
                            say({"failover": ev.peer_id, "outcome": ev.outcome})
                        elif isinstance(ev, gputorrent.Finished):
                            say({"answer": ev.answer.to_dict()})
                            peer = ev.answer.peer_id
                except gputorrent.AskFailed as exc:
                    say({"error": str(exc)})
                    return 1
                if i + 1 < args.asks and args.wait_direct:
                    # DCUtR reports nothing when it is done: look at the connection, bounded.
                    with trio.move_on_after(args.wait_direct):
                        while path_of(swarm._core.host, peer) != "hole-punched":
                            await trio.sleep(0.1)
                    say({"path": path_of(swarm._core.host, peer)})
        return 0

    return trio.run(run)


if __name__ == "__main__":
    sys.exit(main())
