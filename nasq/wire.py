"""The wire contract: everything the client, the workers and the run store agree on by name
and shape. Task names, queue names and task ids; the payload types (``ShardTask``,
``SweepPoint``, the ``EvalJob`` every shard of a run shares) and the run's manifest with its
shard plan (its record, ``nasq.rundata``, reads them). The one place payloads are checked.

A task decodes its payload with ``from_payload`` before doing anything; a payload of the
wrong type or range is refused there with a ``MessageError`` that says which field is wrong.
Payloads carry paths and index ranges, never image bytes; ``within(roots)`` then resolves every
path against the worker's read and write roots (``nasq.roots``) before any of it is used.
Tasks are implemented in ``workers/`` and addressed by name, so clients send them without
importing worker code.
"""
from __future__ import annotations

import math
import secrets
import time
from dataclasses import asdict, dataclass

from . import backends
from .config import MAX_BATCH_SIZE, MAX_IMAGES, MAX_SHARD_IMAGES
from .data.outputs import FORMATS
from .errors import NasqError
from .model.spec import ModelRef
from .roots import Roots, check_name

_MAX_TEXT = 4096

# ------------------------------------------------------------------------------ names

TASK_EVAL_SHARD = "nasq.eval_shard"
TASK_MERGE = "nasq.merge_run"
TASK_RUN_FAILED = "nasq.run_failed"
TASK_SWEEP_POINT = "nasq.sweep_point"
TASK_BUILD_EXPORT = "nasq.build.export"
TASK_BUILD_SIMPLIFY = "nasq.build.simplify"
TASK_BUILD_DEVICE = "nasq.build.device"
TASK_BUILD_COMMIT = "nasq.build.commit"
TASK_BUILD_FAILED = "nasq.build.failed"
#: every build task runs on this queue, which evaluation workers never consume
BUILD_QUEUE = "build"
#: the names of the build tasks, as Celery's task routes match them
BUILD_TASKS = "nasq.build.*"


def eval_queue(backend: str) -> str:
    """Default evaluation queue of a backend: workers of that runtime consume it."""
    return f"eval.{backend}"


def worker_queue(node_name: str) -> str:
    """The queue only one worker consumes: sweeps address a device through it."""
    return f"w.{node_name}"


def shard_task_id(run_id: str, shard_id: str, dispatch: int = 0) -> str:
    """A shard's task id: ``<run>:<shard>`` for the copy the run's submission sent, and
    ``<run>:<shard>:<n>`` for its n-th copy (``dispatch`` = n - 1: the shard's dispatch count,
    when it was sent again after a failure, a lost worker or message, or by ``nasq resume``),
    so that Flower keeps each attempt as a task of its own."""
    return f"{run_id}:{shard_id}" if not dispatch else f"{run_id}:{shard_id}:{dispatch + 1}"


def shard_of_task(task_id: str) -> tuple[str, str] | None:
    """(run id, shard id) of a shard's task id (any attempt's); None for another task's."""
    parts = task_id.split(":") if isinstance(task_id, str) else []
    if len(parts) in (2, 3) and parts[1].startswith("shard-") and (len(parts) == 2 or parts[2].isdigit()):
        return parts[0], parts[1]
    return None


def run_of_task(task_id: str) -> str | None:
    """The run id a task id names (a shard's or a merge's), or None."""
    head = task_id.split(":", 1)[0] if isinstance(task_id, str) and ":" in task_id else None
    try:
        return check_name(head, "run_id") if head else None
    except NasqError:
        return None


def merge_task_id(run_id: str, resume: int = 0) -> str:
    """The task id of a run's merge: the chord's, or that of its ``resume``-th resume."""
    return f"{run_id}:merge" if not resume else f"{run_id}:merge-r{resume}"


class MessageError(NasqError):
    """A task payload of the wrong shape, type or range."""


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise MessageError(what)


