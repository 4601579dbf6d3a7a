"""Configuration: deployment ``Settings``, a worker's ``WorkerConfig`` and the
``BackendOptions`` it hands to the backend.

Settings have the precedence defaults < config file < NASQ_* environment < CLI flags. The
config file is TOML with a ``[nasq]`` table, read from ``$NASQ_CONFIG``, else
``./nasq.toml``, else ``~/.config/nasq/config.toml``. Environment variables are the field
names in upper case with a ``NASQ_`` prefix (``NASQ_BROKER_URL``). This module is the only
place that reads them: a worker's configuration is built once, from its flags and these
settings, and passed explicitly from there on (``nasq worker --precision fp16`` ->
``WorkerConfig.precision`` -> ``BackendOptions.precision`` -> ``Backend.load``).
"""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field, fields

from .errors import NasqError
from .roots import Roots, split_paths


#: bounds on what one request may ask for (a hostile or mistyped number is refused before it
#: allocates anything): images in a dataset, images in one shard (or one eval sweep point),
#: images in one batch
MAX_IMAGES = 10_000_000
MAX_SHARD_IMAGES = 100_000
MAX_BATCH_SIZE = 1024
#: images per forward pass of an evaluation unless asked otherwise (the seed recipe's batch size 8)
DEFAULT_BATCH_SIZE = 8

_DEVICE = re.compile(r"(cpu|cuda:\d{1,3}|npu:\d{1,3})")


def parse_device(device: str) -> tuple[str, int | None]:
    """"cuda:1" -> ("cuda", 1); "cpu" -> ("cpu", None).

    Raises:
        ValueError: anything but cpu, cuda:N or npu:N.
    """
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise ValueError(f"device must be cpu, cuda:N or npu:N, not {device!r}")
    kind, _, index = device.partition(":")
    return kind, (int(index) if index else None)


def cache_dir() -> str:
    """nasq's folder in the user's cache: $XDG_CACHE_HOME/nasq, else ~/.cache/nasq."""
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
    #: a shard that fails on a device (a backend or device error, its input refused there, its
    #: worker lost) is sent again for another device; it fails the run only once it failed on this
    #: many distinct devices, or when no other live device of the run's queue may take it
    shard_max_devices: int = 3
    #: a device (one worker) that fails this many shards of a run in a row is excluded from the
    #: run: it takes none of its shards any more (they go back to the queue untouched); `nasq
    #: resume` lifts it
    device_max_failures: int = 2
    #: built model artifacts (ONNX, OM, ...), shared by workers when on shared storage
    artifact_dir: str = dataclasses.field(default_factory=lambda: os.path.join(cache_dir(), "artifacts"))
    #: run reports (JSON, Markdown, plot) and sweep results, written by the merging worker
    report_dir: str = dataclasses.field(default_factory=lambda: os.path.join(cache_dir(), "reports"))
    #: logs and files of embedded runs
    work_dir: str = dataclasses.field(default_factory=lambda: os.path.join(cache_dir(), "runs"))
    #: where a worker keeps the images it read from shared storage, on its host's local disk,
    #: for the next run, sweep point or worker of the host that reads the same bytes (entries
    #: named by their sha256, verified when read, shared by every worker of the host)
    host_cache_dir: str = dataclasses.field(default_factory=lambda: os.path.join(cache_dir(), "host-cache"))
    #: the host cache's bound in GB (least recently used entries go first); 0: no host cache
    host_cache_gb: float = 20.0
    #: how long a merge waits for a shard that is still running (a redelivered one) before failing
    merge_wait_s: float = 900.0
    #: a running shard's lease: its worker renews it every lease_s / 3; once it expires (the
    #: machine is gone) the shard is dispatched again, by whichever live worker or waiting
    #: client notices first. The visibility timeout stays only as the last resort.
    lease_s: float = 30.0
    #: how long workers ride out a broker that went away (a Redis restart) before a call fails
    broker_outage_s: float = 120.0
    #: a broker that does not accept a connection within this many seconds is unreachable
    broker_connect_timeout_s: float = 5.0
    #: a broker that accepted the connection but does not answer a command within this many
    #: seconds is treated as gone (a silent or wedged server never hangs a worker or a client)
    broker_socket_timeout_s: float = 30.0
    #: idle broker connections are checked (PING) this often, in seconds
    broker_health_check_s: float = 10.0
    #: a worker's heartbeat (Celery's event, which Flower follows; nasq's worker registry; a
    #: turn at healing other workers' lost shards), in seconds: each beat costs the broker a few
    #: commands per worker, so a fleet of 1,000 at 2 s would send ~2,000 a second doing nothing
    worker_heartbeat_s: float = 10.0
    #: how long a worker's wait for a message (BRPOP) lasts on the broker before it asks again,
    #: in seconds; a message that arrives is delivered at once whatever this is
    worker_poll_s: float = 5.0
    #: Celery task events (task-sent, -received, -started, -succeeded, -failed) from every
    #: worker and producer from the start: four broker messages a shard. Off, a worker sends
    #: them once something asks (`nasq flower` and Flower itself do, every 5 s, through
    #: Celery's enable_events), and keeps sending them until it stops
    task_events: bool = False
    #: folders workers may read besides their artifact and report directories (data, weights,
    #: labels), separated by ``os.pathsep`` (":") as in PATH; see nasq/roots.py
    read_roots: str = ""
    #: folders workers may write besides their artifact and report directories (``--output``)
    write_roots: str = ""
    #: message signing (Celery's ``auth`` serializer): this process's private key (PEM), its
    #: certificate, and the folder of certificates whose signatures are accepted. All three, or none.
    signing_key: str | None = None
    signing_cert: str | None = None
    signing_cert_store: str | None = None

    @property
    def backend_url(self) -> str | None:
        return self.result_backend or self.broker_url


