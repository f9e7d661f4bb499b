"""A py-libp2p host with the workarounds DESIGN.md §3 measured for 0.8.1.

- ``max_connections_per_peer=1``: otherwise every dial waits 250 ms.
- py-libp2p logs clean ends of DHT streams as errors; those loggers are quieted.
- ``import libp2p`` costs ~0.8 s, so this module imports it only inside functions.
- The auto-connector (dial known peers up to ~150 connections) is switched off.
- A failed dial is retried once after 50 ms, not three times with backoff.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from .. import trace
from ..errors import GputorrentError
from ..identity import Identity

RELAYED_DIAL_S = 5.0  # a dial through a relay: the relay's own dial, then Noise and yamux end to end
MAX_DIAL_ADDRS = 8  # addresses tried per peer: an advert listing hundreds costs no more


def _ip(addr: str) -> Any:
    """The IP of an /ip4 or /ip6 multiaddr; None for other forms (dns...); False if malformed."""
    import ipaddress

    parts = addr.split("/")
    if len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
        return None
    try:
        return ipaddress.ip_address(parts[2])
    except ValueError:
        return False


def dialable(addr: str) -> bool:
    """Whether an advertised address may be dialed: never an unspecified (0.0.0.0, ::),
    multicast, broadcast, link-local or reserved IP, which an advert could use to point
    requesters at something that is not a peer. Loopback and private ranges stay: a swarm on
    one machine or a LAN uses them."""
    import ipaddress

    ip = _ip(addr)
    if ip is None:
        return True  # dns and other forms: resolved and checked by the transport
    if ip is False:
        return False
    return not (ip.is_unspecified or ip.is_multicast or ip.is_link_local or ip.is_reserved
                or (ip.version == 4 and ip == ipaddress.IPv4Address("255.255.255.255")))


def scope_of(addr: str) -> str:
    """Where an address lives: "loopback", "private" (RFC 1918, CGNAT, IPv6 ULA) or "public"
    (names and anything else)."""

    ip = _ip(addr)
    if ip is None or ip is False:
        return "public"
    if ip.is_loopback:
        return "loopback"
    # What is private on a real network: RFC 1918, CGNAT, IPv6 ULA. Not Python's is_private,
    # which also counts the documentation ranges (TEST-NET-1/2/3), never seen on the internet:
    # the NAT lab's "internet" is TEST-NET-2, and a requester joined there must act as one
    # joined through a public address would (never dial another network's LAN address).
    return "private" if any(ip in net for net in _PRIVATE_NETS if net.version == ip.version) else "public"


def _private_nets() -> tuple:
    import ipaddress

    return tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
                                                   "fc00::/7"))


_PRIVATE_NETS = _private_nets()


def reachable_from(addr: str, scope: str) -> bool:
    """Whether a requester that joined the swarm through an address of ``scope`` should dial
    ``addr``: a requester on the internet never dials an advert's private or loopback address
    (an advert could aim it at its own LAN or its own machine); one on a LAN dials public and
    private ones; one on loopback, everything."""
    order = {"public": 0, "private": 1, "loopback": 2}
    return dialable(addr) and order[scope_of(addr)] <= order.get(scope, 2)


def direct_ip(addrs: Sequence[str]) -> str | None:
    """The IP of the first TCP address that is the peer's own (not a relay circuit)."""
    for addr in addrs:
        parts = addr.strip("/").split("/")
        if "p2p-circuit" not in parts and len(parts) >= 4 and parts[0] in ("ip4", "ip6") and parts[2] == "tcp":
            return parts[1]
    return None


class DialError(GputorrentError):
    """A peer address that cannot be parsed or reached; the message says which."""


