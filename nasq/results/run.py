"""The end of a run: the library functions behind the chord callback ``nasq.merge_run``, its
errback ``nasq.run_failed`` and ``nasq cancel``.

Each ends the run through one transition of the run store (``store.transition``: merge, fail,
cancel), which checks the run's state atomically, so that a run is merged once, a cancelled
run stays cancelled and a failed one is changed again only by ``nasq resume``. The report
files are written first, in a staging folder beside the run's, and moved into place only by
the caller whose transition took effect: the report a client gets, the one in Redis and the
files on disk are the same report.
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import sqlite3
import time
from typing import Callable

from ..errors import NasqError, RunError
from ..roots import check_name
from ..runstate import RunState
from .history import record, row_of
from .merge import MissingShards, merge, merge_partial, ok_results
from .run_files import write_later_files, write_run_files

log = logging.getLogger("nasq.worker")


class MergeLater(Exception):
    """A shard the merge needs is still running somewhere (a redelivered one): try again soon."""


class RunEnded(NasqError):
    """The run ended before this merge or failure could change it (``state``): left as it is."""

    def __init__(self, run_id: str, state: str | None):
        super().__init__(f"run {run_id} is {state or 'gone'}; left as it is")
        self.state = state


def merge_run(run_id: str, results: list, *, store, report_dir: str, merge_wait_s: float, first_try: float,
              manifest: dict | None = None) -> dict:
    """Validate the shard results of ``run_id``, write and record its report.

    Args:
        results: what the chord handed over: summaries (each shard's kept result is in the run
            store, however it was delivered) or, from a caller that has them, full results, used
            for shards the store has none of.
        store: the run store. Copies of a shard dropped by the store (late, duplicate) are in the
            report's ``duplicate_shard_results_dropped``.
        first_try: when the first attempt at this merge ran; a merge that still misses a
            running shard raises ``MergeLater`` until ``merge_wait_s`` have passed.
        manifest: the run's manifest, as the caller trusts it (default: the store's).

    Raises:
        MergeLater: retry in a few seconds.
        RunEnded: the run is already done, failed or cancelled: nothing was changed.
        RunError: missing or failed shards (the run is marked failed, with a partial report).
    """
    manifest = manifest or store.manifest(run_id)
    if manifest is None:
        raise RunError(f"run {run_id}: its manifest is gone from Redis (expired or flushed)")
    if manifest.get("run_id") != run_id:
        raise RunError(f"run {run_id}: its manifest names another run")
    state = (store.state(run_id) or {}).get("state")
    if state not in (RunState.SUBMITTED, RunState.RUNNING):
        raise RunEnded(run_id, state)
    full = dict(store.shard_results(run_id))
    for r in results or []:
        if isinstance(r, dict) and r.get("run_id") == run_id and r.get("status") == "ok" and "indices" in r:
            full.setdefault(r["shard_id"], r)
    results = list(full.values())
    try:
        report, predictions = merge(manifest, results)
    except MissingShards as e:
        # a missing shard that did not fail is on its way (running, queued, or being healed): wait
        # for it, up to merge_wait_s
        finished = store.finished(run_id)
        if any(finished.get(sid, {}).get("status") != "error" for sid in e.missing) \
                and time.time() - first_try < merge_wait_s:
            raise MergeLater(str(e)) from None
        mark_failed(store, manifest, results, e, report_dir)
        raise
    except NasqError as e:
        mark_failed(store, manifest, results, e, report_dir)
        raise
    report["duplicate_shard_results_dropped"] = sorted(sid for sid, n in store.dropped(run_id).items()
                                                       for _ in range(n))
    report["redispatched_shards"] = store.redispatched(run_id)
    report.update(failover_fields(store, run_id))
    if not _end(store, "merge", manifest, results, report, predictions, report_dir, images=report["images"],
                top1=report["top1"], top5=report["top5"], throughput_img_s=report["throughput_img_s"]):
        raise RunEnded(run_id, (store.state(run_id) or {}).get("state"))
    return report


def fail_run(run_id: str, error: BaseException | None, *, store, report_dir: str,
             redispatch: Callable[[dict, dict[str, int]], None], manifest: dict | None = None,
             lease_s: float = 30.0) -> None:
    """The chord's errback (a shard failed, or was revoked in flight: a broker that went away),
    and the end of a run whose shards all ended, some for good without a result.

    Shards only lost in flight (no result, no recorded failure, not running, not sent again
    within a lease) go to ``redispatch(manifest, {shard id: dispatch count})``: the run heals.
    While any shard is on its way (running, sent again within a lease, or failed on a device and
    sent again for another: ``nasq.inference.failover``) nothing happens: the shard that ends
    last fails or merges the run, so that its partial report holds everything that could be
    evaluated. Then: every shard has its result, the run is merged; some failed for good, the
    run is marked failed with a partial report naming them. A run that ended meanwhile is left
    as it is.
    """
    manifest = manifest or store.manifest(run_id)
    if manifest is None or (store.state(run_id) or {}).get("state") not in (RunState.SUBMITTED, RunState.RUNNING):
        return
    finished, stored, running = store.finished(run_id), store.shard_results(run_id), store.running(run_id)
    recent = {sid for sid, t in store.redispatched_at(run_id).items() if time.time() - t < lease_s}
    retrying = set(store.failures(run_id))  # failed somewhere, sent again (unless finished with an error)
    results, in_flight, busy = [], [], False
    for s in manifest["shards"]:
        sid = s["shard_id"]
        if sid in stored:
            results.append(stored[sid])
        elif finished.get(sid, {}).get("status") == "error":
            results.append({"run_id": run_id, "shard_id": sid, **finished[sid]})
        elif sid in running or sid in recent or sid in retrying:
            busy = True  # under way (a resume, healing or a failover sent it): its result is still to come
        else:
            in_flight.append(sid)
    if in_flight:  # not a failure of the run: it heals (and ends once they do)
        redispatch(manifest, {sid: n for sid in in_flight if (n := store.claim_lost(run_id, sid, running=False))})
        return
    if busy:
        return  # on its way: the shard that ends last ends the run
    if all(r.get("status") == "ok" for r in results):  # every shard finished after all: the run is done
        try:
            merge_run(run_id, [], store=store, report_dir=report_dir, merge_wait_s=0, first_try=time.time(),
                      manifest=manifest)
        except RunEnded:
            pass
        return
    try:
        merge(manifest, results)
        reason: Exception = RunError(f"run {run_id}: {type(error).__name__}: {error}")
    except NasqError as e:  # names the failed or missing shards
        reason = e
    mark_failed(store, manifest, results, reason, report_dir)


def mark_failed(store, manifest: dict, results: list, error: Exception, report_dir: str) -> bool:
    """Mark the run failed, keeping what it finished: a report over its finished shards (files
    too) that names the failed ones, so that ``nasq resume`` reruns only the rest. False if the
    run had ended meanwhile."""
    run_id = manifest["run_id"]
    if (store.state(run_id) or {}).get("state") not in (RunState.SUBMITTED, RunState.RUNNING):
        return False  # ended meanwhile (the transition below would refuse too): nothing to write
    text = f"{error} -- `nasq resume {run_id}` reruns only the failed or missing shards"
    report, predictions = merge_partial(manifest, results, text, state=str(RunState.FAILED),
                                        failures=shard_failures(store, run_id))
    report.update(failover_fields(store, run_id))
    return _end(store, "fail", manifest, results, report, predictions, report_dir, partial=True, error=text)


def failover_fields(store, run_id: str) -> dict:
    """The report's record of devices that failed: ``excluded_devices`` (each worker excluded
    from the run: when, why, after how many failed shards in a row, whether a resume lifted it)
    and ``shard_failures`` (each shard that failed on some device, with every failed copy:
    worker, device, error, when; the shard then ran elsewhere unless it is in shards_failed)."""
    excluded = sorted(store.exclusions(run_id).values(), key=lambda e: e.get("at") or 0)
    return {"excluded_devices": excluded, "shard_failures": store.failures(run_id)}


def shard_failures(store, run_id: str) -> dict[str, dict]:
    """Shard id -> {reason, worker, attempts} of the shards that failed or were started, from
    the run's ledger (the reasons workers recorded, the attempts the claims counted)."""
    attempts, finished, running = store.attempts(run_id), store.finished(run_id), store.running(run_id)
    out = {}
    for sid in set(attempts) | set(finished) | set(running):
        rec = finished.get(sid) or {}
        if rec.get("status") == "ok":
            continue
        where = rec or running.get(sid) or {}
        worker = where.get("worker")
        host = where.get("host")
        reason = rec.get("error") or ("running when the run ended" if sid in running else
                                      "started, but its worker went away before it finished")
        out[sid] = {"reason": reason, "worker": f"{worker} ({host}/{where.get('device')})" if host else worker,
                    "attempts": attempts.get(sid, 0)}
    return out


