"""Settings: command-line flags win over SLIDEPIPE_* environment variables, which win over an
optional TOML file, which wins over the built-in defaults (SQLite and ./data: a new user needs no
configuration at all)."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from sqlalchemy.engine import make_url

from pipeline.errors import ConfigError

ENV_PREFIX = "SLIDEPIPE_"
CONFIG_ENV = "SLIDEPIPE_CONFIG"
DEFAULT_CONFIG_FILE = "slidepipe.toml"


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@dataclass(frozen=True)
class Settings:
    data_root: Path = Path("data")
    db_url: str | None = None  # None: sqlite:///<data_root>/slidepipe.db
    workers: int = field(default_factory=default_workers)
    queue_url: str | None = None
    debug: bool = False
    cors_origins: str | None = None  # `serve`: extra web origins that may read the data, or "*" (apache.common.CorsPolicy)
    lock_lease_seconds: int = 300  # a stage's lock is taken over after this long without a heartbeat (db.locks)

    @property
    def database_url(self) -> str:
        if self.db_url:
            return self.db_url
        return f"sqlite:///{(Path(self.data_root).absolute() / 'slidepipe.db').as_posix()}"

    @property
    def safe_database_url(self) -> str:
        """The DB URL with any password hidden: safe to print or log."""
        return redact_url(self.database_url)

    @classmethod
    def load(
        cls,
        flags: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        config_file: str | Path | None = None,
    ) -> "Settings":
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        path = config_file or env.get(CONFIG_ENV)
        if path is None and Path(DEFAULT_CONFIG_FILE).is_file():
            path = DEFAULT_CONFIG_FILE
        if path is not None:
            values.update(_read_toml(Path(path)))
        for f in fields(cls):
            key = ENV_PREFIX + f.name.upper()
            if key in env and env[key] != "":
                values[f.name] = env[key]
        for name, value in (flags or {}).items():
            if value is not None:
                values[name] = value
        return cls()._with(values)

    def _with(self, values: Mapping[str, Any]) -> "Settings":
        known = {f.name for f in fields(self)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        converted: dict[str, Any] = {}
        for name, value in values.items():
            converted[name] = _convert(name, value)
        settings = replace(self, **converted)
        if settings.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {settings.workers}")
        if settings.lock_lease_seconds < 1:
            raise ConfigError(f"lock_lease_seconds must be >= 1, got {settings.lock_lease_seconds}")
        if settings.db_url:
            try:
                make_url(settings.db_url)
            except Exception as exc:  # sqlalchemy raises ArgumentError
                raise ConfigError(f"database URL {redact_url(settings.db_url)!r} is not a valid URL: {exc}") from None
        return settings


def _convert(name: str, value: Any) -> Any:
    if name == "data_root":
        return Path(value)
    if name in ("workers", "lock_lease_seconds"):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if name == "debug":
        if isinstance(value, str):
            return value.strip().lower() in {"1", "true", "yes", "on"}
        return bool(value)
    return None if value is None else str(value)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError("settings file not found", path) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", path) from None
    return dict(data.get("slidepipe", data))


def redact_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database URL>"
