"""A run's report: what the merge computes from the shard results, stores in Redis with the
run's end, writes as report.json and hands the client (``EvalResult.report``).

Its JSON is the one every release wrote. ``Report.from_payload`` reads it, naming the field that
is wrong; fields an earlier release did not write read as unset (a report without ``complete``
is complete unless it is ``partial``), and fields a later release adds, at the top or in the
backend, throughput and environment records, are kept as they are and written back; the
dataset record is the wire's ``DatasetRef``. ``to_payload`` writes a report that was read with
the fields it had, and one built here with the fields a report always has and the others (a
partial report's, the failover record, the files) when they are set.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

from ..runstate import RunState
from ..wire import DatasetRef, _dict, _name, _need

#: top-1 .. top-5
TOPK = 5


def _of(d: dict, name: str, types: tuple, what: str):
    """``d[name]`` if it is of ``types`` or None (absent: None)."""
    v = d.get(name)
    _need(v is None or isinstance(v, types) and not (isinstance(v, bool) and bool not in types),
          f"report.{name} must be {what} or null, not {v!r}"[:200])
    return v


def _num(d: dict, name: str) -> float | None:
    return _of(d, name, (int, float), "a number")


def _text(d: dict, name: str) -> str | None:
    return _of(d, name, (str,), "a string")


def _obj(d: dict, name: str) -> dict | None:
    return _of(d, name, (dict,), "an object")


def _rows(d: dict, name: str) -> tuple | None:
    v = _of(d, name, (list, tuple), "a list")
    return None if v is None else tuple(v)


@dataclass(frozen=True)
class BackendInfo:
    """The runtime that computed the run (its first shard's) and its versions."""

    name: str | None
    versions: dict = field(default_factory=dict)
    #: the earliest reports named the backend only: written back so
    named_only: bool = field(default=False, compare=False)
    extra: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_payload(cls, v) -> BackendInfo:
        if isinstance(v, str) or v is None:  # (None: the field was absent, or null: written back as it was)
            return cls(v, named_only=True)
        v = _dict(v, "report.backend")
        return cls(_text(v, "name"), dict(_obj(v, "versions") or {}), extra=_unknown(cls, v))

    def to_payload(self):
        return self.name if self.named_only else {"name": self.name, "versions": self.versions, **self.extra}


@dataclass(frozen=True)
class Throughput:
    """Every throughput of a run, named by what it divides by (docs/REPORT.md)."""

    shard_span_img_s: float | None = None
    end_to_end_img_s: float | None = None
    end_to_end_s: float | None = None
    compute_img_s: float | None = None
    extra: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_payload(cls, v) -> Throughput:
        given = _dict(v or {}, "report.throughput")
        return cls(**{n: _num(given, n) for n in _declared(cls)}, extra=_unknown(cls, given))

    def to_payload(self) -> dict:
        return {**{n: getattr(self, n) for n in _declared(self)}, **self.extra}


@dataclass(frozen=True)
class RunEnvironment:
    """Where the run ran (host name -> that host's facts), where it was submitted from, by
    which nasq, and the command that runs it again."""

    hosts: dict = field(default_factory=dict)
    submitted_from: str | None = None
    client_nasq: str | None = None
    command: tuple[str, ...] | None = None
    extra: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_payload(cls, v) -> RunEnvironment:
        v = _dict(v or {}, "report.environment")
        command = _rows(v, "command")
        _need(command is None or all(isinstance(a, str) for a in command), "report.environment.command must be "
              "a list of strings or null")
        return cls(dict(_obj(v, "hosts") or {}), _text(v, "submitted_from"), _text(v, "client_nasq"), command,
                   extra=_unknown(cls, v))

    def to_payload(self) -> dict:
        return {"hosts": self.hosts, "submitted_from": self.submitted_from, "client_nasq": self.client_nasq,
                "command": None if self.command is None else list(self.command), **self.extra}


def _declared(cls) -> list[str]:
    """The fields of a record's JSON that ``cls`` declares (not those saying how it was read)."""
    return [f.name for f in fields(cls) if f.name not in _BOOKKEEPING]


def _unknown(cls, v: dict) -> dict:
    """The fields of ``v`` that ``cls`` does not declare: a later release's, kept as they are."""
    known = set(_declared(cls))
    return {k: x for k, x in v.items() if k not in known}


#: the fields that say how a record was read, not what it holds: never a key of its JSON
_BOOKKEEPING = {"extra", "read_from", "named_only"}


#: the fields a report built by this release writes only when they are set: a partial report's,
#: the failover record and the files
_SOMETIMES = ("partial", "failure", "shards_not_ok", "redispatched_shards", "excluded_devices", "shard_failures",
              "files", "files_not_written", "files_to_come")


#: what reading a report fills in when its JSON lacks the field (``complete``: from ``partial``)
_DERIVED = ("complete",)


@dataclass(frozen=True, eq=False)
class Report:
    """A run's report, its fields in the order report.json has them. ``state`` is the run's end
    (``runstate.RunState``'s value; reports of the earliest releases have none); ``complete`` is
    False for a failed or cancelled run's partial report, whose numbers cover only the shards it
    finished. Two reports are equal when their JSON is."""

    run_id: str
    state: str | None = None
    error: str | None = None
    complete: bool = True
    created: float | None = None
    finished: float | None = None
    images: int = 0
    images_planned: int | None = None
    images_total: int | None = None
    top1: float | None = None
    top2: float | None = None
    top3: float | None = None
    top4: float | None = None
    top5: float | None = None
    #: [low, high] in percent: the Wilson 95 % interval of each top-k
    top1_ci95: tuple[float, float] | None = None
    top2_ci95: tuple[float, float] | None = None
    top3_ci95: tuple[float, float] | None = None
    top4_ci95: tuple[float, float] | None = None
    top5_ci95: tuple[float, float] | None = None
    #: "top1".."top5" -> images right
    correct: dict | None = None
    labelled: int | None = None
    throughput_img_s: float | None = None
    wall_s: float | None = None
    throughput: Throughput = field(default_factory=Throughput)
    model_load_s: float | None = None
    error_count: int = 0
    #: images that could not be evaluated: {name, reason} each
    errors: tuple[dict, ...] = ()
    #: per device: where it is, what it is, its shards, images, timings and latency percentiles
    per_device: tuple[dict, ...] = ()
    #: images read from the host cache and from the source, in all and per host
    data_read: dict | None = None
    backend: BackendInfo = field(default_factory=lambda: BackendInfo(None))
    #: what the workers said of the model they loaded (weights, sha256, arch, published, ...)
    model: dict = field(default_factory=dict)
    num_outputs: int | None = None
    batch_size: int | None = None
    precision: str | None = None
    dataset: DatasetRef | None = None
    labels_file: str | None = None
    labels_sha256: str | None = None
    shards: int | None = None
    shards_ok: int | None = None
    #: the shards without a kept result: {shard_id, images, reason, worker, attempts} each
    shards_failed: tuple[dict, ...] = ()
    duplicate_shard_results_dropped: tuple[str, ...] = ()
    environment: RunEnvironment = field(default_factory=RunEnvironment)
    warnings: tuple[str, ...] = ()
    partial: bool | None = None
    failure: str | None = None
    shards_not_ok: tuple[str, ...] | None = None
    #: shard id -> how many times it was sent again
    redispatched_shards: dict | None = None
    excluded_devices: tuple[dict, ...] | None = None
    #: shard id -> each failed copy of it
    shard_failures: dict | None = None
    #: the kinds rendered after the numbers are stored (plots, the HTML page)
    files_to_come: tuple[str, ...] | None = None
    #: kind -> the file's path in the run's folder
    files: dict | None = None
    #: file name -> why it could not be written
    files_not_written: dict | None = None
    #: fields of a later release's report, kept as they are
    extra: dict = field(default_factory=dict)
    #: the fields the JSON it was read from had, and its dataset's (``("dataset", field)``; None:
    #: built here): a field it lacked is written back only once it is set, so a report of any
    #: release is written back as it was
    read_from: frozenset | None = field(default=None, repr=False)

    @property
    def planned_images(self) -> int | None:
        """The images the run planned (reports of earlier releases: the dataset's)."""
        return self.images_total if self.images_planned is None else self.images_planned

    @property
    def shown_state(self) -> str:
        """How the report names its run's end (a report without a state: partial or done)."""
        return self.state or ("partial" if not self.complete else RunState.DONE.value)

    def top(self, k: int) -> float | None:
        """Top-``k`` accuracy in percent (None without labels)."""
        return getattr(self, f"top{k}")

    def top_ci95(self, k: int) -> tuple[float, float] | None:
        return getattr(self, f"top{k}_ci95")

    def __eq__(self, other) -> bool:
        return isinstance(other, Report) and self.to_payload() == other.to_payload()

    __hash__ = None

    # ------------------------------------------------------------------ its JSON

    def to_payload(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("extra", "read_from"):
                continue
            if self.read_from is None:
                if f.name in _SOMETIMES and v is None:
                    continue
            elif f.name not in self.read_from and v == (not self.partial if f.name in _DERIVED else _default(f)):
                continue
            if isinstance(v, (BackendInfo, Throughput, RunEnvironment)):
                v = v.to_payload()
            elif isinstance(v, DatasetRef):  # the fields it was read with (earlier releases had fewer)
                v = {g.name: getattr(v, g.name) for g in fields(v) if self.read_from is None
                     or ("dataset", g.name) in self.read_from or getattr(v, g.name) is not None}
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return {**out, **self.extra}

    @staticmethod
    def state_of(payload) -> str | None:
        """The state a report's JSON says, read without reading the rest (a report this release
        cannot read whole still says whether it is final)."""
        state = payload.get("state") if isinstance(payload, dict) else None
        return state if isinstance(state, str) else None

    @classmethod
    def from_payload(cls, d) -> Report:
        """A report as stored; ``MessageError`` names the field that is wrong."""
        d = _dict(d, "report")
        images = d.get("images")
        _need(isinstance(images, int) and not isinstance(images, bool) and images >= 0,
              f"report.images must be a count of images, not {images!r}"[:200])
        per_device = _rows(d, "per_device")
        _need(per_device is not None and all(isinstance(x, dict) for x in per_device),
              "report.per_device must be a list of objects")
        counts = {n: _of(d, n, (int,), "a count") for n in ("images_planned", "images_total", "labelled",
                                                            "num_outputs", "batch_size", "shards", "shards_ok")}
        numbers = {n: _num(d, n) for n in ("created", "finished", "throughput_img_s", "wall_s", "model_load_s",
                                           *(f"top{k}" for k in range(1, TOPK + 1)))}
        texts = {n: _text(d, n) for n in ("state", "error", "precision", "labels_file", "labels_sha256", "failure")}
        rows = {n: _rows(d, n) for n in ("errors", "shards_failed", "duplicate_shard_results_dropped", "warnings",
                                         "shards_not_ok", "excluded_devices", "files_to_come")}
        objects = {n: _obj(d, n) for n in ("correct", "data_read", "redispatched_shards", "shard_failures", "files",
                                           "files_not_written")}
        intervals = {f"top{k}_ci95": _interval(d, f"top{k}_ci95") for k in range(1, TOPK + 1)}
        complete, partial = _of(d, "complete", (bool,), "true or false"), _of(d, "partial", (bool,), "true or false")
        return cls(run_id=_name(d, "run_id"), images=images, per_device=per_device,
                   complete=(not partial) if complete is None else complete, partial=partial,
                   error_count=_of(d, "error_count", (int,), "a count") or 0,
                   throughput=Throughput.from_payload(d.get("throughput")),
                   backend=BackendInfo.from_payload(d.get("backend")), model=dict(_obj(d, "model") or {}),
                   dataset=None if d.get("dataset") is None else DatasetRef.from_payload(d["dataset"]),
                   environment=RunEnvironment.from_payload(d.get("environment")),
                   **counts, **numbers, **texts, **intervals, **objects,
                   **{n: v if v is not None or n in _SOMETIMES else () for n, v in rows.items()},
                   extra=_unknown(cls, d),
                   read_from=frozenset(d) | {("dataset", k) for k in (d.get("dataset") or {})})


def _default(f):
    """A field's default value (what a report that lacks the field holds)."""
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _interval(d: dict, name: str) -> tuple[float, float] | None:
    v = _rows(d, name)
    _need(v is None or len(v) == 2 and all(isinstance(x, (int, float)) for x in v),
          f"report.{name} must be [low, high] or null")
    return v
