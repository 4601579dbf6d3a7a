"""A run's report on disk: written whole into a staging folder, published with one rename, never
replaced once the run is done or cancelled.

* ``write_staging`` writes the files into ``report_dir/.staging/<run>.<token>``; ``publish``
  renames that folder to ``report_dir/<run>`` (moving a failed run's partial report aside
  first), records the run in the history and marks it published, and sweeps the staging
  folders a killed merge of the run left behind. A client prints a report's paths only once
  it is published.
* ``publish_if_missing`` finishes the publication of an ended run whose merging worker died
  after it stored the report in Redis: the same report (report.json is the stored one, byte
  for byte as the first merge would have written it).
* Write once: the report folder decides that a run is finished. A run whose folder holds a
  report of a done or cancelled run (``ended_on_disk``) is never merged, healed, resumed or
  cancelled again, whatever its records in Redis say (someone who can write to Redis cannot
  make a finished run run again or change its report); a merge that finds such a run restores
  its records in Redis from the report and logs the attempt once.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import secrets
import shutil
import sqlite3
from dataclasses import dataclass

from ..files import fsync_dir, read_json, write_json
from ..keepalive import every
from ..roots import check_name
from ..rundata import Report, RunManifest
from ..runstate import RunState
from ..wire import MessageError
from .history import record, row_of
from .merge import ok_results
from .run_files import write_later_files, write_run_files

log = logging.getLogger("nasq.worker")

STAGING = ".staging"
#: the states whose published report is final: never replaced
FINAL = (str(RunState.DONE), str(RunState.CANCELLED))
#: how long a claim to publish (or render) lasts without being renewed: a worker that died
#: holding one keeps the others waiting this long at most
CLAIM_S = 5.0

_said: set[str] = set()


def final_folder(report_dir: str, run_id: str) -> str:
    return os.path.join(report_dir, check_name(run_id, "run_id"))


_read: dict[str, tuple] = {}


@dataclass(frozen=True)
class Unreadable:
    """What ``ended_on_disk`` answers when the report folder cannot be read: nothing is done
    with the run until it can (write once fails closed)."""

    error: str
    state: str = "unreadable"


def ended_on_disk(report_dir: str, run_id: str) -> Report | Unreadable | None:
    """The published report of a run that is done or cancelled (its folder in ``report_dir``
    decides: it is never replaced), None for a run without one, or ``Unreadable`` (state
    "unreadable") when the folder cannot be told (an I/O error: not remembered). A stat when
    there is no report; the file is read again only when it changed."""
    try:
        path = os.path.join(final_folder(report_dir, run_id), "report.json")
    except Exception:  # noqa: BLE001 - not a run id: no such folder
        return None
    try:
        st = os.stat(path)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if _read.get(path, (None,))[0] != stamp:
            with open(path, encoding="utf-8") as f:
                report = Report.from_payload(json.load(f))
            _read[path] = (stamp, report if report.state in FINAL else None)
            if len(_read) > 1000:
                _read.pop(next(iter(_read)))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError, MessageError) as e:  # an I/O error, or a report being written by hand: cannot tell
        return Unreadable(f"{path}: {getattr(e, 'strerror', None) or e}")
    return _read[path][1]


def said_once(run_id: str, text: str, *args) -> None:
    """Log a refused attempt at a finished run, once per process and run."""
    if run_id not in _said:
        _said.add(run_id)
        log.warning(text, *args)


def write_staging(manifest: RunManifest, results: list, report: Report, predictions: dict | None, report_dir: str,
                  *, later: bool = False) -> tuple[str, Report]:
    """The report files in a staging folder (named as they will be once moved); returns it and
    the report that names them. A file that could not be written is in its
    ``files_not_written``. ``later``: without the plots and the HTML page (``write_later``)."""
    run_id = check_name(manifest.run_id, "run_id")  # the folder's name: never a path
    staging = os.path.join(report_dir, STAGING, f"{run_id}.{secrets.token_hex(4)}")
    report = write_run_files(report, shard_timings(manifest, results), staging, predictions,
                             final_folder=final_folder(report_dir, run_id), later=later)
    if report.files_not_written:
        log.warning("run %s: could not write %s in %s: %s", run_id, ", ".join(report.files_not_written),
                    final_folder(report_dir, run_id), next(iter(report.files_not_written.values())))
    return staging, report


def publish(store, manifest: RunManifest, report: Report, staging: str, report_dir: str, *, state: str,
            error: str | None = None) -> bool:
    """Move the staging folder to ``report_dir/<run id>`` in one rename (a failed run's partial
    report moved aside first), record the run in the history, mark it published, and sweep the
    run's stale staging folders. A folder that holds a done or cancelled report already is
    kept (write once): ours is discarded and nothing else is written. True if this call
    published the files."""
    run_id = manifest.run_id
    final, published = final_folder(report_dir, run_id), False
    old = f"{staging}.old"
    held = ended_on_disk(report_dir, run_id)
    if held is not None and held != report:
        said_once(run_id, "run %s: its report in %s is final (%s): not replaced", run_id, final, held.state)
        discard(staging)
        return False
    try:
        if held is None and os.path.isdir(staging):
            if os.path.isdir(final):
                os.replace(final, old)
                if _final_report(old):  # published by another meanwhile, and final: it stays
                    os.replace(old, final)
                    discard(staging)
                    return False
            try:
                os.rename(staging, final)
                fsync_dir(report_dir)  # the new name survives a crash of the machine, as its files do
                published = True
            except OSError:
                if os.path.isdir(old) and not os.path.exists(final):  # put the earlier report back
                    os.replace(old, final)
                raise
    except OSError as e:
        log.warning("run %s: could not move its report files into %s: %s", run_id, final, e)
        store.runs.add_note(run_id, "files", f"the report files could not be moved into {final}: {e}")
    shutil.rmtree(old, ignore_errors=True)
    discard(staging)
    sweep(report_dir, run_id)
    history(store, report_dir, row_of(manifest, state, report, error))
    store.runs.mark_published(run_id)
    store.runs.drop_publish(run_id)
    return published


def _final_report(folder: str) -> bool:
    """The folder holds a done or cancelled report (one this release cannot read whole counts
    by the state it says: write once fails closed)."""
    return Report.state_of(read_json(os.path.join(folder, "report.json"))) in FINAL


def read_report(path: str) -> Report | None:
    """The report in ``path``; None if it is missing, unreadable or malformed."""
    try:
        return Report.from_payload(read_json(path))
    except MessageError:
        return None


def publish_if_missing(store, run_id: str, manifest: RunManifest, report_dir: str) -> bool:
    """An ended run whose report is stored but whose files were never published (its merging
    worker died in between): publish the same report now. True if this call did."""
    if store.runs.published(run_id) or not store.runs.claim_publish(run_id, CLAIM_S):
        return False
    report = store.runs.report(run_id)
    state = (store.runs.state(run_id) or {}).get("state")
    if not report or state not in (*FINAL, str(RunState.FAILED)):
        store.runs.drop_publish(run_id)
        return False
    on_disk = read_report(os.path.join(final_folder(report_dir, run_id), "report.json"))
    if on_disk == report:  # the rename happened: only the bookkeeping after it is missing
        sweep(report_dir, run_id)
        history(store, report_dir, row_of(manifest, state, report, report.error))
        store.runs.mark_published(run_id)
        store.runs.drop_publish(run_id)
        return True
    results = list(store.ledger.shard_results(run_id).values())
    staging, _ = write_staging(manifest, results, report, store.runs.predictions(run_id), report_dir,
                               later=bool(report.files_to_come))
    write_json(report.to_payload(), os.path.join(staging, "report.json"))  # the stored report, as the client has it
    log.info("run %s: its report files published by this worker (its merging worker went away first)", run_id)
    with holding_publish(store, run_id):
        return publish(store, manifest, report, staging, report_dir, state=state, error=report.error)


def holding_publish(store, run_id: str):
    """The claim to publish the run's files, renewed while the body runs (a slow disk, the
    history's SQLite) so that no one else takes it meanwhile."""
    return every(CLAIM_S / 3, lambda: store.runs.claim_publish(run_id, CLAIM_S, renew=True),
                 what=f"publishing {run_id}")