def _int(d: dict, name: str, *, low: int = 0, high: int = MAX_IMAGES) -> int:
    v = d.get(name)
    _need(isinstance(v, int) and not isinstance(v, bool) and low <= v <= high,
          f"{name} must be an integer in [{low}, {high}], not {v!r}"[:200])
    return v


def _str(d: dict, name: str, *, optional: bool = False) -> str | None:
    v = d.get(name)
    _need(isinstance(v, str) and 0 < len(v) <= _MAX_TEXT and "\0" not in v or (optional and v is None),
          f"{name} must be a non-empty string, not {v!r}"[:200])
    return v


def _name(d: dict, name: str) -> str:
    """An id that becomes part of a file name or a Redis key: letters, digits, ``_.-``."""
    v = _str(d, name)
    try:
        return check_name(v, name)
    except NasqError as e:
        raise MessageError(str(e)) from None


def _sha256(d: dict, name: str) -> str | None:
    """An optional sha256 in hex."""
    v = d.get(name)
    _need(v is None or isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v),
          f"{name} must be a sha256 in hex or null, not {v!r}"[:200])
    return v


def _runtime(d: dict, *, precision_optional: bool) -> tuple[str, str | None]:
    """A message's backend (a known one) and precision (one it has)."""
    backend = _str(d, "backend")
    _need(backend in backends.names(), f"backend must be one of {', '.join(backends.names())}, not {backend!r}")
    precision = _str(d, "precision", optional=precision_optional)
    try:
        backends.check_options(backend, precision)
    except NasqError as e:
        raise MessageError(str(e)) from None
    return backend, precision


def _dict(d, name: str) -> dict:
    _need(isinstance(d, dict), f"{name} must be an object, not {type(d).__name__}")
    return d


@dataclass(frozen=True)
class DatasetRef:
    root: str
    kind: str
    images: int
    fingerprint: str
    #: the sha256 of the listing and of every image's bytes (``nasq.data.digests``); its digest
    #: list is kept in Redis under this name. None: a run that checks the listing only.
    content: str | None = None
    #: the listing's fingerprint (names and sizes), which ``fingerprint`` was before runs named
    #: their bytes: runs of both kinds are compared by it
    listing: str | None = None

    KINDS = ("jpeg", "bin", "u8", "index")

    @classmethod
    def from_payload(cls, d) -> DatasetRef:
        d = _dict(d, "dataset")
        kind = _str(d, "kind")
        _need(kind in cls.KINDS, f"dataset.kind must be one of {', '.join(cls.KINDS)}, not {kind!r}"[:200])
        return cls(root=_str(d, "root"), kind=kind, images=_int(d, "images", low=1),
                   fingerprint=_str(d, "fingerprint"), content=_sha256(d, "content"),
                   listing=_str(d, "listing", optional=True))

    @property
    def is_index(self) -> bool:
        """An ``index:N`` dataset of the simulated backend: no files."""
        return self.kind == "index"

    def within(self, roots: Roots) -> DatasetRef:
        if self.is_index:
            _need(self.root == f"index:{self.images}", f"an index dataset is index:{self.images}, not {self.root!r}")
            return self
        return DatasetRef(roots.readable(self.root, "data folder"), self.kind, self.images, self.fingerprint,
                          self.content, self.listing)


@dataclass(frozen=True)
class OutputSpec:
    """Full logits per image in ais_bench's layout, written under ``dir``."""

    dir: str
    fmt: str = "NPY"

    @classmethod
    def from_payload(cls, d) -> OutputSpec | None:
        if d is None:
            return None
        d = _dict(d, "output")
        fmt = _str(d, "fmt").upper()
        _need(fmt in FORMATS, f"output.fmt must be one of {', '.join(FORMATS)}, not {fmt!r}")
        return cls(dir=_str(d, "dir"), fmt=fmt)

    def within(self, roots: Roots) -> OutputSpec:
        return OutputSpec(roots.writable(self.dir, "output folder"), self.fmt)