def _coerce(name: str, value):
    ftype = {f.name: f.type for f in fields(Settings)}[name]
    if name in ("read_roots", "write_roots") and isinstance(value, (list, tuple)):  # a TOML list
        return os.pathsep.join(map(str, value))
    if value is None or not isinstance(value, str):
        return value
    if ftype in (bool, "bool"):
        word = value.strip().lower()
        if word in ("1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off", ""):
            return False
        raise NasqError(f"setting {name} must be true or false, got {value!r}")
    for kind, word in ((int, "an integer"), (float, "a number")):
        if ftype in (kind, kind.__name__):
            try:
                return kind(value)
            except ValueError:
                raise NasqError(f"setting {name} must be {word}, got {value!r}") from None
    return value


def debug_requested() -> bool:
    """``NASQ_DEBUG=1``: the CLI shows tracebacks (as ``--debug`` does)."""
    return os.environ.get("NASQ_DEBUG") == "1"


def flower_auth_from_env() -> str | None:
    """Flower's basic-auth users from ``NASQ_FLOWER_BASIC_AUTH``, else Flower's own
    ``FLOWER_BASIC_AUTH`` (``user:password[,user:password]``)."""
    return os.environ.get("NASQ_FLOWER_BASIC_AUTH") or os.environ.get("FLOWER_BASIC_AUTH")


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
    settings = Settings(**{k: _coerce(k, v) for k, v in values.items()})
    for name in AT_LEAST_ONE:
        if getattr(settings, name) < 1:
            raise NasqError(f"setting {name} must be at least 1, not {getattr(settings, name)!r}")
    return settings


#: settings that count something and mean nothing below 1
AT_LEAST_ONE = ("max_attempts", "shard_max_devices", "device_max_failures")


def settings_to_file(settings: Settings, path: str) -> None:
    """The resolved settings, for the workers an embedded run starts (``settings_from_file``)."""
    from .files import write_json

    write_json(dataclasses.asdict(settings), path, mode=0o600)  # it may name signing keys and a broker password


