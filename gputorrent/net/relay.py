"""Peers behind NAT: is this host reachable, and if not, relays that carry its connections.

Most volunteers sit behind a home router: nobody outside can open a connection to them. Three
pieces, all on py-libp2p 0.8.1's circuit relay v2 (``libp2p.relay.circuit_v2``), which nothing
in ``new_host`` switches on:

- **Dial-back** (``/gputorrent/dialback/1``, AutoNAT's idea in one round trip): a node asks a peer
  it is connected to to open a TCP connection back to it, at the IP the asking connection came
  from (never an address the asker names: the answer cannot be aimed at a third party) and the
  ports it listens on. Any success makes the node public; answers that all failed make it
  private. Asked of up to ``DIALBACK_PEERS`` peers at once, each within ``DIALBACK_S``.
- **Relay service** (hop): a public node relays circuits for private ones, bounded by
  ``relay_limits`` and ``RelayPolicy`` (docs/architecture.md, "Relay limits", says why these
  numbers): a reservation only ever for the connected peer, and at most so many per source
  network, per key and in all, with a share kept for peers that serve.
- **Reservations and relayed dials**: a private node reserves a slot on relays and is reached at
  ``<relay addr>/p2p-circuit/p2p/<its id>``; the circuit carries an ordinary Noise + yamux
  connection end to end, so streams, signatures and the requester's identity are the same as
  over a direct one. py-libp2p's swarm drops ``/p2p-circuit`` addresses from every dial, so
  ``dial_relayed`` speaks the hop protocol itself and upgrades the stream.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields, replace
from typing import Any

import msgspec
import trio

from ..errors import GputorrentError

log = logging.getLogger("gputorrent.net")

DIALBACK = "/gputorrent/dialback/1"
DIALBACK_S = 2.0  # one dial-back: a TCP connect across the internet, with the peer's own round trip
DIALBACK_PEERS = 3
DIALBACK_PORTS = 4  # ports one request may ask to be dialed at (an advert lists a few)
RESERVE_S = 3.0  # one reservation round trip
RELAYS_WANTED = 2  # reservations a private node keeps: one relay may die mid-answer
RESERVATION_RENEW_S = 15 * 60.0  # renewed well inside the relay's one-hour reservation
RELAY_CHECK_S = 5.0  # how often a private node checks that its relays are still connected

CIRCUIT = "/p2p-circuit"


class RelayError(GputorrentError):
    """A relayed dial or reservation that failed; the message says where."""


@dataclass(frozen=True, slots=True)
class RelayPolicy:
    """Who gets what of a relay. py-libp2p's relay had one bound, 128 reservations in all, and
    took the peer id to reserve for from the message: one connection emptied a relay in about a
    second with made-up ids, for an hour. A source network is an IPv4 /24 or an IPv6 /48 (what
    one household or one cheap server gets); keys are free, networks are not."""

    reservations: int = 128  # in all
    per_ip: int = 8  # reservations held by peers of one source network
    served_share: float = 0.25  # of ``reservations``, kept for peers whose advert this node holds
    circuits: int = 16  # circuits to one reserved peer at once
    circuits_per_ip: int = 4  # ...of them from one source network
    circuits_per_key: int = 2  # ...of them from one source peer
    v4_prefix: int = 24  # what counts as one source network (a lab whose one /24 stands for
    v6_prefix: int = 48  # many networks sets 32)

    @classmethod
    def parse(cls, text: str) -> RelayPolicy:
        """``per-ip=4,circuits-per-ip=2``: any of the fields, dashes for underscores."""
        names = {f.name.replace("_", "-"): f for f in fields(cls)}
        out = cls()
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = item.partition("=")
            f = names.get(key.strip())
            if f is None:
                raise ValueError(f"unknown relay limit {key!r}; one of: {', '.join(names)}")
            try:
                number: float = float(value) if f.name == "served_share" else int(value)
            except ValueError:
                raise ValueError(f"relay limit {key} needs a number, not {value!r}") from None
            if number < 0 or (f.name == "served_share" and number > 1) or \
                    (f.name == "v4_prefix" and number > 32) or (f.name == "v6_prefix" and number > 128):
                raise ValueError(f"relay limit {key}={value} is out of range")
            change: dict[str, Any] = {f.name: number}
            out = replace(out, **change)
        return out


def source_network(ip: str, v4: int = 24, v6: int = 48) -> str:
    """The network a source address counts under: its /24 (IPv4) or /48 (IPv6)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip or "?"
    bits = v4 if addr.version == 4 else v6
    return str(ipaddress.ip_network(f"{addr}/{bits}", strict=False))


