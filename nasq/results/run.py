"""The end of a run: the library function behind the chord callback ``nasq.merge_run``."""
from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections import Counter
from typing import Callable

from ..errors import NasqError, RunError
from ..roots import check_name
from .merge import MissingShards, merge, merge_partial
from .history import record, row_of
from .report import write_run_files

log = logging.getLogger("nasq.worker")


class MergeLater(Exception):
    """A shard the merge needs is still running somewhere (a redelivered one): try again soon."""


def merge_run(run_id: str, results: list, *, store, report_dir: str, merge_wait_s: float, first_try: float) -> dict:
    """Validate the shard results of ``run_id``, write and record its report.

    Args:
        results: what the chord handed over: each shard's summary (its full result is in the
            run store, where every shard saves it, however it was delivered) or, from a caller
            that has them, full results. A shard id that comes twice is counted in
            ``duplicate_shard_results_dropped``.
        store: the run store (manifest, results, running shards, report, state). Merging twice
            (the chord and a healing merge can both fire) gives the same report.
        first_try: when the first attempt at this merge ran; a merge that still misses a
            running shard raises ``MergeLater`` until ``merge_wait_s`` have passed.

    Raises:
        MergeLater: retry in a few seconds.
        RunError: missing or failed shards (the run is marked failed, with a partial report).
    """
    manifest = store.manifest(run_id)
    if manifest is None:
        raise RunError(f"run {run_id}: its manifest is gone from Redis (expired or flushed)")
    if manifest.get("run_id") != run_id:
        raise RunError(f"run {run_id}: its manifest names another run")
    if (store.state(run_id) or {}).get("state") == "cancelled":  # a merge that slipped past the revoke
        return store.report(run_id) or {"run_id": run_id}
    handed = [r for r in results or [] if isinstance(r, dict) and r.get("run_id") == run_id and "shard_id" in r]
    counts = Counter(r["shard_id"] for r in handed)
    full = {r["shard_id"]: r for r in handed if r.get("status") == "ok" and "indices" in r}
    if any(s["shard_id"] not in full for s in manifest["shards"]):  # read the store only when needed
        for sid, r in store.shard_results(run_id).items():
            full.setdefault(sid, r)
    results = list(full.values())
    try:
        report, predictions = merge(manifest, results)
    except MissingShards as e:
        running = set(store.running(run_id))
        if any(sid in running for sid in e.missing) and time.time() - first_try < merge_wait_s:
            raise MergeLater(str(e)) from None
        mark_failed(store, manifest, results, e, report_dir)
        raise
    except NasqError as e:
        mark_failed(store, manifest, results, e, report_dir)
        raise
    report["duplicate_shard_results_dropped"] = sorted(sid for sid, n in counts.items() for _ in range(n - 1))
    report["redispatched_shards"] = store.redispatched(run_id)
    _save(store, manifest, results, report, predictions, report_dir)
    store.set_state(run_id, "done", images=report["images"], top1=report["top1"], top5=report["top5"],
                    throughput_img_s=report["throughput_img_s"])
    return report


def fail_run(run_id: str, error: BaseException, *, store, report_dir: str,
             redispatch: Callable[[dict, list[str]], None]) -> None:
    """The chord's errback: a shard failed, or was revoked in flight (a broker that went away).

    Shards that failed for real: keep what finished as a partial report and mark the run failed,
    naming them. Shards only lost in flight (no result, no recorded failure) are not a failure
    of the run: they go to ``redispatch(manifest, shard_ids)`` and the run heals (it is merged
    once they finish). A run merged meanwhile stays done.
    """
    manifest = store.manifest(run_id)
    if manifest is None or (store.state(run_id) or {}).get("state") in ("done", "cancelled"):
        return
    finished, stored = store.finished(run_id), store.shard_results(run_id)
    results, in_flight = [], []
    for s in manifest["shards"]:
        sid = s["shard_id"]
        if sid in stored:
            results.append(stored[sid])
        elif finished.get(sid, {}).get("status") == "error":
            results.append({"run_id": run_id, "shard_id": sid, **finished[sid]})
        else:
            in_flight.append(sid)
    if all(r.get("status") == "ok" for r in results):
        if in_flight:  # not a failure of the run: it heals, and is merged once they finish
            redispatch(manifest, [sid for sid in in_flight if store.claim_lost(run_id, sid, running=False)])
        else:  # every shard finished after all (re-dispatched ones too): the run is done
            merge_run(run_id, [], store=store, report_dir=report_dir, merge_wait_s=0, first_try=time.time())
        return
    try:
        merge(manifest, results)
        reason: Exception = RunError(f"run {run_id}: {type(error).__name__}: {error}")
    except NasqError as e:  # names the failed or missing shards
        reason = e
    mark_failed(store, manifest, results, reason, report_dir)


