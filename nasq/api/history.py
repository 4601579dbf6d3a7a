"""Runs people look back at: listed (``list_runs``), loaded (``load_run``), compared
(``compare_runs``), and cancelled (``cancel``)."""
from __future__ import annotations

import os
import time

from ..config import Settings, load_settings
from ..errors import NasqError
from ..queue.session import Session
from ..rundata import Report
from ..wire import MessageError, shard_task_id


def store_or_none(settings: Settings):
    """The run store of the configured broker (checked), or None without one."""
    from ..queue.broker import probe
    from ..queue.store import RunStore

    if not settings.broker_url:
        return None
    probe(settings)
    return RunStore.for_settings(settings)


def list_runs(*, state: str | None = None, backend: str | None = None, since_days: float | None = None,
              limit: int = 20, broker: str | None = None, settings: Settings | None = None) -> list[dict]:
    """Recent runs, newest first: from the broker (when one is configured) and from the run
    history in the report dir, which outlives Redis. Each row: run_id, created, state, model,
    backend, precision, devices, batch_size, images, top1, top5, throughput_img_s, ..."""
    from ..results.status import runs_rows

    settings = settings or load_settings(broker_url=broker)
    since = time.time() - since_days * 86400 if since_days else None
    return runs_rows(store_or_none(settings), settings.report_dir, state=state, backend=backend, since=since,
                     limit=limit)


def load_run(run_id: str, *, settings: Settings) -> tuple[Report, dict | None]:
    """A run's report and per-image predictions: from the broker while it holds them, else from
    the report folder the history index names.

    Raises:
        NasqError: no such run in either place, or it has no report (it did not finish a shard).
    """
    from ..files import read_json
    from ..results.history import get

    store = store_or_none(settings)
    try:
        report = store.runs.report(run_id) if store is not None else None
    except MessageError:  # changed in Redis by hand: the report folder has the one published
        report = None
    if report is not None:
        return report, store.runs.predictions(run_id)
    row = get(settings.report_dir, run_id)
    path = (row or {}).get("report") or os.path.join(settings.report_dir, run_id, "report.json")
    try:
        report = Report.from_payload(read_json(path))
    except MessageError as e:
        raise NasqError(f"no readable report of run {run_id!r} in the broker or in {settings.report_dir} ({path}: "
                        f"{'missing or not JSON' if not os.path.isfile(path) else e}; runs table: `nasq runs`)") from None
    return report, read_json(os.path.join(os.path.dirname(path), "predictions.json"))


def compare_runs(run_a: str, run_b: str, *, broker: str | None = None, settings: Settings | None = None) -> dict:
    """``nasq compare``: accuracy on the images both runs saw (difference with a 95 % interval,
    McNemar's exact test), images whose top-1 changed, throughput per device, configuration
    differences. See ``nasq.results.compare``."""
    from ..results.compare import compare

    settings = settings or load_settings(broker_url=broker)
    (a, pa), (b, pb) = load_run(run_a, settings=settings), load_run(run_b, settings=settings)
    if pa is None or pb is None:
        raise NasqError(f"run {run_a if pa is None else run_b} has no per-image predictions to compare")
    return compare(a, pa, b, pb)


def cancel(run_id: str, *, broker: str | None = None, settings: Settings | None = None, log=print) -> dict:
    """Cancel a run: mark it cancelled (its running shards stop at their next progress, shards that
    start later skip themselves, a late result or merge changes nothing), revoke its queued and
    running shards and its merges (a running shard is stopped at once), and keep what finished as
    a partial report that names the shards that did not finish. Returns that report.

    Raises:
        NasqError: no broker, no such run, or a run that already ended.
    """
    from ..queue.trust import ManifestTrust
    from ..results.ending import cancel_run

    settings = settings or load_settings(broker_url=broker)
    if not settings.broker_url:
        raise NasqError("cancel needs the broker the run was submitted to (--broker or NASQ_BROKER_URL)")
    with Session(settings) as session:
        store = session.store
        manifest = ManifestTrust(session.app).manifest(store, run_id)
        if manifest is None:
            raise NasqError(f"no run {run_id!r} in this Redis (runs expire after result_expires)")
        kept = store.ledger.result_ids(run_id)
        sent = store.ledger.redispatched(run_id)  # every attempt of a shard has a task id of its own
        unfinished = [sid for sid in manifest.shard_ids if sid not in kept]
        ids = [shard_task_id(run_id, sid, n) for sid in unfinished for n in range(sent.get(sid, 0) + 1)]

        def revoke() -> None:
            session.app.control.revoke(ids + store.runs.merge_ids(run_id), terminate=True, signal="SIGTERM")
            log(f"run {run_id}: cancelled; {len(unfinished)} shard(s) ({len(ids)} attempts) and its merge revoked")

        partial = cancel_run(store, run_id, settings.report_dir, manifest=manifest, after_cancel=revoke)
        log(f"run {run_id}: partial report of {partial.images} of {partial.planned_images} images kept")
        return partial