@dataclass(slots=True)
class RelayBook:
    """The relay's own count of who holds what, checked before py-libp2p's resource manager
    is asked for anything (pure: tests drive it without a host)."""

    policy: RelayPolicy = field(default_factory=RelayPolicy)
    holders: dict[str, str] = field(default_factory=dict)  # reserving peer -> its source network
    by_network: Counter = field(default_factory=Counter)  # (destination, source network) -> circuits
    by_key: Counter = field(default_factory=Counter)  # (destination, source peer) -> circuits

    def reserve(self, peer: str, network: str, *, holds: Callable[[str], bool], served: bool) -> str | None:
        """Why ``peer`` (from ``network``) gets no reservation, or None (and it is counted).
        ``holds`` says whether a peer's reservation is still live (they expire)."""
        for gone in [p for p in self.holders if p != peer and not holds(p)]:
            del self.holders[gone]
        if peer in self.holders and holds(peer):
            self.holders[peer] = network  # a renewal
            return None
        p = self.policy
        same = sum(1 for n in self.holders.values() if n == network)
        if same >= p.per_ip:
            return f"{same} reservations are held from {network} already (at most {p.per_ip})"
        held = len(self.holders)
        if held >= p.reservations:
            return f"all {p.reservations} reservations are taken"
        open_to_all = p.reservations - int(p.reservations * p.served_share)
        if held >= open_to_all and not served:
            return (f"the open reservations are taken; the last {p.reservations - open_to_all} are kept for "
                    "peers that serve (an advert this relay holds)")
        self.holders[peer] = network
        return None

    def open_circuit(self, dst: str, src: str, network: str) -> str | None:
        """Why a circuit from ``src`` (in ``network``) to ``dst`` is refused, or None (counted)."""
        p = self.policy
        if self.by_network[(dst, network)] >= p.circuits_per_ip:
            return f"{p.circuits_per_ip} circuits to this peer come from {network} already"
        if self.by_key[(dst, src)] >= p.circuits_per_key:
            return f"this source holds {p.circuits_per_key} circuits to this peer already"
        self.by_network[(dst, network)] += 1
        self.by_key[(dst, src)] += 1
        return None

    def close_circuit(self, dst: str, src: str, network: str) -> None:
        for counter, key in ((self.by_network, (dst, network)), (self.by_key, (dst, src))):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]


def relay_limits(policy: RelayPolicy | None = None) -> Any:
    """What a relay gives each reservation and circuit. Token streams are small (a frame of a
    few tokens is ~150 bytes, a request at most 1 MiB), so a circuit may carry 64 MiB and live
    an hour: enough for the longest answer, bounded so one peer cannot turn a volunteer's
    relay into its uplink. go-libp2p's public relays stop at 2 min / 128 KiB because they only
    set up hole punches; these carry answers when punching fails (a symmetric NAT)."""
    from libp2p.relay.circuit_v2.resources import RelayLimits

    policy = policy or RelayPolicy()
    return RelayLimits(duration=3600, data=64 << 20, max_circuit_conns=policy.circuits,
                       max_reservations=policy.reservations, reservation_ttl=3600)


def is_relayed(addr: str) -> bool:
    return CIRCUIT in addr


def relay_part(addr: str) -> str:
    """The relay's own full address in a circuit address."""
    return addr.split(CIRCUIT, 1)[0]


# --- dial-back -----------------------------------------------------------------------------


class _DialbackAsk(msgspec.Struct, array_like=True):
    ports: list[int]


class _DialbackAnswer(msgspec.Struct, array_like=True):
    reachable: bool
    observed: str  # the IP the ask came from, as the answering peer saw it


def _ports(host: Any) -> list[int]:
    ports = []
    for a in host.get_addrs():
        parts = str(a).split("/")
        if "tcp" in parts and not is_relayed(str(a)):
            ports.append(int(parts[parts.index("tcp") + 1]))
    return list(dict.fromkeys(ports))[:DIALBACK_PORTS]


async def _read_all(stream: Any, limit: int = 4096) -> bytes:
    """Everything until the other side closes (py-libp2p signals that by raising StreamEOF)."""
    from libp2p.network.stream.exceptions import StreamEOF

    data = b""
    while len(data) < limit:
        try:
            chunk = await stream.read(limit - len(data))
        except StreamEOF:
            break
        if not chunk:
            break
        data += chunk
    return data


