"""argparse ``type=`` checks: a bad value is a usage error (exit 2) before any work starts.

Each check returns the parsed value or raises ``argparse.ArgumentTypeError`` with a message
that says what a good value looks like; argparse names the flag.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path

_HOST_PROTOCOLS = ("ip4", "ip6", "dns", "dns4", "dns6")
_PEER_ID = re.compile(r"^(12D3KooW|Qm)[1-9A-HJ-NP-Za-km-z]{20,60}$")


def _number(kind: type, text: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}") from None
    if kind is float and value != value:  # NaN
        raise argparse.ArgumentTypeError("not a number")
    return value


def int_range(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """A whole number in [lo, hi]."""

    def check(text: str) -> int:
        value = int(_number(int, text))
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {lo} or more" if hi is None else
                                             f"must be between {lo} and {hi:,}")
        return value

    check.__name__ = "whole number"
    return check


def positive_float(text: str) -> float:
    value = float(_number(float, text))
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def fraction(text: str) -> float:
    value = float(_number(float, text))
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("is a probability, between 0 and 1")
    return value


def port(text: str) -> int:
    return int_range(0, 65535)(text)


def peer_id(text: str) -> str:
    """A libp2p peer id as ``gputorrent id`` prints it."""
    if not _PEER_ID.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a peer id; give it as 'gputorrent id' prints it "
                                         "(12D3KooW…)")
    return text


def _parts(text: str) -> list[str]:
    parts = text.strip().strip("/").split("/")
    if len(parts) < 4 or parts[0] not in _HOST_PROTOCOLS or parts[2] != "tcp" or not parts[3].isdigit() \
            or int(parts[3]) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a multiaddr; e.g. /ip4/127.0.0.1/tcp/4001/p2p/12D3KooW…")
    if parts[0] == "ip4" and not re.fullmatch(r"(\d{1,3})(\.\d{1,3}){3}", parts[1]):
        raise argparse.ArgumentTypeError(f"{text!r}: {parts[1]!r} is not an IPv4 address")
    return parts


def peer_addr(text: str) -> str:
    """A full address of a peer: host, TCP port and ``/p2p/PEER_ID`` (serve prints these), or
    a relayed one, ``/ip4/…/tcp/…/p2p/RELAY/p2p-circuit/p2p/PEER`` (a donor behind NAT prints those)."""
    parts = _parts(text)
    relayed = len(parts) == 9 and parts[4] == "p2p" and parts[6] == "p2p-circuit" and parts[7] == "p2p"
    if not relayed and (len(parts) != 6 or parts[4] != "p2p"):
        raise argparse.ArgumentTypeError(f"{text!r} lacks the peer id; give the full address serve or bootstrap "
                                         "printed, e.g. /ip4/127.0.0.1/tcp/4001/p2p/12D3KooW… (or a relayed one, "
                                         "…/p2p/RELAY_ID/p2p-circuit/p2p/PEER_ID)")
    peer_id(parts[5])
    if relayed:
        peer_id(parts[8])
    return text.strip()


def listen_addr(text: str) -> str:
    """An address to listen on: ``/ip4/HOST/tcp/PORT`` (port 0: any free one)."""
    try:
        parts = _parts(text)
    except argparse.ArgumentTypeError:
        parts = []
    if len(parts) != 4 or parts[0] not in ("ip4", "ip6"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a listen address; e.g. /ip4/127.0.0.1/tcp/4001 "
                                         "(tcp/0: any free port)")
    return text.strip()


def host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (an IP address or localhost)."""
    import ipaddress

    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT; e.g. 127.0.0.1:9464")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{host!r} is not an IP address (or localhost)") from None
    return host, port(port_text)


def key_file(text: str) -> Path:
    """A key file: absent (it will be created) or a small regular file."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a regular file; give the path of a key file "
                                         "(created 0600 when absent)")
    return path


def existing_file(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return path
