"""Pulling a GGUF from Hugging Face (``hf://OWNER/REPO/FILE.gguf``) or any ``https://`` URL.

Through ``huggingface_hub``: it honours ``HF_ENDPOINT`` and ``HF_TOKEN``, resumes a partial
download (``FILE.gguf.part`` is kept when a pull is cut off) and shows a progress bar. The
file is checked against the sha256 the hub publishes for it (its LFS ETag), or ``--sha256``;
where neither exists the pull says it could not verify. The result is hashed into a model id
like any local file, so peers never have to trust a name.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .catalog import ModelError

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class Pulled:
    path: Path
    fetched: bool  # False: it was already here, complete and verified
    sha256: str
    verified: bool  # the digest matched one the source published (or --sha256)


def is_remote(spec: str) -> bool:
    return spec.startswith(("hf://", "https://", "http://"))


def remote_url(spec: str) -> tuple[str, str]:
    """(URL, file name) of ``hf://OWNER/REPO/FILE.gguf[@REVISION]`` or a URL."""
    from huggingface_hub import hf_hub_url

    if spec.startswith("hf://"):
        body, _, revision = spec.removeprefix("hf://").partition("@")
        parts = body.strip("/").split("/")
        if len(parts) < 3 or not parts[-1].lower().endswith(".gguf"):
            raise ModelError(f"{spec!r}: give hf://OWNER/REPO/FILE.gguf (optionally @REVISION), "
                             "e.g. hf://bartowski/Llama-3.2-1B-Instruct-GGUF/Llama-3.2-1B-Instruct-Q4_K_M.gguf")
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
        return hf_hub_url(repo, filename, revision=revision or None), Path(filename).name
    name = Path(spec.split("?", 1)[0]).name
    if not name.lower().endswith(".gguf"):
        raise ModelError(f"{spec!r} does not name a .gguf file; gputorrent serves GGUF models")
    return spec, name


def pull_remote(spec: str, models_dir: Path, *, sha256: str | None = None, quiet: bool = False) -> Pulled:
    """Fetch (or resume) the GGUF ``spec`` names into ``models_dir`` and verify it."""
    import huggingface_hub
    from huggingface_hub import get_hf_file_metadata
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get

    if sha256 is not None and not _SHA256.match(sha256.lower()):
        raise ModelError("--sha256 must be 64 hex digits")
    url, name = remote_url(spec)
    try:
        meta = get_hf_file_metadata(url, retry_on_errors=True)
    except HfHubHTTPError as exc:
        raise ModelError(f"cannot fetch {spec}: {exc}".splitlines()[0]) from exc
    except Exception as exc:  # httpx connection errors and the like: say where and why
        raise ModelError(f"cannot reach {url} ({type(exc).__name__}: {exc}); check the address, your network, "
                         "or HF_ENDPOINT") from exc
    published = (meta.etag or "").lower()
    expected = (sha256 or "").lower() or (published if _SHA256.match(published) else "")
    dest = models_dir / name
    if dest.is_file() and (meta.size is None or dest.stat().st_size == meta.size):
        digest = sha256_file(dest)
        if not expected or digest == expected:
            return Pulled(dest, False, digest, bool(expected))
    models_dir.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if quiet:
        huggingface_hub.utils.disable_progress_bars()
    try:
        with open(part, "ab") as f:
            resume = f.tell()
            if meta.size is not None and resume > meta.size:
                f.truncate(0)
                resume = 0
            http_get(meta.location, f, resume_size=resume, expected_size=meta.size, displayed_filename=name)
    except HfHubHTTPError as exc:
        raise ModelError(f"download of {spec} failed: {exc}".splitlines()[0]) from exc
    except OSError as exc:
        raise ModelError(f"download of {spec} failed ({exc}); run the pull again to resume") from exc
    digest = sha256_file(part)
    if expected and digest != expected:
        part.unlink(missing_ok=True)
        raise ModelError(f"checksum mismatch for {name} (got {digest[:16]}…, expected {expected[:16]}…); "
                         "the download is corrupt or not the file published; run the pull again")
    os.replace(part, dest)
    return Pulled(dest, True, digest, bool(expected))


def sha256_file(path: Path) -> str:
    """The file's sha256, hex (read in 4 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            digest.update(chunk)
    return digest.hexdigest()
