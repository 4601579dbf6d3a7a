"""A run's manifest: the record a client writes when it submits a run, which every worker that
heals, resumes or merges the run reads back from Redis.

Its JSON is flat, as every release wrote it: the run's own fields, the ``EvalJob`` fields every
shard shares, and the shard plan. ``RunManifest.from_payload`` reads it and names the field
that is wrong; ``to_payload`` writes it back field for field. Manifests of releases that did
not yet record a field (``broker_id``, ``command``, ``request``, a shard's ``task_id``) read
with that field unset.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

from .. import __version__
from ..wire import (EvalJob, ShardTask, _dict, _int, _name, _need, _str, new_run_id, plan_even,
                    plan_shards, shard_task_id)

#: the job's fields, written at the manifest's top level
_JOB_FIELDS = ("dataset", "labels", "model", "backend", "batch_size", "precision", "output", "labels_sha256")


@dataclass(frozen=True)
class PlannedShard:
    """Images ``[start, stop)`` of the run's dataset, sent as the task ``task_id``."""

    shard_id: str
    start: int
    stop: int
    task_id: str

    @property
    def images(self) -> int:
        return self.stop - self.start

    def to_payload(self) -> dict:
        return {"shard_id": self.shard_id, "start": self.start, "stop": self.stop, "task_id": self.task_id}

    @classmethod
    def from_payload(cls, d, run_id: str) -> PlannedShard:
        shard_id = _name(_dict(d, "shard"), "shard_id")
        start, stop = _int(d, "start"), _int(d, "stop", low=1)
        _need(start < stop, f"shard {shard_id}: start ({start}) must be below stop ({stop})")
        task_id = d.get("task_id") or shard_task_id(run_id, shard_id)
        _need(isinstance(task_id, str), f"shard {shard_id}: task_id must be a string, not {task_id!r}"[:200])
        return cls(shard_id, start, stop, task_id)


@dataclass(frozen=True)
class RunManifest:
    """A submitted run: its job, the queue its shards go to and its shard plan, with where,
    when and by what it was submitted."""

    run_id: str
    queue: str
    job: EvalJob
    shards: tuple[PlannedShard, ...]
    created: float | None = None
    nasq_version: str | None = None
    submitted_from: str | None = None
    #: the broker server's run id at submission: healing tells a broker restart from a
    #: discarded message by it
    broker_id: str | None = None
    #: the command line that runs it again (for its report)
    command: tuple[str, ...] | None = None
    #: the evaluation as asked for (``request.EvalRequest.to_payload``): a record read by people
    #: and reports; workers read the job
    request: dict | None = None

    # ------------------------------------------------------------------ reading it

    @property
    def images(self) -> int:
        """The dataset's images (all of them, planned or not)."""
        return self.job.dataset.images

    @property
    def images_planned(self) -> int:
        return sum(s.images for s in self.shards)

    @property
    def shard_ids(self) -> list[str]:
        return [s.shard_id for s in self.shards]

    def shard_sizes(self) -> dict[str, int]:
        return {s.shard_id: s.images for s in self.shards}

    def only(self, shard_ids: Iterable[str]) -> RunManifest:
        """This manifest with only the named shards (in plan order)."""
        keep = set(shard_ids)
        return replace(self, shards=tuple(s for s in self.shards if s.shard_id in keep))

    def tasks(self, shards: Iterable[PlannedShard] | None = None) -> list[ShardTask]:
        """The shard messages of the whole plan, or of ``shards``."""
        return [ShardTask(self.run_id, s.shard_id, s.start, s.stop, self.job)
                for s in (self.shards if shards is None else shards)]

    # ------------------------------------------------------------------ making it

    @classmethod
    def plan(cls, job: EvalJob, *, queue: str, shard_size: int | None = None, workers: int | None = None,
             run_id: str | None = None, broker_id: str | None = None, command: list[str] | None = None,
             request: dict | None = None) -> RunManifest:
        """A new run of ``job`` on ``queue``: ``shard_size`` images a shard, or the even default
        plan for ``workers`` (``wire.plan_even``)."""
        job = EvalJob.from_payload(job.to_payload())  # refused here, before anything is recorded
        run_id = run_id or new_run_id()
        n = job.dataset.images
        plan = plan_shards(n, shard_size, job.batch_size) if shard_size else plan_even(n, workers, job.batch_size)
        return cls(run_id=run_id, queue=queue, job=job, created=time.time(), nasq_version=__version__,
                   submitted_from=os.uname().nodename, broker_id=broker_id,
                   command=None if command is None else tuple(command), request=request,
                   shards=tuple(PlannedShard(p["shard_id"], p["start"], p["stop"], shard_task_id(run_id, p["shard_id"]))
                                for p in plan))

    # ------------------------------------------------------------------ its JSON

    def to_payload(self) -> dict:
        return {"run_id": self.run_id, "created": self.created, "nasq_version": self.nasq_version,
                "queue": self.queue, "submitted_from": self.submitted_from, "broker_id": self.broker_id,
                "command": None if self.command is None else list(self.command), **self.job.to_payload(),
                "shards": [s.to_payload() for s in self.shards],
                **({"request": self.request} if self.request is not None else {})}

    @classmethod
    def from_payload(cls, d) -> RunManifest:
        """A manifest as stored; ``MessageError`` names the field that is wrong."""
        run_id = _name(_dict(d, "manifest"), "run_id")
        shards = d.get("shards")
        _need(isinstance(shards, list), f"shards must be a list, not {type(shards).__name__}")
        created = d.get("created")
        _need(created is None or isinstance(created, (int, float)) and not isinstance(created, bool),
              f"created must be a time in seconds or null, not {created!r}"[:200])
        command = d.get("command")
        _need(command is None or isinstance(command, list) and all(isinstance(a, str) for a in command),
              "command must be a list of strings or null")
        request = d.get("request")
        _need(request is None or isinstance(request, dict), "request must be an object or null")
        return cls(run_id=run_id, queue=_str(d, "queue"), job=EvalJob.from_payload({k: d.get(k) for k in _JOB_FIELDS}),
                   shards=tuple(PlannedShard.from_payload(s, run_id) for s in shards),
                   created=None if created is None else float(created),
                   nasq_version=_str(d, "nasq_version", optional=True),
                   submitted_from=_str(d, "submitted_from", optional=True),
                   broker_id=_str(d, "broker_id", optional=True),
                   command=None if command is None else tuple(command), request=request)