async def handle_dialback(stream: Any) -> None:
    """Answer a dial-back: TCP-connect to the asker's observed IP at the ports it asked for."""
    from .host import finish_stream

    try:
        with trio.fail_after(DIALBACK_S * 2):
            ask = msgspec.msgpack.decode(await _read_all(stream), type=_DialbackAsk)
            remote = stream.get_remote_address()
            ip = remote[0] if remote else ""
            ok = False
            for port in ask.ports[:DIALBACK_PORTS]:
                if not ip or not 0 < port < 65536:
                    break
                with trio.move_on_after(DIALBACK_S):
                    try:
                        conn = await trio.open_tcp_stream(ip, port)
                        await conn.aclose()
                        ok = True
                    except OSError:
                        pass
                if ok:
                    break
            await stream.write(msgspec.msgpack.encode(_DialbackAnswer(ok, ip)))
    except Exception as exc:  # noqa: BLE001 (a malformed or vanished asker: nothing to answer)
        log.debug("dial-back failed: %s", exc)
    finally:
        await finish_stream(stream)


async def _ask_dialback(host: Any, peer: Any, ports: list[int]) -> bool | None:
    from .host import finish_stream

    with trio.move_on_after(DIALBACK_S * 2):
        stream = await host.new_stream(peer, [DIALBACK])
        try:
            await stream.write(msgspec.msgpack.encode(_DialbackAsk(ports)))
            await stream.close()  # half-close: the answer still comes back
            answer = msgspec.msgpack.decode(await _read_all(stream), type=_DialbackAnswer)
            return answer.reachable
        finally:
            await finish_stream(stream, reset=True)
    return None


async def probe_reachability(host: Any, peers: Sequence[Any]) -> str:
    """"public" if a peer could dial us back, "private" if every peer that answered could not,
    "unknown" if none answered (then we act as before: public)."""
    ports = _ports(host)
    if not ports or not peers:
        return "unknown"
    results: list[bool] = []

    async def one(peer: Any) -> None:
        try:
            got = await _ask_dialback(host, peer, ports)
        except Exception as exc:  # noqa: BLE001 (a peer without the protocol, or gone: no vote)
            log.debug("dial-back ask to %s failed: %s", peer, exc)
            return
        if got is not None:
            results.append(got)

    async with trio.open_nursery() as n:
        for peer in list(peers)[:DIALBACK_PEERS]:
            n.start_soon(one, peer)
    if not results:
        return "unknown"
    return "public" if any(results) else "private"


# --- relay service and relayed connections ---------------------------------------------------


