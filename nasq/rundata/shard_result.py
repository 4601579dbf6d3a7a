"""What a worker returns for one copy of a shard (``inference.shard.run_shard``), as the merge
reads it: the chord hands it over and the shard ledger keeps the first ``ok`` one.

The worker returns (and the ledger stores) plain JSON, as every release did; the merge reads
each with ``ShardResult.read``, which names the field that is wrong. An ``ok`` result holds its
images' predictions, its timings and where it ran; any other holds why (``error``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..runstate import ShardStatus
from ..wire import _dict, _name, _need, _str


def _numbers(d: dict, *names: str) -> dict:
    out = {}
    for n in names:
        v = d.get(n)
        _need(isinstance(v, (int, float)) and not isinstance(v, bool), f"timing.{n} must be a number, not {v!r}"[:200])
        out[n] = v
    return out


def _text_or_none(v) -> str | None:
    return v if isinstance(v, str) else None


@dataclass(frozen=True)
class ShardTiming:
    """When a shard ran and where its time went, in seconds. ``compute_clock``: "device" when
    the runtime timed its own execution (ais_bench's exec_time_list), else "host"."""

    started_at: float
    finished_at: float
    compute_s: float
    data_s: float
    wall_s: float
    compute_clock: str = "host"

    @classmethod
    def from_payload(cls, d) -> ShardTiming:
        d = _dict(d, "timing")
        return cls(**_numbers(d, "started_at", "finished_at", "compute_s", "data_s", "wall_s"),
                   compute_clock=d.get("compute_clock") or "host")

    def to_payload(self) -> dict:
        return {"started_at": self.started_at, "finished_at": self.finished_at, "compute_s": self.compute_s,
                "data_s": self.data_s, "wall_s": self.wall_s, "compute_clock": self.compute_clock}


def _list(d: dict, name: str) -> list:
    v = d.get(name)
    _need(isinstance(v, (list, tuple)), f"{name} must be a list, not {type(v).__name__}")
    return v


@dataclass(frozen=True)
class ShardResult:
    """One copy of a shard, as its worker returned it (``status``: ``runstate.ShardStatus``)."""

    run_id: str
    shard_id: str
    status: str
    worker: str | None = None
    error: str | None = None
    host: str | None = None
    device: str | None = None
    device_name: str | None = None
    accelerator: dict = field(default_factory=dict)
    backend: str | None = None
    precision: str | None = None
    #: per image, in index order: its index, name, label (None without one), top-5 class ids
    #: and their scores
    indices: list | tuple = ()
    names: list | tuple = ()
    labels: list | tuple = ()
    top5: list | tuple = ()
    scores: list | tuple = ()
    #: images that could not be evaluated: {name, reason} each
    errors: list | tuple = ()
    timing: ShardTiming | None = None
    #: images and bytes read from the host cache and from the source
    data: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    model_info: dict = field(default_factory=dict)
    num_outputs: int | None = None
    #: compute time per batch, in ms
    latency_ms: list | tuple = ()
    #: seconds the worker took to load the model for it (0: loaded already)
    load_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == ShardStatus.OK

    @property
    def accounted(self) -> int:
        """Images it evaluated or could not evaluate."""
        return len(self.indices) + len(self.errors)

    @property
    def at_host(self) -> str | None:
        """The host it ran on (results of earlier releases say it in their environment only)."""
        return self.host or self.environment.get("host")

    @classmethod
    def read(cls, r, run_id: str) -> ShardResult | None:
        """``r`` (a result as the chord or the ledger hands it) if it is one of ``run_id``'s,
        else None.

        Raises:
            MessageError: it is the run's, and malformed (the field is named).
        """
        if isinstance(r, ShardResult):
            return r if r.run_id == run_id else None
        if not isinstance(r, dict) or r.get("run_id") != run_id:
            return None
        return cls.from_payload(r)

    @classmethod
    def from_payload(cls, d) -> ShardResult:
        """A result as returned or stored. One that is not ``ok`` is read for what says why
        (nothing of it is checked: a failure is never refused); an ``ok`` one must hold its
        images, their predictions and its timings."""
        d = _dict(d, "shard result")
        common = {"run_id": _name(d, "run_id"), "shard_id": _name(d, "shard_id"), "status": _str(d, "status"),
                  **{k: _text_or_none(d.get(k)) for k in ("worker", "host", "device", "backend", "precision")},
                  "error": None if d.get("error") is None else str(d.get("error"))}
        if common["status"] != ShardStatus.OK:
            return cls(**common)
        return cls(**common, **{k: _list(d, k) for k in ("indices", "names", "labels", "top5", "scores", "errors")},
                   timing=ShardTiming.from_payload(d.get("timing")),
                   **{k: d.get(k) or {} for k in ("accelerator", "data", "environment", "versions", "model_info")},
                   device_name=d.get("device_name"), num_outputs=d.get("num_outputs"),
                   latency_ms=d.get("latency_ms") or [], load_s=d.get("load_s"))
