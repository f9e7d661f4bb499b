"""Link delay and loss in user space, for the NAT lab's routers (this kernel has no netem).

A router's forwarded packets go to an NFQUEUE (an nftables ``queue`` rule); this program, run
inside the router's namespace, holds each one for ``--ms`` milliseconds and then accepts it, or
drops it with probability ``--loss``. Every packet waits the same time, so verdicts go out in
arrival order and one batch verdict releases all that are due. It speaks nfnetlink_queue over a
raw netlink socket: no library, no packet copied to user space (metadata only).

Run: ``ip netns exec ROUTER python -m gputorrent.lab.delay --queue 0 --ms 25 --loss 0.001``.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 1, 2, 3
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_CFG_F_FAIL_OPEN = 1
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NF_DROP, NF_ACCEPT = 0, 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
MAXLEN = 50_000  # packets held at once: 25 ms of 46 MB/s is ~800


def _attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _message(msg_type: int, queue: int, attrs: bytes, flags: int = NLM_F_REQUEST, seq: int = 0) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type, flags, seq, 0) + body


def _attrs(data: bytes) -> dict[int, bytes]:
    out, i = {}, 0
    while i + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, i)
        if length < 4:
            break
        out[kind & 0x7FFF] = data[i + 4:i + length]
        i += (length + 3) & ~3
    return out


class Queue:
    def __init__(self, num: int) -> None:
        self.num = num
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        self.sock.bind((0, 0))
        self._config(_attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, socket.AF_INET)), 1)
        self._config(_attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))
                     + _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", MAXLEN))
                     + _attr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN))
                     + _attr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN)), 2)

    def _config(self, attrs: bytes, seq: int) -> None:
        self.sock.send(_message(NFQNL_MSG_CONFIG, self.num, attrs, NLM_F_REQUEST | NLM_F_ACK, seq))
        reply = self.sock.recv(65536)
        _, kind, _, _, _ = struct.unpack_from("=IHHII", reply)
        if kind == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", reply, 16)
            if err:
                raise OSError(-err, f"nfqueue config: {os.strerror(-err)}")

    def packet_ids(self) -> list[int]:
        """The ids of the packets that arrived (reads what is waiting; call when readable)."""
        ids = []
        data = self.sock.recv(1 << 20)
        i = 0
        while i + 16 <= len(data):
            length, kind, _, _, _ = struct.unpack_from("=IHHII", data, i)
            if length < 16:
                break
            if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                hdr = _attrs(data[i + 20:i + length]).get(NFQA_PACKET_HDR)
                if hdr:
                    ids.append(struct.unpack_from("!I", hdr)[0])
            i += (length + 3) & ~3
        return ids

    def verdict(self, packet_id: int, verdict: int, *, batch: bool = False) -> None:
        kind = NFQNL_MSG_VERDICT_BATCH if batch else NFQNL_MSG_VERDICT
        self.sock.send(_message(kind, self.num, _attr(NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id))))


def run(queue: Queue, delay_s: float, loss: float, rng: random.Random) -> None:
    held: collections.deque[tuple[float, int]] = collections.deque()  # (due, packet id), in arrival order
    while True:
        wait = max(0.0, held[0][0] - time.monotonic()) if held else None
        ready, _, _ = select.select([queue.sock], [], [], wait)
        if ready:
            now = time.monotonic()
            for pid in queue.packet_ids():
                if loss and rng.random() < loss:
                    queue.verdict(pid, NF_DROP)
                else:
                    held.append((now + delay_s, pid))
        now = time.monotonic()
        last = None
        while held and held[0][0] <= now:
            last = held.popleft()[1]
        if last is not None:
            # Every id up to ``last`` still queued is due (a dropped one is no longer queued).
            queue.verdict(last, NF_ACCEPT, batch=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queue", type=int, default=0, help="NFQUEUE number, in this namespace")
    ap.add_argument("--ms", type=float, required=True, help="one-way delay of every packet")
    ap.add_argument("--loss", type=float, default=0.0, help="probability a packet is dropped")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    queue = Queue(args.queue)
    print("ready", flush=True)
    try:
        run(queue, args.ms / 1000, args.loss, random.Random(args.seed))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