def mark_failed(store, manifest: dict, results: list, error: Exception, report_dir: str) -> None:
    """Mark the run failed, keeping what it finished: a partial report (and files), so that
    ``nasq resume`` reruns only the rest."""
    run_id = manifest["run_id"]
    if (store.state(run_id) or {}).get("state") == "cancelled":  # cancelled stays cancelled
        return
    partial = merge_partial(manifest, results, str(error))
    if partial is not None:
        _save(store, manifest, results, *partial, report_dir, state="failed", error=str(error))
    else:
        _history(report_dir, row_of(manifest, "failed", error=str(error)))
    store.set_state(run_id, "failed", partial=partial is not None,
                    error=f"{error} -- `nasq resume {run_id}` reruns only the failed or missing shards")


def cancel_run(store, run_id: str, report_dir: str) -> dict | None:
    """Mark a run cancelled and keep what finished as a partial report (files and Redis).
    Returns the partial report, or None when no shard had finished."""
    manifest = store.manifest(run_id)
    if manifest is None:
        raise RunError(f"no run {run_id!r} in this Redis (runs expire after result_expires)")
    if (store.state(run_id) or {}).get("state") in ("done", "failed", "cancelled"):
        raise RunError(f"run {run_id} already ended ({store.state(run_id)['state']}); nothing to cancel")
    stored = store.shard_results(run_id)
    results = [stored[s["shard_id"]] for s in manifest["shards"] if s["shard_id"] in stored]
    store.set_state(run_id, "cancelled", error=f"run {run_id} was cancelled")
    partial = merge_partial(manifest, results, "cancelled")
    if partial is not None:
        _save(store, manifest, results, *partial, report_dir, state="cancelled")
        return partial[0]
    _history(report_dir, row_of(manifest, "cancelled"))
    return None


def _save(store, manifest: dict, results: list, report: dict, predictions: dict, report_dir: str, *,
          state: str = "done", error: str | None = None) -> None:
    """Report files on disk and the run's row in the history index (a failure to write them is
    logged: the report still reaches Redis)."""
    run_id = check_name(manifest["run_id"], "run_id")  # the folder's name: never a path
    try:
        report["files"] = write_run_files(report, _shard_timings(manifest, results), os.path.join(report_dir, run_id),
                                          predictions=predictions)
    except OSError as e:
        log.warning("run %s: could not write the report files: %s", run_id, e)
    _history(report_dir, row_of(manifest, state, report, error))
    store.save_report(run_id, report, predictions)


def _history(report_dir: str, row: dict) -> None:
    try:
        record(report_dir, row)
    except (OSError, sqlite3.Error) as e:  # the report is in Redis and its folder all the same
        log.warning("run %s: could not update the run history in %s: %s", row["run_id"], report_dir, e)


def _shard_timings(manifest: dict, results: list) -> list[dict]:
    seen, out = set(), []
    for r in results:
        if isinstance(r, dict) and r.get("run_id") == manifest["run_id"] and r.get("status") == "ok" \
                and r["shard_id"] not in seen:
            seen.add(r["shard_id"])
            out.append({"worker": r["worker"], "device": r["device"], "images": len(r["indices"]), **r["timing"]})
    return out