def settings_from_file(path: str, **overrides) -> Settings:
    """Settings written by ``settings_to_file``; keyword arguments that are not None win."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except (OSError, ValueError) as e:
        raise NasqError(f"settings file {path}: {e}") from None
    names = {f.name for f in fields(Settings)}
    if not isinstance(values, dict) or set(values) - names:
        raise NasqError(f"settings file {path}: not a nasq settings file")
    return Settings(**{**values, **{k: v for k, v in overrides.items() if v is not None}})


def redact(url: str | None) -> str | None:
    """A broker URL without its password (in the user part or the query), for logs: kombu's
    ``maybe_sanitize_url``, as Celery logs its broker."""
    from kombu.utils.url import maybe_sanitize_url

    return maybe_sanitize_url(url) if url else url


def _flag(help: str, **how) -> dict:
    """Metadata making a ``BackendOptions`` field a flag of ``nasq worker`` (``nasq.flags``
    builds the flags, a local worker's argv and the parsing back from these)."""
    return {"help": help, **how}


@dataclass(frozen=True)
class BackendOptions:
    """How a worker runs the model on its device: the one declaration of a worker's options.

    Every field with flag metadata is a flag of ``nasq worker`` (``--cuda-graphs`` for
    ``cuda_graphs``), is passed to a local worker in its argv, and reaches the backend in this
    object; ``nasq eval``/``nasq bench`` take the ones they name. The precision always comes
    with it, so nothing reaches a backend by a side channel. ``None`` leaves the backend's default.
    """

    precision: str = field(default="fp32", metadata=_flag(
        "precision when a run does not set one; fp16/bf16 take the CUDA fast path", choices="precisions"))
    threads: int | None = field(default=None, metadata=_flag(
        "CPU threads for the runtime (default: the runtime's choice)", low=1, high=1024))
    compile: str = field(default="none", metadata=_flag(
        "torch backend: torch.compile mode, compiled once per process, its cache in the artifact dir",
        choices="compile_modes"))
    cuda_graphs: bool = field(default=False, metadata=_flag("torch backend: replay a CUDA graph per batch size"))
    kernels: str = field(default="torch", metadata=_flag(
        "torch backend on CUDA: triton runs NASNet's separable branches as fused Triton kernels, BatchNorm "
        "folded first", choices=("torch", "triton")))
    device_decode: bool = field(default=False, metadata=_flag(
        "torch backend: decode JPEGs on the device (nvjpeg on CUDA; within 1/255 of Pillow per pixel)"))
    decode_threads: int | None = field(default=None, metadata=_flag(
        "threads decoding JPEGs ahead of the device (the input pipeline; default: 1 on cpu, 4 on cuda/npu)",
        low=1, high=64))
    sim: str | None = field(default=None, metadata=_flag(
        "--backend sim only: a SIMULATED device for fleet-scale queue tests, never a measurement: "
        "rate=310p3|N,slow=X,crash_after=N,hang_after=N,fail_after=N,read_mbps=N,decode=host|device "
        "(default: rate=310p3)", metavar="OPTIONS"))
    #: torch: fold BatchNorm / channels-last (None: on for the CUDA fp16/bf16 fast path)
    fold_bn: bool | None = None
    channels_last: bool | None = None
    #: where compiled kernels are cached (torch.compile), so a restarted worker reuses them
    cache_dir: str | None = None

    def describe(self) -> dict:
        """The options that differ from the defaults, for reports and row names."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("precision", "cache_dir", "decode_threads") and getattr(self, f.name) != f.default}


@dataclass(frozen=True)
class WorkerConfig:
    """Everything one worker process runs with, built once by ``nasq worker`` from its flags
    and the settings, held by the task base class and handed on explicitly."""

    settings: Settings
    #: the device as asked (cpu, cuda:N, npu:N) and as the pinned process sees it (cuda:0)
    device: str = "cpu"
    local_device: str = "cpu"
    backend: str = "torch"
    #: how it runs the model (its precision is that of runs that do not set one)
    options: BackendOptions = BackendOptions()
    queues: tuple[str, ...] = ()
    #: the Celery node name, unique in the deployment
    name: str = ""
    #: the accelerator the pinned process sees, by its id on the machine ("2" for cuda:0 under
    #: CUDA_VISIBLE_DEVICES=2,3); None on the CPU
    physical_device: str | None = None

    @property
    def roots(self) -> Roots:
        """Where the paths of a message may point: the configured roots, plus the worker's artifact
        directory to read (built models) and its report directory to write (sweeps). Artifacts
        are written by the build steps alone, never where a message says."""
        s = self.settings
        return Roots.of(read=[*split_paths(s.read_roots), s.artifact_dir],
                        write=[*split_paths(s.write_roots), s.report_dir])

    @property
    def precision(self) -> str:
        return self.options.precision

    @property
    def decode_threads(self) -> int:
        return self.options.decode_threads or (1 if self.device == "cpu" else 4)

    def backend_options(self, precision: str | None = None) -> BackendOptions:
        """The options a run gets on this worker: the run's precision if it set one."""
        return dataclasses.replace(self.options, precision=precision or self.options.precision,
                                   cache_dir=os.path.join(self.settings.artifact_dir, "inductor-cache"))

    def describe(self) -> dict:
        """What the worker registry shows (``nasq status``)."""
        return {"device": self.device, "physical_device": self.physical_device, "backend": self.backend,
                "precision": self.precision, "queues": list(self.queues), **self.roots.describe(),
                **self.backend_options().describe()}
