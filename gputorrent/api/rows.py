"""How a peer reads in a table: one formatting for ``gputorrent peers`` and the TUI."""

from __future__ import annotations

from ..identity import short_id
from .swarm import PeerStatus

COLUMNS = ("peer", "name", "device", "VRAM MB", "models", "load", "tok/s", "RTT ms", "reach", "rep", "got/gave tok",
           "breaker")


def device(status: PeerStatus) -> str:
    """Short enough for a column: the GPU's model, or the CPU's core count."""
    d = status.advert.device
    if d.kind == "gpu":
        return d.name.replace("NVIDIA ", "").replace("GeForce ", "")[:22]
    return f"CPU, {d.cores} cores"


def vram(status: PeerStatus) -> str:
    d = status.advert.device
    return f"{d.vram_free_mb}/{d.vram_total_mb}" if d.kind == "gpu" else "-"


def reach(status: PeerStatus) -> str:
    """How the peer is reached: the connection this requester holds (direct, relayed,
    hole-punched), else what its advert allows (relayed: behind NAT; none: no address at all)."""
    if status.path:
        return status.path
    addrs = status.advert.addrs
    if not addrs:
        return "none"
    return "relayed" if all("/p2p-circuit" in a for a in addrs) else "direct"


def breaker(status: PeerStatus) -> str:
    return status.breaker + (" (banned)" if status.banned else "")


def cells(status: PeerStatus) -> dict[str, str]:
    """One row, by column name (see ``COLUMNS``); each view picks the columns it has room for."""
    a = status.advert
    return {"peer": short_id(a.peer_id), "name": a.name[:14], "device": device(status), "VRAM MB": vram(status),
            "models": ",".join(m.alias if m.whole else f"{m.alias}[{m.blocks}]" for m in a.models),
            "load": f"{a.load.active}/{a.load.slots}+{a.load.queued}",
            "tok/s": f"{a.tokens_per_s:.0f}", "RTT ms": "-" if status.rtt_ms is None else f"{status.rtt_ms:.0f}",
            "reach": reach(status),
            "rep": f"{status.reputation:.2f}", "got/gave tok": f"{status.got:.0f}/{status.gave:.0f}",
            "breaker": breaker(status)}
