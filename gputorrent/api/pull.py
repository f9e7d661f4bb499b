"""``models pull swarm:MODEL``: a model file fetched from the peers that serve it.

Who holds what comes from the signed adverts: each seeding peer announces, per model, the
Merkle root of its piece list. The root most seeders announce is taken; the piece list is
fetched from one of them and must hash to that root (a peer whose list does not is caught and
the next one asked), and peers announcing another root are not used. Pieces then come from
every seeder of that root at once (``asking/fetch.py``), each checked before it is written, and
the finished file must have the sha256 that is the model id before it takes its final name:
nothing unverified ever does. Should a majority of seeders lie in agreement, that last check
fails, and the next root is tried; so is it when every seeder of a root is dropped (busy,
silent, or caught), and the error at the end names every seeder and why it was not used.

A catalog alias is pulled by the catalog's model id (``models.content_id``): peers announcing
another file under ``smollm2`` are never asked. Another name that peers announce for several
ids fails with the ids and their peer counts (``asking.view.AmbiguousModel``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..dht.records import Advert
from ..errors import GputorrentError
from ..models import CATALOG, content_id
from ..models.catalog import ModelError
from ..models.hub import sha256_file
from ..models.pieces import Manifest

Progress = Callable[[int, int, int], None]  # (bytes done, bytes total, peers sending)


class PullFailed(GputorrentError):
    """No seeding peer could supply a verified copy; the message says why and what to do."""


@dataclass(slots=True)
class SwarmPull:
    path: Path
    model_id: str
    alias: str
    fetched: bool  # False: a verified copy was already here
    size: int = 0
    seconds: float = 0.0  # the whole pull: lookup, piece lists, pieces, checks
    lookup_seconds: float = 0.0  # finding the seeders in the DHT
    pieces_from: dict[str, int] = field(default_factory=dict)  # peer id -> pieces it sent
    caught: dict[str, str] = field(default_factory=dict)  # peer id -> the lie it was caught in
    dropped: dict[str, str] = field(default_factory=dict)  # peer id -> why it stopped being used
    resumed: int = 0  # pieces already on disk from a cut-off pull
    direct: list[str] = field(default_factory=list)  # peers that sent on the direct path (plain TCP)

    def to_dict(self) -> dict[str, Any]:
        return {"alias": self.alias, "path": str(self.path), "model_id": self.model_id, "fetched": self.fetched,
                "verified": True, "size_bytes": self.size, "seconds": round(self.seconds, 2),
                "lookup_seconds": round(self.lookup_seconds, 2),
                "peers": len(self.pieces_from), "pieces_from": self.pieces_from, "caught": self.caught,
                "dropped": self.dropped, "resumed_pieces": self.resumed, "direct": self.direct}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SwarmPull:
        """The pull ``to_dict`` wrote (the agent pulled for a client)."""
        return cls(Path(d["path"]), d["model_id"], d["alias"], bool(d["fetched"]), size=d.get("size_bytes", 0),
                   seconds=d.get("seconds", 0.0), lookup_seconds=d.get("lookup_seconds", 0.0),
                   pieces_from=d.get("pieces_from") or {}, caught=d.get("caught") or {},
                   dropped=d.get("dropped") or {}, resumed=d.get("resumed_pieces", 0), direct=d.get("direct") or [])


def destination(models_dir: Path, model_id: str, alias: str) -> tuple[Path, str]:
    """Where a pulled file goes and the alias it gets: a catalog model's usual file (so
    ``serve --model smollm2`` finds it), else ``ALIAS.gguf`` under a name ``models add`` accepts."""
    from ..models.local import check_alias

    for entry in CATALOG.values():
        if entry.sha256 == model_id:
            return models_dir / entry.filename, entry.alias
    try:
        name = check_alias(alias)
    except ModelError:
        name = f"model-{model_id[:12]}"
    return models_dir / f"{name}.gguf", name


def choose_model(adverts: list[Advert], spec: str) -> tuple[str, str, list[Advert]]:
    """(model id, alias, adverts of its seeders) for ``spec``: of the files the spec names, the
    one the most peers seed."""
    by_id: dict[str, list[Advert]] = {}
    alias: dict[str, str] = {}
    for ad in adverts:
        m = ad.serves(spec)
        if m is not None and m.whole and m.seed_root and ad.addrs:
            by_id.setdefault(m.model_id, []).append(ad)
            alias.setdefault(m.model_id, m.alias)
    if not by_id:
        serving = [ad for ad in adverts if ad.serves(spec)]
        if serving:
            raise PullFailed(f"{len(serving)} peer(s) serve {spec!r} but none seeds its file (they run with "
                             "--no-seed, serve only a shard, or are behind NAT without a relay address)")
        raise PullFailed(f"no peer in the swarm serves {spec!r}; see what it has with: gputorrent models list --swarm")
    model_id = max(by_id, key=lambda k: len(by_id[k]))
    return model_id, alias[model_id], by_id[model_id]


async def pull_from_swarm(core: Any, spec: str, models_dir: Path, *, progress: Progress | None = None) -> SwarmPull:
    """Fetch the model ``spec`` names (alias or model id) from its seeders into ``models_dir``."""
    import trio

    from ..asking.fetch import FetchError, FetchReport, Source, fetch_file
    from ..models.gguf_info import remember_model_id

    started = trio.current_time()
    spec = content_id(spec)
    model_id, alias, seeders = choose_model(await core.view.find(spec), spec)
    looked_up = trio.current_time() - started
    dest, alias = destination(models_dir, model_id, alias)
    result = SwarmPull(dest, model_id, alias, fetched=False)
    if dest.is_file() and await trio.to_thread.run_sync(sha256_file, dest) == model_id:
        result.size = dest.stat().st_size
        return result
    models_dir.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    groups: dict[str, list[Advert]] = {}
    for ad in seeders:
        groups.setdefault(ad.serves(model_id).seed_root, []).append(ad)  # type: ignore[union-attr]
    for root, group in sorted(groups.items(), key=lambda g: -len(g[1])):
        manifests = await _manifests(core, group, model_id, root, result)
        if not manifests:
            continue
        manifest = manifests[0][1]
        sources = [Source(ad.peer_id, ad.addrs) for ad, _ in manifests]
        for ad in seeders:  # the rest announce another list: not used while this one holds
            if ad not in group:
                result.dropped.setdefault(ad.peer_id, "announced another piece list than most seeders")
        report = FetchReport()
        try:
            await fetch_file(core.host, sources, model_id, manifest, part, progress, report=report)
        except FetchError:  # every seeder of this root was dropped: the next root
            _note(core, report, result)  # pieces in ``part`` are checked again against the next list
            continue
        _note(core, report, result)
        result.pieces_from, result.resumed = report.pieces_from, report.resumed
        result.direct = sorted(report.direct & set(report.pieces_from))
        if report.sha256 != model_id:  # hashed as the pieces were written (asking/fetch.py)
            part.unlink(missing_ok=True)  # every piece matched a list that was itself a lie
            for ad in group:
                _blame(core, ad.peer_id, "its piece list builds a file that is not the model", result)
            continue
        os.replace(part, dest)
        remember_model_id(dest, core.settings.cache_dir, model_id)
        if not any(e.sha256 == model_id for e in CATALOG.values()):
            from ..models.local import add_alias

            add_alias(models_dir, alias, dest, model_id)
        result.fetched, result.size, result.seconds = True, manifest.size, trio.current_time() - started
        result.lookup_seconds = looked_up
        return result
    raise PullFailed(f"no seeder of {spec!r} could supply a verified copy ({_reasons(result)}); the pieces "
                     "that checked out are kept for the next try: try again later, or pull it from a hub")


async def _manifests(core: Any, group: list[Advert], model_id: str, root: str,
                     result: SwarmPull) -> list[tuple[Advert, Manifest]]:
    """The piece list of every seeder in ``group``, asked at once (a few KB each); those whose
    list does not hash to ``root``, the root they all announce, are caught and left out."""
    import trio

    from ..asking.fetch import Source, fetch_manifest

    got: list[tuple[Advert, Manifest]] = []

    async def one(ad: Advert) -> None:
        try:
            manifest = await fetch_manifest(core.host, Source(ad.peer_id, ad.addrs), model_id)
        except Exception as exc:  # noqa: BLE001 (one seeder failing: the others still count)
            result.dropped[ad.peer_id] = f"no piece list: {type(exc).__name__}: {exc}"[:200]
            return
        if manifest.well_formed() and manifest.root == root:
            got.append((ad, manifest))
        else:
            _blame(core, ad.peer_id, "sent a piece list that does not match the root it announces", result)

    async with trio.open_nursery() as n:
        for ad in group:
            n.start_soon(one, ad)
    return got


def _note(core: Any, report: Any, result: SwarmPull) -> None:
    for pid, why in report.caught.items():
        _blame(core, pid, why, result)
    result.dropped |= {p: r for p, r in report.dropped.items() if p not in result.caught}


def _blame(core: Any, peer_id: str, why: str, result: SwarmPull) -> None:
    result.caught[peer_id] = why
    result.dropped.pop(peer_id, None)
    if core.store is not None:
        core.store.record(peer_id, "integrity")


def _reasons(result: SwarmPull) -> str:
    why = {**result.dropped, **result.caught}
    return "; ".join(f"{p[-8:]}: {r}" for p, r in why.items()) or "none answered"
