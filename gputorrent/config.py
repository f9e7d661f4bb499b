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

import msgspec
import platformdirs
from msgspec import UNSET, UnsetType

from .errors import GputorrentError

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
    def bootstrap_identity_path(self) -> Path:
        """The key of ``gputorrent bootstrap``: its own, so a bootstrap node and a ``serve`` on one
        machine are two peers (sharing a key, the bootstrap's address carried the serve's id and
        nobody found the serve)."""
        return self.identity or self.data_dir / "bootstrap.key"

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

    def unfindable(self, direct: Any = ()) -> str:
        """Why a requester with these settings could find no swarm ("" when it can)."""
        if direct or self.bootstrap or self.mdns:
            return ""
        return ("no way to find the swarm: give a peer to join by (--bootstrap MULTIADDR, bootstrap=[...] in the "
                "API, or GPUTORRENT_BOOTSTRAP), or leave mDNS on to find peers on this network")

    def with_overrides(self, **flags: Any) -> Settings:
        """Apply command-line flags; ``None`` means the flag was not given."""
        unknown = set(flags) - {f.name for f in fields(Settings)}
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        return replace(self, **_coerce(flags))


class ConfigError(GputorrentError, ValueError):
    """A config file or ``GPUTORRENT_*`` variable that cannot be used; the message names it."""


class ConfigFile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``config.toml``, decoded strictly: a wrong type or an unknown key is an error that
    names the key, never a silent default (``mdns = "maybe"`` must not turn mDNS on)."""

    data_dir: str | UnsetType = UNSET
    cache_dir: str | UnsetType = UNSET
    identity: str | UnsetType = UNSET
    listen: str | UnsetType = UNSET
    bootstrap: list[str] | UnsetType = UNSET
    mdns: bool | UnsetType = UNSET
    swarm_key: str | UnsetType = UNSET


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def config_path() -> Path:
    env = os.environ.get("GPUTORRENT_CONFIG")
    return Path(env) if env else Path(platformdirs.user_config_dir(APP)) / "config.toml"


def _coerce(values: dict[str, Any]) -> dict[str, Any]:
    """Typed values (from the decoded file or flags) to ``Settings`` fields."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        if key in {"data_dir", "cache_dir", "identity", "swarm_key"}:
            value = Path(value).expanduser()
        elif key == "bootstrap":
            value = tuple(value)
        out[key] = value
    return out


def _from_env(env: dict[str, str] | os._Environ[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for f in fields(Settings):
        name = f"GPUTORRENT_{f.name.upper()}"
        text = env.get(name, "").strip()
        if not text:
            continue
        if f.name == "bootstrap":  # addresses split by commas or spaces
            values[f.name] = text.replace(",", " ").split()
        elif f.name == "mdns":
            if text.lower() not in _TRUE | _FALSE:
                raise ConfigError(f"{name}={text!r}: give 1 or 0 (true/false, yes/no, on/off)")
            values[f.name] = text.lower() in _TRUE
        else:
            values[f.name] = text
    return values


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Read the TOML file, then ``GPUTORRENT_<NAME>`` variables, over the defaults."""
    environ = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = config_path()
    if path.is_file():
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc}); fix or remove the file") from exc
        try:
            decoded = msgspec.convert(raw, ConfigFile, strict=True)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{path}: {_where(str(exc))}; known keys: {', '.join(ConfigFile.__struct_fields__)}") \
                from None
        values.update({k: v for k, v in msgspec.structs.asdict(decoded).items() if v is not UNSET})
    values.update(_from_env(environ))
    return Settings(**_coerce(values))


def _where(message: str) -> str:
    """msgspec's "Expected `array`, got `int` - at `$.bootstrap`" as "bootstrap: expected an array, got int"."""
    text, _, at = message.partition(" - at `")
    key = at.rstrip("`").removeprefix("$.").removeprefix("$")
    text = text.replace("`", "")
    return f"{key}: {text[0].lower()}{text[1:]}" if key and not key.startswith("[") else text