def cancel_run(store, run_id: str, report_dir: str, *, manifest: dict | None = None,
               after_cancel: Callable[[], None] = lambda: None) -> dict:
    """Cancel a run: the transition first (running shards stop on their next progress, late
    results are dropped, no merge changes it afterwards), then ``after_cancel()`` (revoke its
    tasks), then what finished is kept as a partial report (files and Redis) naming the shards
    that did not finish. Returns that report.

    Raises:
        RunError: no such run, or a run that already ended.
    """
    manifest = manifest or store.manifest(run_id)
    if manifest is None:
        raise NasqError(f"no run {run_id!r} in this Redis (runs expire after result_expires)")
    failures = shard_failures(store, run_id)  # before the cancel clears the running shards
    ok, state = store.transition(run_id, "cancel", clear_running=True, error=f"run {run_id} was cancelled")
    if not ok:
        raise NasqError(f"run {run_id} already ended ({state}); nothing to cancel")
    after_cancel()
    stored = store.shard_results(run_id)
    results = [stored[s["shard_id"]] for s in manifest["shards"] if s["shard_id"] in stored]
    for f in failures.values():
        if f["reason"] == "running when the run ended":
            f["reason"] = "stopped by the cancel"
    report, predictions = merge_partial(manifest, results, f"run {run_id} was cancelled",
                                        state=str(RunState.CANCELLED), failures=failures)
    report.update(failover_fields(store, run_id))
    staging = _write(manifest, results, report, predictions, report_dir)
    try:
        store.save_report_of_ended(run_id, report, predictions)
    except BaseException:
        _discard(staging)
        raise
    _publish(store, run_id, staging, report_dir)
    _history(store, report_dir, row_of(manifest, str(RunState.CANCELLED), report))
    return report


