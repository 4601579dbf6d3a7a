"""Evaluation tasks. Each is a view, as Celery's guide puts it: decode the payload, call one
library function, return a small JSON dict.

A copy of a shard that fails ends in FAILURE (so Flower and its metrics show it): it is
recorded in the run store first, and the shard is sent again for another worker unless it
failed for good (``nasq.inference.failover``); the FAILURE says which, and when the failure
excluded its worker from the run. A shard that failed for good fails the run once every shard
has ended: the chord's errback (``run_failed``), or the worker whose shard ended last, keeps the
partial report that ``nasq resume`` completes. A worker that may not take a shard (excluded
from the run, or it failed that shard) holds it for ``REFUSE_PAUSE_S`` and puts it back on the
queue untouched (REJECTED, requeued). A copy of a shard that was skipped or stopped (its run
ended, or another copy took over) ends in SUCCESS with that status: it is not a failure of the run.
A run's shards are sent with ``ignore_result`` (their results are in the run's ledger): Celery
stores a shard's failure only, and still counts every shard in its chord.
"""
from __future__ import annotations

import logging
import time

from celery.exceptions import Reject

from nasq.errors import ShardFailed
from nasq.roots import check_name
from nasq.inference.failover import REFUSE_PAUSE_S
from nasq.inference.shard import run_shard
from nasq.perf.sweep import measure_point
from nasq.wire import TASK_EVAL_SHARD, TASK_MERGE, TASK_RUN_FAILED, TASK_SWEEP_POINT, MessageError, ShardTask, SweepPoint
from nasq.results.publish import FINAL, ended_on_disk, publish_if_missing, render_if_missing, said_once
from nasq.results.ending import MergeLater, RunEnded, fail_run, finish_run
from nasq.runstate import RunState, ShardStatus
from workers.app import WorkerTask, app

log = logging.getLogger("nasq.worker")


@app.task(name=TASK_EVAL_SHARD, bind=True, base=WorkerTask, store_errors_even_if_ignored=True)
def eval_shard(self, run_id, shard_id, start, stop, job) -> dict:
    """Evaluate images [start, stop) of the run's dataset; returns a summary (the per-image
    results are kept in the run store)."""
    try:
        task = ShardTask.from_payload(run_id, shard_id, start, stop, job)
    except MessageError as e:
        log.warning("refused a shard message: %s", e)
        raise ShardFailed(f"bad shard message: {e}") from None
    queue = (self.request.delivery_info or {}).get("routing_key") or None
    final = ended_on_disk(self.worker.settings.report_dir, task.run_id)
    if final is not None and final.state in FINAL:  # write once: the report folder decides
        said_once(task.run_id, "run %s: it is %s and its report is published: its shards do not run again",
                  task.run_id, final.state)
        return {"run_id": task.run_id, "shard_id": task.shard_id, "status": ShardStatus.SKIPPED,
                "reason": f"the run is {final.state}: its report is published and final"}
    out = run_shard(task, ledger=self.store.ledger, resources=self.resources, worker=self.worker, queue=queue)
    if out.get("kept"):
        kept, shards, finished = out["kept_of"]
        if kept < shards <= finished:  # every shard has ended, some failed for good: fail the run now
            _fail(task.run_id, None)
        else:
            self.healer.merge_if_stranded(task.run_id, kept_of=(kept, shards))
    if out["status"] == ShardStatus.REFUSED:  # back on the queue, untouched, for another worker
        time.sleep(REFUSE_PAUSE_S)
        raise Reject(f"{task.shard_id} of run {task.run_id} put back for another worker: {out['reason']}", requeue=True)
    if out["status"] == ShardStatus.ERROR:
        if out.get("dispatches"):
            self.healer.resend(task, queue, out["dispatches"], why=f"failed on {self.worker.name}")
        settled = out.get("settled")
        if settled and settled[0] >= settled[1] and not settled[2]:  # every shard has ended: fail the run now
            _fail(task.run_id, None)
        raise ShardFailed(f"{task.shard_id} on {self.worker.name}: {out['error']}")
    # A summary: the full result (top-5 of every image) is in the run store, where the merge reads
    # it; the chord and Flower carry this much only.
    return {k: out[k] for k in ("run_id", "shard_id", "status", "reason", "kept", "worker", "device", "start", "stop")
            if k in out} | {"images": len(out.get("indices", [])), "errors": len(out.get("errors", [])),
                            "timing": out.get("timing")}


