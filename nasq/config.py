"""Settings, with the precedence defaults < config file < NASQ_* environment < CLI flags.

The config file is TOML with a ``[nasq]`` table, read from ``$NASQ_CONFIG``, else
``./nasq.toml``, else ``~/.config/nasq/config.toml``. Environment variables are the field
names in upper case with a ``NASQ_`` prefix (``NASQ_BROKER_URL``).
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, fields

from .errors import NasqError


def _cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "nasq")


@dataclass(frozen=True)
class Settings:
    #: Redis URL of the broker; None means `nasq eval` starts a private one
    broker_url: str | None = None
    #: result backend URL; None means the broker's Redis
    result_backend: str | None = None
    #: seconds an unacknowledged shard stays invisible before Redis redelivers it;
    #: far above the longest shard (a 1,000-image shard at 2 img/s takes ~9 minutes)
    visibility_timeout: int = 12 * 3600
    #: how long results and run records stay in Redis
    result_expires: int = 7 * 24 * 3600
    #: times a shard may be started before it is failed (a shard that kills its worker
    #: would otherwise be redelivered forever)
    max_attempts: int = 3
    #: built model artifacts (ONNX, OM, ...), shared by workers when on shared storage
    artifact_dir: str = dataclasses.field(default_factory=lambda: os.path.join(_cache_dir(), "artifacts"))
    #: run reports (JSON, Markdown, plot) and sweep results, written by the merging worker
    report_dir: str = dataclasses.field(default_factory=lambda: os.path.join(_cache_dir(), "reports"))
    #: logs and files of embedded runs
    work_dir: str = dataclasses.field(default_factory=lambda: os.path.join(_cache_dir(), "runs"))

    @property
    def backend_url(self) -> str | None:
        return self.result_backend or self.broker_url


def _coerce(name: str, value):
    ftype = {f.name: f.type for f in fields(Settings)}[name]
    if value is None or not isinstance(value, str):
        return value
    if "int" in str(ftype):
        try:
            return int(value)
        except ValueError:
            raise NasqError(f"setting {name} must be an integer, got {value!r}") from None
    return value


def config_file_path() -> str | None:
    for cand in (os.environ.get("NASQ_CONFIG"), "nasq.toml", os.path.expanduser("~/.config/nasq/config.toml")):
        if cand and os.path.isfile(cand):
            return cand
    return None


def load_settings(**overrides) -> Settings:
    """Settings from all sources; keyword arguments (CLI flags) win, None values are ignored."""
    names = [f.name for f in fields(Settings)]
    values: dict = {}
    path = config_file_path()
    if path:
        with open(path, "rb") as f:
            try:
                table = tomllib.load(f).get("nasq", {})
            except tomllib.TOMLDecodeError as e:
                raise NasqError(f"config file {path}: {e}") from None
        unknown = set(table) - set(names)
        if unknown:
            raise NasqError(f"config file {path}: unknown settings {sorted(unknown)}; known: {names}")
        values.update(table)
    for n in names:
        env = os.environ.get(f"NASQ_{n.upper()}")
        if env not in (None, ""):
            values[n] = env
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**{k: _coerce(k, v) for k, v in values.items()})


def redact(url: str | None) -> str | None:
    """A broker URL without its password, for logs."""
    if not url or "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