@dataclass(frozen=True)
class EvalJob:
    """What every shard of a run shares: data, labels, model, backend, batch size, precision,
    and the fingerprints of its inputs (the dataset's, the label file's and the weights' sha256),
    which every shard checks."""

    dataset: DatasetRef
    labels: str | None
    model: ModelRef
    backend: str
    batch_size: int
    precision: str | None = None
    output: OutputSpec | None = None
    labels_sha256: str | None = None

    def to_payload(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_payload(cls, d) -> EvalJob:
        d = _dict(d, "job")
        backend, precision = _runtime(d, precision_optional=True)
        model = _dict(d.get("model"), "model")
        _str(model, "weights")
        n = model.get("num_outputs")
        _need(n in (None, 1000, 1001), f"model.num_outputs must be 1000, 1001 or null, not {n!r}")
        _need(isinstance(model.get("options") or {}, dict), "model.options must be an object")
        _sha256(model, "sha256")
        labels = _str(d, "labels", optional=True)
        labels_sha256 = _sha256(d, "labels_sha256")
        _need(labels is not None or labels_sha256 is None, "labels_sha256 without labels")
        return cls(dataset=DatasetRef.from_payload(d.get("dataset")), labels=labels,
                   model=ModelRef.from_dict(model), backend=backend,
                   batch_size=_int(d, "batch_size", low=1, high=MAX_BATCH_SIZE),
                   precision=precision, output=OutputSpec.from_payload(d.get("output")), labels_sha256=labels_sha256)

    def within(self, roots: Roots) -> EvalJob:
        """This job with every path resolved and checked against the worker's roots.

        Raises:
            RootError: a path outside them, named with the roots.
        """
        from dataclasses import replace

        return replace(self, dataset=self.dataset.within(roots),
                       labels=None if self.labels is None else roots.readable(self.labels, "label file"),
                       model=replace(self.model, weights=roots.readable(self.model.weights, "weights")),
                       output=None if self.output is None else self.output.within(roots))


@dataclass(frozen=True)
class ShardTask:
    """One ``nasq.eval_shard`` message: images ``[start, stop)`` of the run's dataset."""

    run_id: str
    shard_id: str
    start: int
    stop: int
    job: EvalJob

    @classmethod
    def from_payload(cls, run_id, shard_id, start, stop, job) -> ShardTask:
        d = {"run_id": run_id, "shard_id": shard_id, "start": start, "stop": stop}
        task = cls(run_id=_name(d, "run_id"), shard_id=_name(d, "shard_id"), start=_int(d, "start"),
                   stop=_int(d, "stop", low=1), job=EvalJob.from_payload(job))
        _need(task.start < task.stop, f"start ({task.start}) must be below stop ({task.stop})")
        _need(task.stop - task.start <= MAX_SHARD_IMAGES,
              f"a shard holds at most {MAX_SHARD_IMAGES} images, not {task.stop - task.start}")
        _need(task.stop <= task.job.dataset.images,
              f"stop ({task.stop}) is past the dataset's {task.job.dataset.images} images")
        return task

    def args(self) -> tuple:
        return (self.run_id, self.shard_id, self.start, self.stop, self.job.to_payload())

    @property
    def argsrepr(self) -> str:
        """What Flower shows instead of the whole job."""
        return (f"run={self.run_id} {self.shard_id} images=[{self.start},{self.stop}) batch={self.job.batch_size} "
                f"backend={self.job.backend}")


@dataclass(frozen=True)
class SweepPoint:
    """One ``nasq.sweep_point`` message: a batch size on one worker, timed (bench) or evaluated (eval)."""

    sweep_id: str
    point_id: str
    folder: str
    worker: str
    batch_size: int
    mode: str
    backend: str
    precision: str
    weights: str
    data: str
    dataset_fingerprint: str
    labels: str | None = None
    images: int | None = None
    min_time_s: float = 2.0
    #: bench mode: the median of the last timing window within this % of the one before
    stability_pct: float = 5.0
    #: eval mode: the dataset's content (``DatasetRef.content``): every image scored is checked
    dataset_content: str | None = None

    MODES = ("bench", "eval")

    def to_payload(self) -> dict:
        return asdict(self)

    @classmethod
    def from_payload(cls, d) -> SweepPoint:
        d = _dict(d, "point")
        mode = _str(d, "mode")
        _need(mode in cls.MODES, f"mode must be one of {', '.join(cls.MODES)}, not {mode!r}")
        backend, precision = _runtime(d, precision_optional=False)
        images = None if d.get("images") is None else _int(d, "images", low=1, high=MAX_SHARD_IMAGES)
        t = d.get("min_time_s", 2.0)
        _need(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t <= 3600,
              f"min_time_s must be a number of seconds in (0, 3600], not {t!r}")
        stab = d.get("stability_pct", 5.0)
        _need(isinstance(stab, (int, float)) and not isinstance(stab, bool) and 0 < stab <= 100,
              f"stability_pct must be a percentage in (0, 100], not {stab!r}")
        return cls(sweep_id=_name(d, "sweep_id"), point_id=_str(d, "point_id"), folder=_str(d, "folder"),
                   worker=_str(d, "worker"), batch_size=_int(d, "batch_size", low=1, high=MAX_BATCH_SIZE), mode=mode,
                   backend=backend,
                   precision=precision, weights=_str(d, "weights"), data=_str(d, "data"),
                   dataset_fingerprint=_str(d, "dataset_fingerprint"), labels=_str(d, "labels", optional=True),
                   images=images, min_time_s=float(t), stability_pct=float(stab),
                   dataset_content=_sha256(d, "dataset_content"))

    @property
    def argsrepr(self) -> str:
        return f"sweep={self.sweep_id} {self.mode} bs={self.batch_size} on {self.worker}"

    def within(self, roots: Roots) -> SweepPoint:
        """This point with its paths resolved and checked against the worker's roots (RootError)."""
        from dataclasses import replace

        data = self.data if self.data.startswith("index:") else roots.readable(self.data, "data folder")
        return replace(self, folder=roots.writable(self.folder, "sweep folder"), data=data,
                       weights=roots.readable(self.weights, "weights"),
                       labels=None if self.labels is None else roots.readable(self.labels, "label file"))


# ------------------------------------------------------------------------------ run plans

def plan_shards(n_images: int, shard_size: int, batch_size: int) -> list[dict]:
    """Split ``range(n_images)`` into shards; sizes are rounded up to a multiple of the batch size
    so that every batch is the same in a distributed and a single-process run."""
    if n_images <= 0:
        return []
    size = max(batch_size, math.ceil(max(1, shard_size) / batch_size) * batch_size)
    return [{"shard_id": f"shard-{k:05d}", "start": s, "stop": min(s + size, n_images)}
            for k, s in enumerate(range(0, n_images, size))]


def plan_even(n_images: int, workers: int | None, batch_size: int, *, per_worker: int = 4,
              cap: int = 1000) -> list[dict]:
    """The default plan: ``per_worker`` shards for each worker (so a slow device does not hold
    the run) of at most ``cap`` images and at least a batch, split as evenly as batch-aligned
    boundaries allow, so that every worker has the same work and none idles at the end. Shard
    starts are multiples of the batch size: batches are those of a single-process run."""
    if n_images <= 0:
        return []
    k = max(1, workers or 8) * per_worker
    k = min(max(k, math.ceil(n_images / cap)), max(1, math.ceil(n_images / batch_size)))
    bounds = sorted({min(n_images, round(i * n_images / k / batch_size) * batch_size) for i in range(k)} | {n_images})
    return [{"shard_id": f"shard-{j:05d}", "start": a, "stop": b} for j, (a, b) in enumerate(zip(bounds, bounds[1:]))]


def sweep_point_task_id(sweep_id: str, point_id: str) -> str:
    """A sweep point's task id: a point measured again (a resumed sweep) has the same one."""
    return f"{sweep_id}:{point_id}"


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