def quiet_libp2p_logs() -> None:
    for name in ("libp2p", "multiaddr", "async_service", "libp2p.kad_dht"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def parse_peer_addr(addr: str) -> Any:
    """A ``PeerInfo`` from a full multiaddr ending in ``/p2p/<peer id>``."""
    import multiaddr
    from libp2p.peer.peerinfo import info_from_p2p_addr

    try:
        return info_from_p2p_addr(multiaddr.Multiaddr(addr))
    except Exception as exc:
        raise DialError(
            f"{addr!r} is not a peer address; expected /ip4/HOST/tcp/PORT/p2p/PEER_ID "
            "(a serve process prints it, and writes it to its --ready-file)"
        ) from exc


@asynccontextmanager
async def running_host(identity: Identity, listen: Sequence[str] = (), *, mdns: bool = False,
                       psk: str | None = None) -> AsyncIterator[Any]:
    """A started libp2p host for ``identity``; listens on ``listen`` (none: dial only).
    ``mdns`` finds peers on the LAN (it joins a multicast group: off in tests); ``psk`` (a
    swarm key, 64 hex digits) makes it a member of a private swarm only."""
    import multiaddr
    from libp2p import new_host
    from libp2p.network.config import ConnectionConfig

    quiet_libp2p_logs()
    addrs = [multiaddr.Multiaddr(a) for a in listen]
    try:
        host = new_host(
            key_pair=identity.libp2p_key_pair(),
            listen_addrs=addrs or None,
            connection_config=ConnectionConfig(max_connections_per_peer=1),
            enable_mDNS=mdns,
            psk=psk,
        )
    except Exception as exc:
        raise DialError(f"cannot create a libp2p host: {exc}") from exc
    _no_auto_dial(host)
    _fail_fast(host)
    _atomic_frame_writes()
    _pipelined_multiselect()
    try:
        async with host.run(addrs):
            try:
                yield host
            finally:
                with trio.CancelScope(shield=True):  # bounded, also when the body was cancelled
                    await drop_connections(host)
                    await _close_listeners(host)
    except BaseExceptionGroup as group:
        # host.run() runs our body inside its own nursery, which wraps whatever the body
        # raised; hand the caller back its own exception.
        raise _single(group) from None


async def _close_listeners(host: Any, timeout: float = 0.5) -> None:
    """Stop accepting connections. py-libp2p 0.8.1 runs each TCP listener as a trio system
    task that leaving ``host.run`` does not stop: a stopped host went on accepting dials and
    answering identify and ping, so a stopped peer still looked alive to every DHT walk
    that met it (a requester spent 7 s per made-up provider walking through them).

    Bounded: ``close`` shuts the sockets at once, then waits for the listener's task, whose
    connection handlers may sit in shielded writes; unbounded, a serve stopping under load
    waited past its SIGKILL and never logged "stopped" (CI, test_cli's JSON log)."""
    with trio.move_on_after(timeout):
        for listener in list(host.get_network().listeners.values()):
            try:
                await listener.close()
            except Exception:  # noqa: BLE001, S110 (a listener that failed to close has nothing left to stop)
                pass


CLOSE_S = 0.5  # closing a host: every connection's goodbye together, then the rest are cut


async def drop_connections(host: Any, timeout: float = CLOSE_S) -> None:
    """Close every connection of ``host`` at once, for at most ``timeout``; any still closing
    then has its socket cut. py-libp2p closes them one after another, each waiting for its
    GoAway frame to be written (our writes are shielded up to ``FRAME_WRITE_S``): on a busy
    machine a requester took 13-19 s to exit after its answer was complete."""
    conns = [c for cs in list(host.get_network().connections.values()) for c in list(cs)]
    for c in conns:
        c.muxed_conn._gt_discard = True  # frame writes stop being shielded: the nonce no longer matters

    async def close(conn: Any) -> None:
        try:
            await conn.close()
        except Exception:  # noqa: BLE001, S110 (a connection already gone is closed enough)
            pass

    with trio.move_on_after(timeout):
        async with trio.open_nursery() as n:
            for c in conns:
                n.start_soon(close, c)
    for c in conns:
        _cut(c)


def _cut(conn: Any) -> None:
    """Close the TCP socket under a connection, whatever its layers are doing (a relayed
    connection has no socket of its own: its relay connection is cut instead)."""
    seen: set[int] = set()
    todo = [conn]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or len(seen) > 32:
            continue
        seen.add(id(obj))
        if isinstance(obj, trio.SocketStream):
            try:
                obj.socket.close()
            except OSError:
                pass
            return
        for name in ("muxed_conn", "secured_conn", "conn", "read_writer", "read_write_closer", "stream", "wrapped"):
            child = getattr(obj, name, None)
            if child is not None:
                todo.append(child)


def _single(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _no_auto_dial(host: Any) -> None:
    """py-libp2p's auto-connector dials every known peer until it holds ~150 connections.
    A requester or a serving peer needs connections only to the peers it talks to; the DHT
    dials what its lookups need."""

    async def nothing() -> None:
        return None

    host.get_network().auto_connector.maybe_connect = nothing


def _fail_fast(host: Any) -> None:
    """One quick retry of a failed dial, not three with backoff: a DHT lookup that meets a
    dead peer moves on (measured: a killed peer cost each lookup ~1.5 s with the default)."""
    from libp2p.network.config import RetryConfig

    host.get_network().retry_config = RetryConfig(max_retries=1, initial_delay=0.05, max_delay=0.5)


FRAME_WRITE_S = 10.0


def _atomic_frame_writes() -> None:
    """Every yamux frame is written whole, whatever cancels the task writing it.

    py-libp2p's Noise layer advances its nonce when it encrypts and then writes; a write
    cancelled in between (a ping cut off by ranking's deadline, a DHT query past its 1 s) left
    the nonces out of step and the other side failed the next message ("Failed authentication
    of message") and dropped the connection, with every stream on it: measured as a chain hop
    lost every 5 to 17 answers while the requester's view refreshed over the same connection.
    Frames are small and serialized by yamux's own lock, so shielding costs nothing; a socket
    that takes ``FRAME_WRITE_S`` for one frame is broken and the write fails."""
    from libp2p.stream_muxer.yamux.yamux import Yamux

    original = Yamux._write_frame
    if getattr(original, "_gputorrent_atomic", False):
        return

    async def write_frame(self: Any, data: bytes) -> None:
        if getattr(self, "_gt_discard", False):  # being dropped: out of step no longer matters
            return await original(self, data)
        with trio.CancelScope(shield=True, deadline=trio.current_time() + FRAME_WRITE_S) as scope:
            await original(self, data)
        if scope.cancelled_caught:
            raise ConnectionError(f"a {len(data)}-byte frame could not be written in {FRAME_WRITE_S:g}s")

    write_frame._gputorrent_atomic = True  # type: ignore[attr-defined]
    Yamux._write_frame = write_frame  # type: ignore[method-assign]


def _pipelined_multiselect() -> None:
    """One round trip per protocol negotiation, not two.

    py-libp2p's multistream-select client writes its header, waits for the other side's, and
    only then proposes a protocol: two round trips before every stream's first byte and for each
    of a dial's two negotiations (security, muxer). Traced across a 30 ms link, every new stream
    cost 2.1 round trips before its request. The header and the first proposal now go in one
    write, as go-libp2p sends them; the replies are read in order, and a refused first proposal
    falls back to proposing the others one by one. Every implementation reads a proposal only
    after the header, so a peer that echoes the header first sees no difference."""
    from libp2p.protocol_muxer import multiselect_client as ms
    from libp2p.utils import encode_delim

    original = ms.MultiselectClient.select_one_of
    if getattr(original, "_gputorrent_pipelined", False):
        return

    async def select_one_of(self: Any, protocols: Sequence[Any], communicator: Any,
                            negotiate_timeout: int = ms.DEFAULT_NEGOTIATE_TIMEOUT) -> Any:
        protocols = list(protocols)
        writer = getattr(communicator, "read_writer", None)
        if not protocols or writer is None or protocols[0] is None:
            return await original(self, protocols, communicator, negotiate_timeout)
        first = protocols[0]
        with trio.move_on_after(negotiate_timeout):
            flight = encode_delim(ms.MULTISELECT_PROTOCOL_ID.encode()) + encode_delim(str(first).encode())
            try:
                await writer.write(flight)
            except Exception as exc:  # as py-libp2p's own write: any I/O failure is a failed negotiation
                raise ms.MultiselectClientError(f"handshake write failed: {exc}") from exc
            try:
                header = await communicator.read()
                response = await communicator.read() if ms.is_valid_handshake(header) else ""
            except ms.MultiselectCommunicatorError as exc:
                raise ms.MultiselectClientError(f"handshake read failed: {exc}") from exc
            if not ms.is_valid_handshake(header):
                raise ms.MultiselectClientError(f"multiselect protocol ID mismatch: got {header!r}")
            if response == first:
                return first
            if response != ms.PROTOCOL_NOT_FOUND_MSG:
                raise ms.MultiselectClientError(f"unrecognized response: {response!r}, expected {first!r} or 'na'")
            refused = [f"protocol not supported: {first}"]
            for protocol in protocols[1:]:
                try:
                    return await self.try_select(communicator, protocol)
                except ms.ProtocolNotSupportedError as exc:
                    refused.append(str(exc))
            raise ms.MultiselectClientError(f"protocols not supported: tried {protocols}. Last error: {refused[-1]}")
        raise ms.MultiselectClientError(f"response timed out after {negotiate_timeout}s, protocols tried: {protocols}")

    select_one_of._gputorrent_pipelined = True  # type: ignore[attr-defined]
    ms.MultiselectClient.select_one_of = select_one_of  # type: ignore[method-assign]


def full_addrs(host: Any) -> list[str]:
    """The host's listen addresses, each ending in ``/p2p/<peer id>``."""
    return [str(a) for a in host.get_addrs()]


async def connect(host: Any, addr: str | Sequence[str]) -> str:
    """Dial a peer by its full multiaddr, or by all of them in order (an advert lists every
    address a peer listens on: LAN, public); returns the remote peer id (base58).

    Each address is dialed on its own. Left to itself py-libp2p 0.8.1 dials one address per
    transport (the first TCP address it ever heard of for the peer, even a stale one from
    before a restart), and after a failure refuses every dial to that peer for 60 s (its
    negative cache), however fresh the address. Measured in test_dht_workarounds.py.
    """
    from .relay import RelayError, dial_relayed, is_relayed

    given = [addr] if isinstance(addr, str) else list(addr)
    usable = [a for a in given if dialable(a)]
    # Direct addresses first, relayed ones (through a relay, for a peer behind NAT) after.
    addrs = ([a for a in usable if not is_relayed(a)] + [a for a in usable if is_relayed(a)])[:MAX_DIAL_ADDRS]
    if not addrs:
        raise DialError(f"no address to dial ({', '.join(given[:3]) or 'none given'}: unspecified, multicast, "
                        "link-local or reserved addresses are never dialed)" if given else "no address to dial")
    infos = [_target_of(a) for a in addrs]
    peer = infos[0].peer_id
    if any(i.peer_id != peer for i in infos):
        raise DialError(f"these addresses name different peers: {', '.join(addrs)}")
    network = host.get_network()
    if network.connections.get(peer):
        if network._filter_valid_connections(network.get_connections(peer)):
            if not is_relayed(_paths(host).get(peer.to_base58(), "")) or _paths(host)[peer.to_base58()] in addrs:
                await host.connect(infos[0])  # already connected: waits until it is ready
                return peer.to_base58()
            # Connected through a relay the caller no longer offers (it failed): a new path.
            await _disconnect(host, peer)
        # Only closed connections left (the other side went away): py-libp2p would keep
        # answering "no valid connections" without dialing again.
        network.connections.pop(peer, None)
    errors = []
    for a, info in zip(addrs, infos, strict=False):
        if is_relayed(a):
            try:
                with trio.fail_after(RELAYED_DIAL_S), trace.span("dial relayed", peer=a[-8:]):
                    got = await dial_relayed(host, a)
                _paths(host)[got] = a
                return got
            except (RelayError, DialError, trio.TooSlowError) as exc:
                errors.append(f"{a}: {exc or 'timed out'}")
                continue
            except Exception as exc:  # noqa: BLE001 (py-libp2p raises any type for a failed upgrade; the next address is tried)
                errors.append(f"{a}: {exc or type(exc).__name__}")
                continue
        host.get_peerstore().clear_addrs(peer)
        network.unblock_peer(peer)
        try:
            with trace.span("dial", peer=peer.to_base58()[-8:], addr=a.split("/p2p/")[0]):
                await host.connect(info)
            _paths(host)[peer.to_base58()] = a
            return peer.to_base58()
        except Exception as exc:  # noqa: BLE001 (py-libp2p raises any type for a failed dial; the next address is tried)
            errors.append(f"{a}: {exc or type(exc).__name__}")
    raise DialError(f"cannot reach peer {peer.to_base58()} ({'; '.join(errors)}); is it running?")


def _paths(host: Any) -> dict[str, str]:
    """The address each peer was last dialed at by ``connect``, kept on the host."""
    paths = getattr(host, "_gt_paths", None)
    if paths is None:
        paths = host._gt_paths = {}
    return paths


def path_of(host: Any, peer_id: str) -> str:
    """How this host reaches a peer now: "relayed" (through a relay), "hole-punched" (dialed
    through a relay, then a direct connection made by DCUtR, which new streams take), "direct",
    or "" when not connected."""
    from libp2p.peer.id import ID

    conns = host.get_network().get_connections(ID.from_base58(peer_id))
    if not conns:
        return ""
    from libp2p.connection_types import ConnectionType

    from .relay import is_relayed

    relayed = is_relayed(_paths(host).get(peer_id, ""))
    direct = any(getattr(c, "get_connection_type", lambda: None)() == ConnectionType.DIRECT for c in conns)
    if relayed and direct:
        return "hole-punched"  # dialed through a relay, then upgraded to a direct connection
    return "relayed" if relayed else "direct"


def is_relayed_stream(stream: Any) -> bool:
    """Whether a stream runs over a relayed connection (either side: py-libp2p marks inbound
    circuits, ``relay.dial_relayed`` outbound ones)."""
    from libp2p.connection_types import ConnectionType

    conn = getattr(stream, "swarm_conn", None)
    return conn is not None and getattr(conn, "get_connection_type", lambda: None)() == ConnectionType.RELAYED


def dialed_addr(host: Any, peer_id: str) -> str:
    """The address ``connect`` last reached ``peer_id`` at ("" if none)."""
    return _paths(host).get(peer_id, "")


def _target_of(addr: str) -> Any:
    """The ``PeerInfo`` of the peer an address reaches: for a circuit address
    (``<relay>/p2p-circuit/p2p/<peer>``) the peer behind the relay, not the relay."""
    from .relay import is_relayed

    if not is_relayed(addr):
        return parse_peer_addr(addr)
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import PeerInfo

    parse_peer_addr(addr.split("/p2p-circuit", 1)[0])  # the relay's part must be a full address too
    try:
        return PeerInfo(ID.from_base58(addr.rsplit("/p2p/", 1)[1]), [])
    except Exception as exc:
        raise DialError(f"{addr!r} is not a relayed peer address; expected <relay address>/p2p-circuit/p2p/PEER_ID"
                        ) from exc


async def new_stream(host: Any, peer_id: str, protocols: Sequence[str], first: bytes = b"") -> Any:
    """``host.new_stream``, once more on a fresh connection if the one held is dead.

    py-libp2p keeps a connection the other side has already dropped (TCP reset) and answers
    every stream on it with "Failed to send SYN ... Broken pipe" instead of dialing again;
    measured when a requester's lookups and its ping raced to one peer.

    ``first``, the request, goes out with the negotiation itself for a single protocol: no round
    trip before the request (go-libp2p's lazy negotiation). The replies to the negotiation are
    read before the stream's first read, and a refusal fails that read."""
    from libp2p.peer.id import ID

    pid = ID.from_base58(peer_id)
    open_one = (lambda: _lazy_stream(host, pid, protocols[0], first)) if first and len(protocols) == 1 else \
        (lambda: _negotiated(host, pid, protocols, first))
    try:
        with trace.span("new stream", peer=peer_id[-8:], protocol=protocols[0], lazy=bool(first)):
            return await open_one()
    except Exception as exc:
        if not _connection_dead(host, pid, exc):
            raise  # e.g. a protocol negotiation that timed out: other streams on it are fine
        await _disconnect(host, pid)
        host.get_network().connections.pop(pid, None)
        return await open_one()


async def _negotiated(host: Any, pid: Any, protocols: Sequence[str], first: bytes) -> Any:
    stream = await host.new_stream(pid, list(protocols))
    if first:
        await stream.write(first)
    return stream


async def _lazy_stream(host: Any, pid: Any, protocol: str, first: bytes) -> Any:
    from libp2p.protocol_muxer import multiselect_client as ms
    from libp2p.utils import encode_delim

    stream = await host.get_network().new_stream(pid)
    try:
        await stream.write(encode_delim(ms.MULTISELECT_PROTOCOL_ID.encode()) + encode_delim(protocol.encode()) + first)
    except BaseException:
        with trio.CancelScope(shield=True):
            await stream.reset()
        raise
    stream.set_protocol(protocol)
    return LazyStream(stream, protocol)


class LazyStream:
    """A stream whose negotiation was sent with its request: the replies (the multistream header,
    then the protocol, or "na") are read before the first read returns anything."""

    def __init__(self, stream: Any, protocol: str) -> None:
        self._stream = stream
        self._protocol = protocol
        self._agreed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def read(self, n: int | None = None) -> bytes:
        if not self._agreed:
            await self._agree()
        return await self._stream.read(n)

    async def _agree(self) -> None:
        from libp2p.protocol_muxer import multiselect_client as ms
        from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator

        talk = MultiselectCommunicator(self._stream)
        header = await talk.read()
        if header != ms.MULTISELECT_PROTOCOL_ID:
            raise ConnectionError(f"not a multistream reply: {header[:40]!r}")
        said = await talk.read()
        if said != self._protocol:
            raise ConnectionError(f"the peer does not speak {self._protocol}" if said == ms.PROTOCOL_NOT_FOUND_MSG
                                  else f"unexpected reply to {self._protocol}: {said[:40]!r}")
        self._agreed = True

    async def write(self, data: bytes) -> None:
        await self._stream.write(data)


async def _disconnect(host: Any, pid: Any) -> None:
    """Drop the connection to ``pid``, even while the caller is being cancelled, for at most 1 s;
    one already gone is no error."""
    with trio.move_on_after(1) as cleanup:
        cleanup.shield = True
        try:
            await host.disconnect(pid)
        except Exception:  # noqa: BLE001, S110 (already gone: all the better)
            pass


def _connection_dead(host: Any, pid: Any, exc: BaseException) -> bool:
    """Whether a failed stream open means the connection is gone. Only then may it be dropped:
    other streams share it (a chain's hop, an answer), and a ping whose negotiation timed out on
    a loaded machine once tore down the answer streaming beside it."""
    if "SYN" in str(exc):
        return True
    conns = host.get_network().get_connections(pid)
    return all(c.is_closed or getattr(c.muxed_conn, "is_closed", False) for c in conns)


def remote_peer_id(stream: Any) -> str:
    """The peer id (base58) at the other end of a libp2p stream ("" if it has none)."""
    try:
        return stream.muxed_conn.peer_id.to_base58()
    except AttributeError:
        return ""


async def finish_stream(stream: Any, *, reset: bool = False, timeout: float = 1.0) -> None:
    """Close (or reset) a stream even while the caller is being cancelled, for at most
    ``timeout``; a stream the other side already dropped is no error here."""
    with trio.move_on_after(timeout) as scope:
        scope.shield = True
        try:
            await (stream.reset() if reset else stream.close())
        except Exception:  # noqa: BLE001, S110 (closing a stream the other side may have reset is best effort)
            pass