@app.task(name=TASK_MERGE, bind=True, base=WorkerTask, max_retries=None)
def merge_run(self, results: list, run_id: str, _first_try: float | None = None) -> dict:
    """Chord callback: validate the shard results, compute and store the report; returns its headline."""
    check_name(run_id, "run_id")
    now = time.time()  # the first try's time travels in the message: only a plausible one is used
    first_try = _first_try if isinstance(_first_try, (int, float)) and now - 86400 < _first_try <= now else now
    manifest = self.healer.manifest(run_id)  # with signing on: only a signed record
    if manifest is None:
        log.warning("run %s: no record to merge (gone, or refused)", run_id)
        return {"run_id": run_id, "merged": False}
    try:
        report = finish_run(run_id, results, store=self.store, report_dir=self.worker.settings.report_dir,
                            merge_wait_s=self.worker.settings.merge_wait_s, first_try=first_try, manifest=manifest)
    except MergeLater:
        self.healer.heal(run_id)  # a lost shard runs again
        raise self.retry(countdown=5, kwargs={"run_id": run_id, "_first_try": first_try}) from None
    except RunEnded as e:  # a second merge (the chord fired after a healing merge), or a cancelled run
        log.info("run %s: not merged again: it is %s and stays so", run_id, e.state)
        report_dir = self.worker.settings.report_dir
        publish_if_missing(self.store, run_id, manifest, report_dir)  # its merging worker died before either
        if e.state == RunState.DONE and render_if_missing(self.store, run_id, manifest, report_dir):
            log.info("run %s: its plots and HTML page rendered (its merging worker had gone before)", run_id)
        return {"run_id": run_id, "merged": False, "state": e.state}
    # The report is in the run store and the report dir; the chord, Flower and the log get its headline.
    headline = {"run_id": report.run_id, "images": report.images, "error_count": report.error_count,
                "top1": report.top1, "top5": report.top5, "throughput_img_s": report.throughput_img_s}
    log.info("run %s merged: %s images (%s unusable), top-1 %s%%, %s img/s", run_id, headline["images"],
             headline["error_count"], headline["top1"], headline["throughput_img_s"])
    return headline


@app.task(name=TASK_RUN_FAILED)
def run_failed(request, exc, traceback, run_id: str | None = None) -> None:
    """Errback of the merge (unbound: Celery passes (request, exc, traceback) only to unbound
    errbacks): a shard failed or the merge did. Keep what finished as a partial report and mark
    the run failed, so waiting clients stop and ``nasq resume`` can finish it."""
    if run_id and check_name(run_id, "run_id"):
        _fail(run_id, exc)


def _fail(run_id: str, exc) -> None:
    healer = WorkerTask.run_healer()
    manifest = healer.manifest(run_id)
    if manifest is not None:
        fail_run(run_id, exc, store=healer.store, report_dir=WorkerTask.configured().settings.report_dir,
                 manifest=manifest, lease_s=healer.lease_s,
                 redispatch=lambda m, ids: healer.redispatch(m, ids, why="revoked in flight (a broker restart)"))


@app.task(name=TASK_SWEEP_POINT, bind=True, base=WorkerTask)
def sweep_point(self, point: dict) -> dict:
    """One sweep point on this worker's device; the row is written to the sweep's folder."""
    return measure_point(SweepPoint.from_payload(point), resources=self.resources, worker=self.worker,
                         digest_list=self.store.runs.digest_list)
