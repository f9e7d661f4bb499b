"""Settings, resolved as defaults < TOML file < ``GPUTORRENT_*`` environment < flags.

Only paths and a few knobs live here; everything else is a flag of the command that uses it.
The file is ``config.toml`` in the user config dir (or ``$GPUTORRENT_CONFIG``).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import platformdirs

APP = "gputorrent"


def _default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP))


def _default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir(APP))


@dataclass(frozen=True, slots=True)
class Settings:
    """Where gputorrent keeps its files, and the defaults a user may set once."""

    data_dir: Path = field(default_factory=_default_data_dir)
    cache_dir: Path = field(default_factory=_default_cache_dir)
    identity: Path | None = None
    listen: str = "/ip4/127.0.0.1/tcp/0"
    bootstrap: tuple[str, ...] = ()
    mdns: bool = True
    swarm_key: Path | None = None

    @property
    def identity_path(self) -> Path:
        """The key a serving (or bootstrap) node is known by."""
        return self.identity or self.data_dir / "identity.key"

    @property
    def requester_identity_path(self) -> Path:
        """The key ``ask``, ``peers``, the TUI, the gateway and ``Swarm`` use: a separate one,
        so asking and serving on one machine are two peers (the same peer id cannot dial
        itself, and a requester leaves its own id out of every lookup). ``--identity``
        names one key for both."""
        return self.identity or self.data_dir / "requester.key"

    @property
    def models_dir(self) -> Path:
        return self.cache_dir / "models"

    def with_overrides(self, **flags: Any) -> Settings:
        """Apply command-line flags; ``None`` means the flag was not given."""
        given = {k: v for k, v in flags.items() if v is not None}
        return replace(self, **_coerce(given))


def config_path() -> Path:
    env = os.environ.get("GPUTORRENT_CONFIG")
    return Path(env) if env else Path(platformdirs.user_config_dir(APP)) / "config.toml"


def _coerce(values: dict[str, Any]) -> dict[str, Any]:
    known = {f.name: f for f in fields(Settings)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"unknown setting {key!r}; known settings: {', '.join(sorted(known))}")
        if key in {"data_dir", "cache_dir", "identity", "swarm_key"}:
            value = Path(value).expanduser()
        elif key == "bootstrap":
            # A list (flags, TOML) or one string of addresses split by commas or spaces (env).
            items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
            value = tuple(items)
        elif key == "mdns" and isinstance(value, str):
            value = value.strip().lower() not in {"0", "false", "no", "off"}
        out[key] = value
    return out


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Read the TOML file, then ``GPUTORRENT_<NAME>`` variables, over the defaults."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = config_path()
    if path.is_file():
        try:
            values.update(tomllib.loads(path.read_text()))
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML ({exc}); fix or remove the file") from exc
    for f in fields(Settings):
        name = f"GPUTORRENT_{f.name.upper()}"
        if env.get(name):
            values[f.name] = env[name]
    return Settings(**_coerce(values))
