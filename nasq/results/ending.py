"""The end of a run: the library functions behind the chord callback ``nasq.merge_run``, its
errback ``nasq.run_failed`` and ``nasq cancel``.

Each ends the run through one transition of the run store (``store.runs.transition``: merge, fail,
cancel), which checks the run's state atomically, so that a run is merged once, a cancelled
run stays cancelled and a failed one is changed again only by ``nasq resume``. The report
files are written first, in a staging folder beside the run's, and moved into place only by
the caller whose transition took effect: the report a client gets, the one in Redis and the
files on disk are the same report.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from typing import Callable

from ..errors import NasqError, RunError
from ..rundata import Report, RunManifest
from ..wire import MessageError
from ..runstate import RunState, ShardStatus, Transition, ends_in, may
from ..files import read_json
from .merge import MissingShards, merge, merge_partial
from .publish import (CLAIM_S, FINAL, discard, ended_on_disk, holding_publish, publish, render_later, said_once,
                      write_staging)

log = logging.getLogger("nasq.worker")


class MergeLater(Exception):
    """A shard the merge needs is still running somewhere (a redelivered one): try again soon."""


class RunEnded(NasqError):
    """The run ended before this merge or failure could change it (``state``): left as it is."""

    def __init__(self, run_id: str, state: str | None):
        super().__init__(f"run {run_id} is {state or 'gone'}; left as it is")
        self.state = state


def finish_run(run_id: str, results: list, *, store, report_dir: str, merge_wait_s: float, first_try: float,
              manifest: RunManifest | None = None) -> Report:
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
    final = refuse_if_final(store, run_id, report_dir)
    if final is not None:
        raise RunEnded(run_id, final)
    manifest = manifest or store.runs.manifest(run_id)
    if manifest is None:
        raise RunError(f"run {run_id}: its manifest is gone from Redis (expired or flushed)")
    if manifest.run_id != run_id:
        raise RunError(f"run {run_id}: its manifest names another run")
    state = (store.runs.state(run_id) or {}).get("state")
    if not may(Transition.MERGE, state):
        raise RunEnded(run_id, state)
    full = dict(store.ledger.shard_results(run_id))
    for r in results or []:
        if isinstance(r, dict) and r.get("run_id") == run_id and r.get("status") == ShardStatus.OK and "indices" in r:
            full.setdefault(r["shard_id"], r)
    results = list(full.values())
    try:
        report, predictions = merge(manifest, results)
    except MissingShards as e:
        # a missing shard that did not fail is on its way (running, queued, or being healed): wait
        # for it, up to merge_wait_s
        finished = store.ledger.finished(run_id)
        if any(finished.get(sid, {}).get("status") != ShardStatus.ERROR for sid in e.missing) \
                and time.time() - first_try < merge_wait_s:
            raise MergeLater(str(e)) from None
        mark_failed(store, manifest, results, e, report_dir)
        raise
    except NasqError as e:
        mark_failed(store, manifest, results, e, report_dir)
        raise
    dropped = tuple(sorted(sid for sid, n in store.ledger.dropped(run_id).items() for _ in range(n)))
    report = replace(report, duplicate_shard_results_dropped=dropped, redispatched_shards=store.ledger.redispatched(run_id),
                     **failover_fields(store, run_id))
    ended = _end(store, Transition.MERGE, manifest, results, report, predictions, report_dir, images=report.images,
                 top1=report.top1, top5=report.top5, throughput_img_s=report.throughput_img_s)
    if ended is None:
        raise RunEnded(run_id, (store.runs.state(run_id) or {}).get("state"))
    return ended


def fail_run(run_id: str, error: BaseException | None, *, store, report_dir: str,
             redispatch: Callable[[RunManifest, dict[str, int]], None], manifest: RunManifest | None = None,
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
    if refuse_if_final(store, run_id, report_dir) is not None:
        return
    manifest = manifest or store.runs.manifest(run_id)
    if manifest is None or not may(Transition.FAIL, (store.runs.state(run_id) or {}).get("state")):
        return
    finished, stored, running = store.ledger.finished(run_id), store.ledger.shard_results(run_id), store.ledger.running(run_id)
    recent = {sid for sid, t in store.ledger.redispatched_at(run_id).items() if time.time() - t < lease_s}
    retrying = set(store.ledger.failures(run_id))  # failed somewhere, sent again (unless finished with an error)
    results, in_flight, busy = [], [], False
    for sid in manifest.shard_ids:
        if sid in stored:
            results.append(stored[sid])
        elif finished.get(sid, {}).get("status") == ShardStatus.ERROR:
            results.append({"run_id": run_id, "shard_id": sid, **finished[sid]})
        elif sid in running or sid in recent or sid in retrying:
            busy = True  # under way (a resume, healing or a failover sent it): its result is still to come
        else:
            in_flight.append(sid)
    if in_flight:  # not a failure of the run: it heals (and ends once they do)
        redispatch(manifest, {sid: n for sid in in_flight if (n := store.ledger.claim_lost(run_id, sid, running=False))})
        return
    if busy:
        return  # on its way: the shard that ends last ends the run
    if all(r.get("status") == ShardStatus.OK for r in results):  # every shard finished after all: the run is done
        try:
            finish_run(run_id, [], store=store, report_dir=report_dir, merge_wait_s=0, first_try=time.time(),
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


def mark_failed(store, manifest: RunManifest, results: list, error: Exception, report_dir: str) -> bool:
    """Mark the run failed, keeping what it finished: a report over its finished shards (files
    too) that names the failed ones, so that ``nasq resume`` reruns only the rest. False if the
    run had ended meanwhile."""
    run_id = manifest.run_id
    if not may(Transition.FAIL, (store.runs.state(run_id) or {}).get("state")):
        return False  # ended meanwhile (the transition below would refuse too): nothing to write
    text = f"{error} -- `nasq resume {run_id}` reruns only the failed or missing shards"
    report, predictions = merge_partial(manifest, results, text, state=str(RunState.FAILED),
                                        failures=shard_failures(store, run_id))
    report = replace(report, **failover_fields(store, run_id))
    return _end(store, Transition.FAIL, manifest, results, report, predictions, report_dir, partial=True,
                error=text) is not None


def failover_fields(store, run_id: str) -> dict:
    """The report's record of devices that failed: ``excluded_devices`` (each worker excluded
    from the run: when, why, after how many failed shards in a row, whether a resume lifted it)
    and ``shard_failures`` (each shard that failed on some device, with every failed copy:
    worker, device, error, when; the shard then ran elsewhere unless it is in shards_failed)."""
    excluded = sorted(store.ledger.exclusions(run_id).values(), key=lambda e: e.get("at") or 0)
    return {"excluded_devices": tuple(excluded), "shard_failures": store.ledger.failures(run_id)}


def shard_failures(store, run_id: str) -> dict[str, dict]:
    """Shard id -> {reason, worker, attempts} of the shards that failed or were started, from
    the run's ledger (the reasons workers recorded; the attempts: the starts that never ended,
    as the claims counted them, and the copies that failed on a device)."""
    attempts, finished, running = store.ledger.attempts(run_id), store.ledger.finished(run_id), store.ledger.running(run_id)
    failed = {sid: sum(1 for f in fs if f.get("kind", "device") == "device") for sid, fs in store.ledger.failures(run_id).items()}
    out = {}
    for sid in set(attempts) | set(finished) | set(running):
        rec = finished.get(sid) or {}
        if rec.get("status") == ShardStatus.OK:
            continue
        where = rec or running.get(sid) or {}
        worker = where.get("worker")
        host = where.get("host")
        reason = rec.get("error") or ("running when the run ended" if sid in running else
                                      "started, but its worker went away before it finished")
        out[sid] = {"reason": reason, "worker": f"{worker} ({host}/{where.get('device')})" if host else worker,
                    "attempts": max(0, attempts.get(sid, 0)) + failed.get(sid, 0)}
    return out


def cancel_run(store, run_id: str, report_dir: str, *, manifest: RunManifest | None = None,
               after_cancel: Callable[[], None] = lambda: None) -> dict:
    """Cancel a run: the transition first (running shards stop on their next progress, late
    results are dropped, no merge changes it afterwards), then ``after_cancel()`` (revoke its
    tasks), then what finished is kept as a partial report (files and Redis) naming the shards
    that did not finish. Returns that report.

    Raises:
        RunError: no such run, or a run that already ended.
    """
    final = refuse_if_final(store, run_id, report_dir)
    if final is not None:
        raise NasqError(f"run {run_id} already ended ({final}); its report is published in "
                        f"{os.path.join(report_dir, run_id)} and is never changed")
    manifest = manifest or store.runs.manifest(run_id)
    if manifest is None:
        raise NasqError(f"no run {run_id!r} in this Redis (runs expire after result_expires)")
    failures = shard_failures(store, run_id)  # before the cancel clears the running shards
    ok, state = store.runs.transition(run_id, Transition.CANCEL, clear_running=True, error=f"run {run_id} was cancelled")
    if not ok and not (state == RunState.CANCELLED and store.runs.report(run_id) is None):
        raise NasqError(f"run {run_id} already ended ({state}); nothing to cancel")
    # (a cancel whose client died before it kept the partial report: this one finishes it)
    after_cancel()
    stored = store.ledger.shard_results(run_id)
    results = [stored[sid] for sid in manifest.shard_ids if sid in stored]
    for f in failures.values():
        if f["reason"] == "running when the run ended":
            f["reason"] = "stopped by the cancel"
    report, predictions = merge_partial(manifest, results, f"run {run_id} was cancelled",
                                        state=str(RunState.CANCELLED), failures=failures)
    report = replace(report, **failover_fields(store, run_id))
    staging, report = write_staging(manifest, results, report, predictions, report_dir)
    try:
        store.runs.claim_publish(run_id, CLAIM_S, renew=True)
        store.runs.save_report_of_ended(run_id, report, predictions)
    except BaseException:
        discard(staging)
        raise
    with holding_publish(store, run_id):
        publish(store, manifest, report, staging, report_dir, state=str(RunState.CANCELLED))
    store.runs.mark_rendered(run_id)
    return report


def _end(store, transition: Transition, manifest: RunManifest, results: list, report: Report, predictions: dict,
         report_dir: str, **fields) -> Report | None:
    """Write the report's files into a staging folder, end the run through ``transition`` with
    the report, then publish the files (one rename) and record the run in the history: all of
    it only if the transition took effect. Returns the report as kept (with its files), or None
    when the transition did not take effect (nothing is left on disk). The
    worker holds the claim to publish meanwhile (a client waits for it, and has the merge sent
    again if it lapses: ``publish_if_missing``). A merge renders the plots and the HTML page
    last, once the client has the numbers (the report names them already, in ``files_to_come``)."""
    run_id = manifest.run_id
    later = transition == Transition.MERGE
    staging, report = write_staging(manifest, results, report, predictions, report_dir, later=later)
    try:
        store.runs.claim_publish(run_id, CLAIM_S, renew=True)
        ok, _ = store.runs.transition(run_id, transition, report=report, predictions=predictions, **fields)
    except BaseException:
        discard(staging)
        store.runs.drop_publish(run_id)
        raise
    if not ok:
        discard(staging)
        store.runs.drop_publish(run_id)
        return None
    with holding_publish(store, run_id):
        publish(store, manifest, report, staging, report_dir,
                state=str(ends_in(transition)), error=fields.get("error"))
    if later:
        render_later(store, manifest, results, report, report_dir)
    else:
        store.runs.mark_rendered(run_id)
    return report


def refuse_if_final(store, run_id: str, report_dir: str) -> str | None:
    """Write once: the state of a run whose report folder holds a done or cancelled report
    (None for any other run; "unreadable" while the folder cannot be read: nothing is done with
    the run until it can). Its records in Redis are restored from that report if someone
    changed them (logged once): nothing merges, heals, resumes or cancels it again."""
    final = ended_on_disk(report_dir, run_id)
    if final is None:
        return None
    if final.state not in FINAL:
        said_once(f"{run_id}:unreadable", "run %s: left alone while its report folder cannot be read (%s)", run_id,
                  final.error)
        return final.state
    if (store.runs.state(run_id) or {}).get("state") != final.state or _stored_report(store, run_id) != final:
        said_once(run_id, "run %s: its report in %s is final (%s) but its records in Redis say otherwise (they were "
                  "changed); nothing of it runs or is merged again, and its records are restored from the report",
                  run_id, os.path.join(report_dir, run_id), final.state)
        predictions = read_json(os.path.join(report_dir, run_id, "predictions.json"))
        store.runs.restore_ended(run_id, final, predictions if isinstance(predictions, dict) else None)
    return final.state


def _stored_report(store, run_id: str) -> Report | None:
    """The run's report in Redis; None also for one that is malformed (changed by hand)."""
    try:
        return store.runs.report(run_id)
    except MessageError:
        return None