def _relay_protocol() -> type:
    """py-libp2p's ``CircuitV2Protocol`` with its byte pump replaced.

    py-libp2p files each circuit's streams under the *peer id* of each end, and a pump that ends
    closes whatever is filed there now: when a requester that had a circuit to a donor left, its
    pump closed the circuit of the next requester of that donor (measured in the NAT lab: 2 of 8
    requester processes in a row lost their answer, "no stream within 5s" or "closed the stream
    before finishing"; tests/test_relay_workarounds.py shows the raw failure). Here a pump closes
    only its own two streams, and still applies the circuit's duration and byte limits."""
    import math
    import time as _time

    from libp2p.network.stream.exceptions import StreamEOF
    from libp2p.peer.id import ID
    from libp2p.relay.circuit_v2.protocol import MAX_READ_LEN, CircuitV2Protocol
    from libp2p.relay.circuit_v2.protocol_buffer import StatusCode

    from .host import finish_stream

    class Protocol(CircuitV2Protocol):
        book: RelayBook
        served: Callable[[str], bool] = staticmethod(lambda peer: False)

        async def _refuse(self, stream: Any, code: Any, why: str) -> None:
            log.debug("relay refused: %s", why)
            await self._send_status(stream, code, why)
            await finish_stream(stream)

        async def _handle_reserve(self, stream: Any, msg: Any) -> None:
            """Only ever for the connected peer (Noise authenticated it), and within the book's
            limits, checked before py-libp2p takes a slot."""
            peer = stream.muxed_conn.peer_id
            if msg.HasField("peer") and msg.peer.id and msg.peer.id != peer.to_bytes():
                await self._refuse(stream, StatusCode.PERMISSION_DENIED, "a peer can only reserve for itself")
                return
            b58 = peer.to_base58()
            why = self.book.reserve(b58, _network_of(stream, self.book.policy), served=self.served(b58),
                                    holds=lambda p: self.resource_manager.has_reservation(ID.from_base58(p)))
            if why is not None:
                await self._refuse(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED, why)
                return
            msg.ClearField("peer")  # py-libp2p then reserves for the connection's own peer
            await super()._handle_reserve(stream, msg)

        async def _handle_connect(self, stream: Any, msg: Any) -> None:
            """A full destination, or one source network or key holding its share of circuits to
            it, is refused as RESOURCE_LIMIT_EXCEEDED (py-libp2p said NO_RESERVATION for both)."""
            try:
                dst = ID(msg.peer.id)
            except Exception:  # noqa: BLE001 (any undecodable id is the sender's error)
                await self._refuse(stream, StatusCode.MALFORMED_MESSAGE, "no valid destination peer id")
                return
            reservation = self.resource_manager.get_reservation(dst)
            if reservation is not None and not reservation.can_accept_connection():
                await self._refuse(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED,
                                   f"all {reservation.limits.max_circuit_conns} circuits to that peer are in use")
                return
            if reservation is None:  # py-libp2p's own answer: NO_RESERVATION
                await super()._handle_connect(stream, msg)
                return
            src, network = stream.muxed_conn.peer_id.to_base58(), _network_of(stream, self.book.policy)
            why = self.book.open_circuit(dst.to_base58(), src, network)
            if why is not None:
                await self._refuse(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED, why)
                return
            try:
                await super()._handle_connect(stream, msg)
            finally:
                self.book.close_circuit(dst.to_base58(), src, network)

        async def _relay_data(self, src_stream: Any, dst_stream: Any, peer_id: Any, deadline: float | None = None,
                              circuit_data_limit: list[int] | None = None) -> None:
            async def pump() -> bool:
                """Copy until the source ends (True) or the circuit's byte budget is spent (False)."""
                while True:
                    try:
                        data = await src_stream.read(MAX_READ_LEN)
                    except StreamEOF:
                        return True
                    if not data:
                        return True
                    if circuit_data_limit is not None:
                        circuit_data_limit[0] -= len(data)
                        if circuit_data_limit[0] < 0:
                            return False
                    with trio.fail_after(FRAME_WRITE_S):
                        await dst_stream.write(data)

            clean = False
            left = deadline - _time.monotonic() if deadline is not None else math.inf
            try:
                with trio.move_on_after(max(0.0, left)):
                    clean = await pump()
            except Exception as exc:  # noqa: BLE001 (either end gone: this circuit ends, nothing else does)
                log.debug("circuit for %s ended: %s", peer_id, exc)
            finally:
                # Only this circuit's streams. A clean end is passed on as one (the other
                # direction finishes by itself); a limit, a timeout or an error resets both.
                await finish_stream(dst_stream, reset=not clean)
                if not clean:
                    await finish_stream(src_stream, reset=True)
                for key, pair in list(self._active_relays.items()):
                    if src_stream in pair or dst_stream in pair:
                        del self._active_relays[key]

    return Protocol


FRAME_WRITE_S = 10.0  # one write of relayed bytes: a destination that takes longer is gone


def _network_of(stream: Any, policy: RelayPolicy) -> str:
    try:
        remote = stream.get_remote_address()
    except Exception:  # noqa: BLE001 (a stream without one: counted together, strictly)
        remote = None
    return source_network(remote[0] if remote else "", policy.v4_prefix, policy.v6_prefix)


@asynccontextmanager
async def circuit_relay(host: Any, *, hop: bool, policy: RelayPolicy | None = None) -> AsyncIterator[Any]:
    """Circuit relay v2 on ``host``: always the stop side (accept relayed connections), and with
    ``hop`` the relay service for others, bounded by ``relay_limits`` and ``policy``. Set the
    returned protocol's ``served`` (peer id -> bool) to keep ``served_share`` for serving peers."""
    from libp2p.tools.anyio_service.context import background_trio_service

    policy = policy or RelayPolicy()
    proto = _relay_protocol()(host, limits=relay_limits(policy), allow_hop=hop)
    proto.book = RelayBook(policy)
    async with background_trio_service(proto):
        await proto.event_started.wait()
        yield proto


@asynccontextmanager
async def hole_punching(host: Any) -> AsyncIterator[Any]:
    """DCUtR (``/libp2p/dcutr``) on ``host``: over a relayed connection both sides exchange the
    addresses the internet sees them at (their NAT's address, their listen port), then dial each
    other at once from their listen ports (a TCP simultaneous open); when it works, new streams
    take the direct connection (py-libp2p prefers direct ones) and the relayed one is closed
    after a grace period. Both sides need a listen port: requesters listen on the address they
    reach the swarm from (``punch_listen``)."""
    from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
    from libp2p.tools.anyio_service.context import background_trio_service

    proto = DCUtRProtocol(host, dial_timeout=int(RESERVE_S) + 2)
    async with background_trio_service(proto):
        yield proto