def _end(store, transition: str, manifest: dict, results: list, report: dict, predictions: dict, report_dir: str,
         **fields) -> bool:
    """Write the report's files into a staging folder, end the run through ``transition`` with
    the report, then move the files into place and record the run in the history: all of it
    only if the transition took effect (False otherwise, and nothing is left on disk). A merge
    renders the plots and the HTML page last, once the client has the numbers (the report
    names them already, in ``files_to_come``)."""
    run_id = manifest["run_id"]
    later = transition == "merge"
    staging = _write(manifest, results, report, predictions, report_dir, later=later)
    try:
        ok, _ = store.transition(run_id, transition, report=report, predictions=predictions, **fields)
    except BaseException:
        _discard(staging)
        raise
    if not ok:
        _discard(staging)
        return False
    _publish(store, run_id, staging, report_dir)
    _history(store, report_dir, row_of(manifest, str(RunState.DONE if transition == "merge" else RunState.FAILED),
                                       report, fields.get("error")))
    store.mark_published(run_id)
    if later:
        render_later(store, manifest, results, report, report_dir)
    else:
        store.mark_rendered(run_id)
    return True


def render_later(store, manifest: dict, results: list, report: dict, report_dir: str) -> bool:
    """Render a done run's plots and HTML page into its folder, if this worker gets the claim to
    (``store.claim_render``), and record what could not be written (``mark_rendered``)."""
    if not store.claim_render(manifest["run_id"]):
        return False
    store.mark_rendered(manifest["run_id"], _write_later(manifest, results, report, report_dir))
    return True


