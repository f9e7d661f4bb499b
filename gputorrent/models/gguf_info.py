"""What a GGUF file is: its metadata, and its model id (a content hash).

The model id is the sha256 of the file's bytes, so two peers agree on "the same model" without
trusting each other's names; failover only resumes on the same id. Hashing 100 MB takes a
fraction of a second, a 70 GB model minutes, so ids are cached by (path, size, mtime).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .catalog import CATALOG, ModelError

Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    path: str
    name: str
    architecture: str
    blocks: int
    context_length: int
    embedding_length: int
    head_count: int
    head_count_kv: int
    vocab_size: int
    quantization: str
    size_bytes: int
    has_chat_template: bool
    model_id: str
    label: str = ""  # the alias a user gave the file (models add --alias, serve --alias)

    @property
    def alias(self) -> str:
        """The user's alias, the catalog alias of this file, else a readable ``name-quant`` form."""
        if self.label:
            return self.label
        for entry in CATALOG.values():
            if entry.filename == Path(self.path).name:
                return entry.alias
        return f"{self.name}-{self.quantization}".lower().replace(" ", "-")

    @property
    def short_id(self) -> str:
        return self.model_id[:12]

    def matches(self, spec: str) -> bool:
        """Whether a request's ``model`` field names this model ("" names any)."""
        spec = spec.strip().lower()
        return spec in ("", self.alias, self.model_id) or (len(spec) >= 8 and self.model_id.startswith(spec))

    def to_dict(self) -> dict[str, object]:
        return asdict(self) | {"alias": self.alias}


def _scalar(reader, key: str, default=None):
    field = reader.get_field(key)
    if field is None:
        return default
    value = field.contents()
    return value


def read_info(path: Path, cache_dir: Path | None = None, progress: Progress | None = None,
              identify: bool = True) -> ModelInfo:
    """Metadata and model id of ``path``; raises ``ModelError`` for anything not a GGUF.

    ``identify=False`` skips hashing (``model_id`` is ""): for sizing up candidates cheaply.
    """
    import gguf  # imports numpy: only where a model is actually read

    path = Path(path).resolve()
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError) as exc:
        raise ModelError(f"{path} is not a readable GGUF file ({exc})") from exc
    arch = _scalar(reader, "general.architecture", "unknown")
    file_type = _scalar(reader, "general.file_type")
    try:
        quant = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else "unknown"
    except ValueError:
        quant = f"type{file_type}"
    tokens = reader.get_field("tokenizer.ggml.tokens")
    return ModelInfo(
        path=str(path),
        name=str(_scalar(reader, "general.name", path.stem)),
        architecture=str(arch),
        blocks=int(_scalar(reader, f"{arch}.block_count", 0)),
        context_length=int(_scalar(reader, f"{arch}.context_length", 0)),
        embedding_length=int(_scalar(reader, f"{arch}.embedding_length", 0)),
        head_count=int(_scalar(reader, f"{arch}.attention.head_count", 0)),
        head_count_kv=int(_scalar(reader, f"{arch}.attention.head_count_kv", 0)),
        vocab_size=len(tokens.data) if tokens is not None else 0,
        quantization=quant,
        size_bytes=path.stat().st_size,
        has_chat_template=reader.get_field("tokenizer.chat_template") is not None,
        model_id=model_id(path, cache_dir, progress) if identify else "",
    )


def _id_key(path: Path) -> str:
    st = path.stat()
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


def _known_ids(cache: Path | None) -> dict[str, str]:
    if cache and cache.is_file():
        try:
            return json.loads(cache.read_text())
        except (OSError, ValueError):
            return {}  # a damaged cache only costs a re-hash
    return {}


def remember_model_id(path: Path, cache_dir: Path, digest: str) -> None:
    """Record a sha256 computed elsewhere (a verified download) so ``model_id`` need not hash
    the file again: for a 70 GB model that is minutes."""
    _save_id(cache_dir / "model-ids.json", _id_key(Path(path).resolve()), digest)


def _save_id(cache: Path, key: str, value: str) -> None:
    known = _known_ids(cache)
    known[key] = value
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(known, indent=0))
    os.replace(tmp, cache)


def model_id(path: Path, cache_dir: Path | None = None, progress: Progress | None = None) -> str:
    """sha256 of the file, cached by (path, size, mtime) in ``cache_dir/model-ids.json``."""
    path = Path(path).resolve()
    key = _id_key(path)
    cache = cache_dir / "model-ids.json" if cache_dir else None
    known = _known_ids(cache)
    if key in known:
        return known[key]
    size = path.stat().st_size
    digest, done = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress(done, size)
    value = digest.hexdigest()
    if cache:
        _save_id(cache, key, value)
    return value
