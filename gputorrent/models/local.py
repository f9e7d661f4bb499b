"""Names a user gives their own GGUF files (``models add PATH --alias NAME``), and what a
``--model`` names (``resolve``: a catalog alias, an added name, a file or a directory).

Kept as ``aliases.json`` beside the cached models: alias -> the file's path, model id and size.
The file is referenced, not copied (models are large); if it moves, the error says so. Peers
match requests on the model id, so an alias is only a name: two peers may call the same file
differently and still fail over to each other.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .catalog import CATALOG, ModelError, cached_path

FILE = "aliases.json"
_ALIAS = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def check_alias(name: str) -> str:
    """A usable alias: lower-case letters, digits, '.', '_' and '-', not a catalog alias."""
    if not _ALIAS.match(name):
        raise ModelError(f"alias {name!r}: use 1 to 64 lower-case letters, digits, '.', '_' or '-' "
                         "(starting with a letter or digit), e.g. llama3-8b")
    if name in CATALOG:
        raise ModelError(f"alias {name!r} is a known model's; choose another name")
    return name


def load_aliases(models_dir: Path) -> dict[str, dict]:
    path = models_dir / FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} is damaged ({exc}); remove it and add your models again") from exc
    return data if isinstance(data, dict) else {}


def add_alias(models_dir: Path, alias: str, path: Path, model_id: str) -> None:
    """Name ``path`` ``alias`` (replacing what the alias named before)."""
    known = load_aliases(models_dir)
    known[check_alias(alias)] = {"path": str(Path(path).resolve()), "model_id": model_id,
                                 "size_bytes": Path(path).stat().st_size}
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = models_dir / f"{FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(known, indent=2, sort_keys=True))
    os.replace(tmp, models_dir / FILE)


def remove_alias(models_dir: Path, alias: str) -> None:
    known = load_aliases(models_dir)
    if alias not in known:
        raise ModelError(f"no model called {alias!r} was added; see: gputorrent models list")
    del known[alias]
    tmp = models_dir / f"{FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(known, indent=2, sort_keys=True))
    os.replace(tmp, models_dir / FILE)


def added_path(models_dir: Path, alias: str) -> Path | None:
    """The file an added alias names (None: not an added alias)."""
    entry = load_aliases(models_dir).get(alias.lower())
    if entry is None:
        return None
    path = Path(entry["path"])
    if not path.is_file():
        raise ModelError(f"{alias!r} named {path}, which is gone; add it again: "
                         f"gputorrent models add NEW_PATH --alias {alias}")
    return path


def alias_of(models_dir: Path, path: Path) -> str | None:
    """The alias a user gave ``path``, if any (the first, by name)."""
    resolved = str(Path(path).resolve())
    return next((a for a, e in sorted(load_aliases(models_dir).items()) if e.get("path") == resolved), None)


class UnknownModel(ModelError):
    """A ``--model`` that names nothing: a usage error, not a failure of the work."""


def resolve(spec: str, models_dir: Path) -> Path:
    """The GGUF file for ``--model``: a catalog alias (already pulled), a path, or a directory."""
    entry = CATALOG.get(spec.lower())
    if entry is not None:
        path = cached_path(entry, models_dir)
        if not path.is_file():
            raise ModelError(f"model {spec!r} is not downloaded yet; run: gputorrent models pull {spec}")
        return path
    added = added_path(models_dir, spec)
    if added is not None:
        return added
    path = Path(spec).expanduser()
    if path.is_dir():
        return path  # several quantizations of one model: the caller chooses (models.quant)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{path} is not a .gguf file; gputorrent serves GGUF models")
        return path
    known = ", ".join(sorted(CATALOG))
    raise UnknownModel(f"unknown model {spec!r}: not a known model ({known}), an added one (gputorrent models list) "
                     "nor an existing .gguf path or directory; serve a file of your own with --model PATH.gguf, "
                     "or name it once: gputorrent models add PATH.gguf --alias NAME")
