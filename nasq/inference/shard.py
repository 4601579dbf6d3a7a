"""One shard of a run on this worker: the library function behind the ``nasq.eval_shard`` task.

A shard reports its failure in its result (``status: "error"``) instead of raising, because
a failed header task makes the chord drop every result. A worker *process* that dies
mid-shard is a requeue (late acks + reject on worker lost); the attempt counter in the run's
ledger stops a shard that always kills its worker from looping forever.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

from ..config import WorkerConfig
from ..data.outputs import OutputWriter
from ..errors import NasqError
from ..keepalive import every
from .evaluate import evaluate_range
from .resources import DeviceResources

if TYPE_CHECKING:
    from ..queue.messages import ShardTask

log = logging.getLogger("nasq.worker")


class ShardLedger(Protocol):
    """Where a run's shard bookkeeping goes (the Redis run store; a dict in unit tests)."""

    def state(self, run_id: str) -> dict | None: ...
    def take_lease(self, run_id: str, shard_id: str, holder: str, ttl_s: float) -> None: ...
    def renew_lease(self, run_id: str, shard_id: str, holder: str, ttl_s: float) -> bool: ...
    def drop_lease(self, run_id: str, shard_id: str, holder: str) -> None: ...
    def next_attempt(self, run_id: str, shard_id: str) -> int: ...
    def shard_started(self, run_id: str, shard_id: str, info: dict) -> None: ...
    def shard_progress(self, run_id: str, shard_id: str, done: int) -> None: ...
    def shard_finished(self, run_id: str, shard_id: str, summary: dict) -> None: ...
    def save_shard_result(self, run_id: str, shard_id: str, result: dict) -> None: ...
    def touch_worker(self, name: str, **fields) -> None: ...


def run_shard(task: ShardTask, *, ledger: ShardLedger, resources: DeviceResources, worker: WorkerConfig) -> dict:
    """Evaluate images ``[task.start, task.stop)`` of the run's dataset on this worker, under
    the shard's lease.

    Returns:
        A JSON-ready dict: the shard's identity, ``status`` ("ok"; "error" with ``error``;
        "skipped" for a late redelivery of a run already merged), and for "ok" the per-image
        top-5 of ``evaluate_range`` with timings and provenance.
    """
    job = task.job
    options = worker.backend_options(job.precision)
    base = {"run_id": task.run_id, "shard_id": task.shard_id, "start": task.start, "stop": task.stop,
            "worker": worker.name, "device": worker.device, "backend": worker.backend,
            "precision": options.precision}

    def failed(msg: str) -> dict:
        ledger.shard_finished(task.run_id, task.shard_id, {"status": "error", "error": msg, "worker": worker.name})
        ledger.touch_worker(worker.name, current=None)
        return {**base, "status": "error", "error": msg}

    try:  # every path in the message, resolved and checked against this worker's roots, first
        job = job.within(worker.roots)
    except NasqError as e:
        log.warning("shard %s of run %s refused: %s", task.shard_id, task.run_id, e)
        return failed(str(e))
    run_state = (ledger.state(task.run_id) or {}).get("state")
    if run_state in ("done", "cancelled"):
        log.info("shard %s of run %s: the run is %s; skipped", task.shard_id, task.run_id,
                 "already merged" if run_state == "done" else "cancelled")
        return {**base, "status": "skipped"}
    attempt = ledger.next_attempt(task.run_id, task.shard_id)
    if attempt > worker.settings.max_attempts:
        return failed(f"started {attempt - 1} times without finishing (its worker died each time); "
                      f"giving up after max_attempts={worker.settings.max_attempts}")
    n = task.stop - task.start
    with _lease(ledger, task, f"{worker.name}#{attempt}", worker.settings.lease_s):
        ledger.shard_started(task.run_id, task.shard_id, {"worker": worker.name, "device": worker.device, "images": n})
        ledger.touch_worker(worker.name, current={"run_id": task.run_id, "shard_id": task.shard_id, "images": n,
                                                  "since": time.time()})
        try:
            if worker.backend != job.backend:
                raise NasqError(f"this worker runs backend {worker.backend!r} but the run asked for "
                                f"{job.backend!r}; start a worker with --backend {job.backend} on the run's queue")
            source = resources.source_for(job.dataset.root, job.dataset.fingerprint)
            if task.stop > len(source):
                raise NasqError(f"images [{task.start}, {task.stop}) are past the {len(source)} images of "
                                f"{job.dataset.root}")
            labels = resources.labels_for(job.labels)
            backend = resources.backend_for(worker.backend, job.model, job.batch_size, options)
            load_s = resources.last_load_s  # 0 when the model was already loaded
            writer = OutputWriter(job.output.dir, job.output.fmt) if job.output else None
            latencies: list[float] = []
            result = evaluate_range(source, backend, task.start, task.stop, batch_size=job.batch_size,
                                    labels=labels, writer=writer, loader_threads=worker.decode_threads,
                                    latencies=latencies,
                                    on_batch=lambda done: ledger.shard_progress(task.run_id, task.shard_id, done))
        except Exception as e:  # noqa: BLE001 - recorded, then reported by the task
            log.exception("shard %s of run %s failed", task.shard_id, task.run_id)
            return failed(f"{type(e).__name__}: {e}")
        out = {**base, "status": "ok", **result, "versions": backend.versions(), "model_info": backend.model_info,
               "device_name": backend.describe_device(), "latency_ms": [round(x, 3) for x in latencies],
               "load_s": round(load_s, 3)}
        labelled = [(lab, ids) for lab, ids in zip(result["labels"], result["top5"]) if lab is not None]
        summary = {"status": "ok", "worker": worker.name, "device": worker.device, "images": len(result["indices"]),
                   "errors": len(result["errors"]), **result["timing"], "labelled": len(labelled),
                   "top1_correct": sum(1 for lab, ids in labelled if ids[:1] == [lab])}
        ledger.save_shard_result(task.run_id, task.shard_id, out)
        ledger.shard_finished(task.run_id, task.shard_id, summary)
    wall = summary["wall_s"]
    log.info("%s of run %s: %d images (%d unusable) in %.1f s, %.1f img/s on %s", task.shard_id, task.run_id,
             summary["images"], summary["errors"], wall, summary["images"] / wall if wall else 0.0, worker.device)
    ledger.touch_worker(worker.name, current=None, last_rate_img_s=summary["images"] / wall if wall else None)
    return out


@contextmanager
def _lease(ledger: ShardLedger, task: ShardTask, holder: str, ttl_s: float):
    """Hold the shard's lease while the body runs, renewed every ttl_s / 3 by a thread (the
    device work keeps the main thread busy). A worker that dies stops renewing it."""
    ledger.take_lease(task.run_id, task.shard_id, holder, ttl_s)
    try:
        with every(ttl_s / 3, lambda: ledger.renew_lease(task.run_id, task.shard_id, holder, ttl_s),
                   what=f"the lease of {task.shard_id}"):
            yield
    finally:
        ledger.drop_lease(task.run_id, task.shard_id, holder)
