"""Evaluation tasks. Each is a view, as Celery's guide puts it: decode the payload, call one
library function, return a small JSON dict."""
from __future__ import annotations

import logging
import time

from nasq.inference.shard import run_shard
from nasq.perf.sweep import measure_point
from nasq.queue.app import TASK_EVAL_SHARD, TASK_MERGE, TASK_RUN_FAILED, TASK_SWEEP_POINT
from nasq.queue.messages import MessageError, ShardTask, SweepPoint
from nasq.results.run import MergeLater
from nasq.results.run import merge_run as finish_run
from workers.app import WorkerTask, app

log = logging.getLogger("nasq.worker")


@app.task(name=TASK_EVAL_SHARD, bind=True, base=WorkerTask)
def eval_shard(self, run_id, shard_id, start, stop, job) -> dict:
    """Evaluate images [start, stop) of the run's dataset; returns top-5 per image."""
    try:
        task = ShardTask.from_payload(run_id, shard_id, start, stop, job)
    except MessageError as e:  # reported in the result, so the chord still completes
        log.warning("refused a shard message: %s", e)
        return {"run_id": run_id, "shard_id": shard_id, "status": "error", "error": f"bad shard message: {e}"}
    return run_shard(task, ledger=self.store, resources=self.resources, worker=self.worker)


@app.task(name=TASK_MERGE, bind=True, base=WorkerTask, max_retries=None)
def merge_run(self, results: list, run_id: str, _first_try: float | None = None) -> dict:
    """Chord callback: validate the shard results and compute the report."""
    first_try = _first_try or time.time()
    try:
        return finish_run(run_id, results, store=self.store, report_dir=self.worker.settings.report_dir,
                          fetch_result=self.stored_result, merge_wait_s=self.worker.settings.merge_wait_s,
                          first_try=first_try)
    except MergeLater:
        raise self.retry(countdown=5, kwargs={"run_id": run_id, "_first_try": first_try}) from None


@app.task(name=TASK_RUN_FAILED)
def run_failed(request, exc, traceback, run_id: str | None = None) -> None:
    """Errback of the merge (unbound: Celery passes (request, exc, traceback) only to unbound
    errbacks): mark the run failed so waiting clients stop."""
    if run_id:
        WorkerTask.run_store().set_state(run_id, "failed", error=f"{type(exc).__name__}: {exc}")


@app.task(name=TASK_SWEEP_POINT, bind=True, base=WorkerTask)
def sweep_point(self, point: dict) -> dict:
    """One sweep point on this worker's device; the row is written to the sweep's folder."""
    return measure_point(SweepPoint.from_payload(point), resources=self.resources, worker=self.worker)