def render_later(store, manifest: RunManifest, results: list, report: Report, report_dir: str) -> bool:
    """Render a done run's plots and HTML page into its folder, if this worker gets the claim to
    (``store.runs.claim_render``, renewed while it renders), and record what could not be written
    (``mark_rendered``)."""
    run_id = manifest.run_id
    if not store.runs.claim_render(run_id, CLAIM_S):
        return False
    with every(CLAIM_S / 3, lambda: store.runs.claim_render(run_id, CLAIM_S, renew=True), what=f"rendering {run_id}"):
        failed = write_later(manifest, results, report, report_dir)
    store.runs.mark_rendered(run_id, failed)
    return True


def render_if_missing(store, run_id: str, manifest: RunManifest, report_dir: str) -> bool:
    """A done run whose plots and HTML page were never rendered (its merging worker died after
    storing the numbers, or was stopped): render them now, from the stored report and results.
    True if this call rendered them."""
    report = store.runs.report(run_id)
    if not report or not report.files_to_come or store.runs.rendered(run_id) or not store.runs.published(run_id):
        return False
    return render_later(store, manifest, list(store.ledger.shard_results(run_id).values()), report, report_dir)


def write_later(manifest: RunManifest, results: list, report: Report, report_dir: str) -> dict[str, str]:
    """The plots and the HTML page of a done run, rendered into its folder after the client got
    its numbers; returns file name -> reason for those not written (the report, which the
    client has, is never changed: the run's ``rendered`` record says it)."""
    run_id = manifest.run_id
    folder = final_folder(report_dir, run_id)
    try:
        failed = write_later_files(report, shard_timings(manifest, results), folder)
    except Exception as e:  # noqa: BLE001 - the run is done and its numbers kept: say it, do not fail the merge
        log.exception("run %s: could not render its plots and HTML page", run_id)
        failed = {os.path.basename(report.files[k]): f"{type(e).__name__}: {e}" for k in report.files_to_come}
    if failed:
        log.warning("run %s: could not write %s in %s: %s", run_id, ", ".join(failed), folder,
                    next(iter(failed.values())))
    return failed