def render_if_missing(store, run_id: str, manifest: dict, report_dir: str) -> bool:
    """A done run whose plots and HTML page were never rendered (its merging worker died after
    storing the numbers, or was stopped): render them now, from the stored report and results.
    True if this call rendered them."""
    report = store.report(run_id)
    if not report or not report.get("files_to_come") or store.rendered(run_id):
        return False
    return render_later(store, manifest, list(store.shard_results(run_id).values()), report, report_dir)


def _write(manifest: dict, results: list, report: dict, predictions: dict, report_dir: str, *,
           later: bool = False) -> str:
    """The report files in a staging folder (named as they will be once moved); returns it. A
    file that could not be written is in ``report["files_not_written"]``. ``later``: without the
    plots and the HTML page (``_write_later``)."""
    run_id = check_name(manifest["run_id"], "run_id")  # the folder's name: never a path
    staging = os.path.join(report_dir, ".staging", f"{run_id}.{secrets.token_hex(4)}")
    write_run_files(report, _shard_timings(manifest, results), staging, predictions,
                    final_folder=os.path.join(report_dir, run_id), later=later)
    if report["files_not_written"]:
        log.warning("run %s: could not write %s in %s: %s", run_id, ", ".join(report["files_not_written"]),
                    os.path.join(report_dir, run_id), next(iter(report["files_not_written"].values())))
    return staging


def _write_later(manifest: dict, results: list, report: dict, report_dir: str) -> dict[str, str]:
    """The plots and the HTML page of a done run, rendered into its folder after the client got
    its numbers; returns file name -> reason for those not written (the report, which the
    client has, is never changed: the run's ``rendered`` record says it)."""
    run_id = manifest["run_id"]
    try:
        failed = write_later_files(report, _shard_timings(manifest, results), os.path.join(report_dir, run_id))
    except Exception as e:  # noqa: BLE001 - the run is done and its numbers kept: say it, do not fail the merge
        log.exception("run %s: could not render its plots and HTML page", run_id)
        failed = {os.path.basename(report["files"][k]): f"{type(e).__name__}: {e}" for k in report["files_to_come"]}
    if failed:
        log.warning("run %s: could not write %s in %s: %s", run_id, ", ".join(failed),
                    os.path.join(report_dir, run_id), next(iter(failed.values())))
    return failed


def _publish(store, run_id: str, staging: str, report_dir: str) -> None:
    """Move the staging folder to ``report_dir/<run id>`` (replacing an earlier partial report's)."""
    if not os.path.isdir(staging):
        return
    final = os.path.join(report_dir, run_id)
    old = f"{staging}.old"
    try:
        if os.path.isdir(final):
            os.replace(final, old)
        try:
            os.replace(staging, final)
        except OSError:
            if os.path.isdir(old):  # put the earlier report back
                os.replace(old, final)
            raise
    except OSError as e:
        log.warning("run %s: could not move its report files into %s: %s", run_id, final, e)
        store.add_note(run_id, "files", f"the report files could not be moved into {final}: {e}")
    shutil.rmtree(old, ignore_errors=True)
    _discard(staging)


def _discard(staging: str) -> None:
    """Remove a staging folder, and the staging area if it is empty."""
    shutil.rmtree(staging, ignore_errors=True)
    try:
        os.rmdir(os.path.dirname(staging))
    except OSError:  # not empty (another run's staging), or gone
        pass


def _history(store, report_dir: str, row: dict) -> None:
    try:
        record(report_dir, row)
    except (OSError, sqlite3.Error) as e:  # the report is in Redis and its folder all the same
        log.warning("run %s: could not update the run history in %s: %s", row["run_id"], report_dir, e)
        store.add_note(row["run_id"], "history",
                       f"the run history {os.path.join(report_dir, 'runs.sqlite')} was not updated: {e}")


def _shard_timings(manifest: dict, results: list) -> list[dict]:
    return [{"worker": r["worker"], "host": r.get("host"), "device": r["device"], "images": len(r["indices"]),
             **r["timing"]}
            for r in ok_results(manifest, results)]