def punch_listen(bootstrap: Sequence[str]) -> list[str]:
    """Where a requester listens so hole punching can work: a free port on the local address its
    packets to the first IPv4 bootstrap peer leave from (loopback for a swarm on this machine,
    the LAN address at home), never every interface."""
    import socket

    for addr in bootstrap:
        parts = addr.split("/")
        if len(parts) > 2 and parts[1] == "ip4":
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.connect((parts[2], 9))  # no packet is sent: this only asks the routing table
                    return [f"/ip4/{s.getsockname()[0]}/tcp/0"]
            except OSError:
                continue
    return []


async def reserve(host: Any, relay_addr: str) -> int:
    """Reserve a slot on the relay at ``relay_addr`` (a full address); returns when it expires
    (unix time). Raises ``RelayError``."""
    from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, PeerId, Status
    from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID
    from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

    from .host import DialError, connect, finish_stream

    try:
        with trio.fail_after(RESERVE_S):
            relay = await connect(host, relay_addr)
            stream = await host.new_stream(_id(relay), [PROTOCOL_ID])
            try:
                await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE,
                                                             peer=PeerId(id=host.get_id().to_bytes())))
                resp = await read_delimited_msg(stream, HopMessage)
            finally:
                await finish_stream(stream)
    except (trio.TooSlowError, DialError) as exc:
        raise RelayError(f"relay {relay_addr} did not take a reservation: {exc or 'timed out'}") from exc
    except Exception as exc:
        raise RelayError(f"relay {relay_addr} did not take a reservation: {exc}") from exc
    if resp.HasField("status") and resp.status != Status.OK:
        why = {Status.RESOURCE_LIMIT_EXCEEDED: "its limits are reached", Status.PERMISSION_DENIED: "permission denied",
               Status.RESERVATION_REFUSED: "it relays for nobody"}.get(resp.status, "refused")
        raise RelayError(f"relay {relay_addr} refused a reservation (status {resp.status}: {why})")
    return int(resp.reservation.expire) if resp.HasField("reservation") else int(time.time() + 3600)


async def dial_relayed(host: Any, addr: str) -> str:
    """Connect to the peer at a circuit address through its relay; returns the peer id.

    The relay's stream becomes a raw connection that is secured (Noise, checked against the
    peer id in the address) and multiplexed like a TCP one, then registered with the swarm, so
    ``host.new_stream`` uses it."""
    import multiaddr
    from libp2p.connection_types import ConnectionType
    from libp2p.network.connection.raw_connection import RawConnection
    from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, PeerId, Status
    from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID
    from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
    from libp2p.security.pnet.protector import new_protected_conn

    from .host import DialError, connect, finish_stream

    target_b58 = addr.rsplit("/p2p/", 1)[-1]
    target = _id(target_b58)
    relay_addr = relay_part(addr)
    try:
        relay = await connect(host, relay_addr)
    except DialError as exc:
        raise RelayError(f"relay of {target_b58} unreachable: {exc}") from exc
    stream = await host.new_stream(_id(relay), [PROTOCOL_ID])
    try:
        await write_delimited_msg(stream, HopMessage(type=HopMessage.CONNECT, peer=PeerId(id=target.to_bytes())))
        resp = await read_delimited_msg(stream, HopMessage)
        if resp.HasField("status") and resp.status != Status.OK:
            why = {Status.NO_RESERVATION: "it holds no reservation there",
                   Status.RESOURCE_LIMIT_EXCEEDED: "the relay's limits for it are reached",
                   Status.PERMISSION_DENIED: "permission denied"}.get(resp.status, "refused")
            raise RelayError(f"relay {relay} could not connect to {target_b58} (status {resp.status}: {why})")
        circuit = multiaddr.Multiaddr(f"/p2p/{relay}{CIRCUIT}/p2p/{target_b58}")
        raw: Any = RawConnection(stream=stream, initiator=True, connection_type=ConnectionType.RELAYED,
                                 addresses=[circuit])
        network = host.get_network()
        if getattr(network, "psk", None):
            raw = new_protected_conn(raw, network.psk)
        conn = await network.upgrade_outbound_raw_conn(raw, target)
        # Marked as relayed (the generic upgrade calls it direct, at the relay's address): hole
        # punching looks for relayed connections to upgrade, and path_of reports them.
        conn.set_transport_info([circuit], ConnectionType.RELAYED)
    except BaseException:
        await finish_stream(stream, reset=True)
        raise
    return target_b58


def _id(peer_id: str) -> Any:
    from libp2p.peer.id import ID

    return ID.from_base58(peer_id)