def discard(staging: str) -> None:
    """Remove a staging folder, and the staging area if it is empty."""
    shutil.rmtree(staging, ignore_errors=True)
    try:
        os.rmdir(os.path.dirname(staging))
    except OSError:  # not empty (another run's staging), or gone
        pass


def sweep(report_dir: str, run_id: str) -> None:
    """Remove the staging folders of a run whose report is published (a merge killed while it
    wrote one, or one that lost the race to publish)."""
    for path in glob.glob(os.path.join(report_dir, STAGING, f"{glob.escape(run_id)}.*")):
        shutil.rmtree(path, ignore_errors=True)
    try:
        os.rmdir(os.path.join(report_dir, STAGING))
    except OSError:
        pass


def history(store, report_dir: str, row: dict) -> None:
    try:
        record(report_dir, row)
    except (OSError, sqlite3.Error) as e:  # the report is in Redis and its folder all the same
        log.warning("run %s: could not update the run history in %s: %s", row["run_id"], report_dir, e)
        store.runs.add_note(row["run_id"], "history",
                       f"the run history {os.path.join(report_dir, 'runs.sqlite')} was not updated: {e}")


def shard_timings(manifest: RunManifest, results: list) -> list[dict]:
    """Where and when each kept shard ran, and its images: what the throughput plot draws."""
    return [{"worker": r.worker, "host": r.host, "device": r.device, "images": len(r.indices), **r.timing.to_payload()}
            for r in ok_results(manifest, results)]
