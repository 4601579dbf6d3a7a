"""Evaluation tasks. Each is a view, as Celery's guide puts it: decode the payload, call one
library function, return a small JSON dict.

A shard that fails ends in FAILURE (so Flower and its metrics show it): it is recorded in the
run store first, and the chord's errback (``run_failed``) keeps the partial report that
``nasq resume`` completes.
"""
from __future__ import annotations

import logging
import time

from nasq.errors import ShardFailed
from nasq.roots import check_name
from nasq.inference.shard import run_shard
from nasq.perf.sweep import measure_point
from nasq.queue.app import TASK_EVAL_SHARD, TASK_MERGE, TASK_RUN_FAILED, TASK_SWEEP_POINT
from nasq.queue.healing import heal, merge_if_stranded, redispatch
from nasq.queue.messages import MessageError, ShardTask, SweepPoint
from nasq.results.run import MergeLater, fail_run
from nasq.results.run import merge_run as finish_run
from workers.app import WorkerTask, app

log = logging.getLogger("nasq.worker")


@app.task(name=TASK_EVAL_SHARD, bind=True, base=WorkerTask)
def eval_shard(self, run_id, shard_id, start, stop, job) -> dict:
    """Evaluate images [start, stop) of the run's dataset; returns top-5 per image."""
    try:
        task = ShardTask.from_payload(run_id, shard_id, start, stop, job)
    except MessageError as e:
        log.warning("refused a shard message: %s", e)
        raise ShardFailed(f"bad shard message: {e}") from None
    out = run_shard(task, ledger=self.store, resources=self.resources, worker=self.worker)
    merge_if_stranded(self.app, self.store, task.run_id)
    if out["status"] == "error":
        raise ShardFailed(f"{task.shard_id} on {self.worker.name}: {out['error']}")
    # A summary: the full result (top-5 of every image) is in the run store, where the merge reads
    # it; the chord and Flower carry this much only.
    return {k: out[k] for k in ("run_id", "shard_id", "status", "worker", "device", "start", "stop") if k in out} | {
        "images": len(out.get("indices", [])), "errors": len(out.get("errors", [])), "timing": out.get("timing")}


@app.task(name=TASK_MERGE, bind=True, base=WorkerTask, max_retries=None)
def merge_run(self, results: list, run_id: str, _first_try: float | None = None) -> dict:
    """Chord callback: validate the shard results, compute and store the report; returns its headline."""
    check_name(run_id, "run_id")
    now = time.time()  # the first try's time travels in the message: only a plausible one is used
    first_try = _first_try if isinstance(_first_try, (int, float)) and now - 86400 < _first_try <= now else now
    try:
        report = finish_run(run_id, results, store=self.store, report_dir=self.worker.settings.report_dir,
                            merge_wait_s=self.worker.settings.merge_wait_s, first_try=first_try)
    except MergeLater:
        heal(self.app, self.store, run_id, lease_s=self.worker.settings.lease_s)  # a lost shard runs again
        raise self.retry(countdown=5, kwargs={"run_id": run_id, "_first_try": first_try}) from None
    # The report is in the run store and the report dir; the chord, Flower and the log get its headline.
    headline = {k: report.get(k) for k in ("run_id", "images", "error_count", "top1", "top5", "throughput_img_s")}
    log.info("run %s merged: %s images (%s unusable), top-1 %s%%, %s img/s", run_id, headline["images"],
             headline["error_count"], headline["top1"], headline["throughput_img_s"])
    return headline


@app.task(name=TASK_RUN_FAILED)
def run_failed(request, exc, traceback, run_id: str | None = None) -> None:
    """Errback of the merge (unbound: Celery passes (request, exc, traceback) only to unbound
    errbacks): a shard failed or the merge did. Keep what finished as a partial report and mark
    the run failed, so waiting clients stop and ``nasq resume`` can finish it."""
    if run_id and check_name(run_id, "run_id"):
        store = WorkerTask.run_store()
        fail_run(run_id, exc, store=store, report_dir=WorkerTask.configured().settings.report_dir,
                 redispatch=lambda manifest, ids: redispatch(app, manifest, ids, why="revoked in flight"))


@app.task(name=TASK_SWEEP_POINT, bind=True, base=WorkerTask)
def sweep_point(self, point: dict) -> dict:
    """One sweep point on this worker's device; the row is written to the sweep's folder."""
    return measure_point(SweepPoint.from_payload(point), resources=self.resources, worker=self.worker)
