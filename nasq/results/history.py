"""Run history that outlives Redis: an SQLite index in the report dir (``runs.sqlite``), one
row per run, written by the worker that merges, fails or cancels the run, beside the run's
report folder. ``nasq runs`` reads it (with or without a broker); Redis keeps only the runs of
the last ``result_expires``.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time

from ..rundata import Report, RunManifest

INDEX = "runs.sqlite"
COLUMNS = ("run_id", "created", "finished", "state", "model", "model_sha256", "backend", "precision", "batch_size",
           "devices", "dataset", "dataset_fingerprint", "images", "images_total", "top1", "top5", "throughput_img_s",
           "end_to_end_img_s", "report", "error", "images_planned", "top1_ci95_low", "top1_ci95_high", "top5_ci95_low",
           "top5_ci95_high", "device_list", "shards_failed", "simulated", "excluded_devices")


def _connect(report_dir: str, *, write: bool = True) -> sqlite3.Connection:
    """The index; for writing, created or given the columns an earlier nasq's index lacks (its
    rows keep None there). Readers take the index as it is (``_select``)."""
    if write:
        os.makedirs(report_dir, exist_ok=True)
    db = sqlite3.connect(os.path.join(report_dir, INDEX), timeout=30)
    if write:
        db.execute(f"CREATE TABLE IF NOT EXISTS runs "
                   f"({', '.join(c + (' PRIMARY KEY' if c == 'run_id' else '') for c in COLUMNS)})")
        for c in set(COLUMNS) - _columns(db):
            try:
                db.execute(f"ALTER TABLE runs ADD COLUMN {c}")
            except sqlite3.OperationalError:  # another process added it first
                if c not in _columns(db):
                    raise
    return db


def _columns(db: sqlite3.Connection) -> set[str]:
    return {r[1] for r in db.execute("PRAGMA table_info(runs)")}


def _select(db: sqlite3.Connection) -> str:
    """The columns to read: those the index has, NULL for those an earlier nasq did not write."""
    have = _columns(db)
    return ", ".join(c if c in have else f"NULL AS {c}" for c in COLUMNS)


def row_of(manifest: RunManifest, state: str, report: Report | None = None, error: str | None = None) -> dict:
    """The index row of a run: its manifest, its end state and its report's headline."""
    from .report import device_cell, devices_summary

    job = manifest.job
    row = {"run_id": manifest.run_id, "created": manifest.created, "finished": time.time(), "state": state,
           "model": os.path.basename(job.model.weights), "model_sha256": None, "backend": job.backend,
           "precision": job.precision, "batch_size": job.batch_size, "devices": None, "dataset": job.dataset.root,
           "dataset_fingerprint": job.dataset.fingerprint, "images": None, "images_total": job.dataset.images,
           "top1": None, "top5": None, "throughput_img_s": None, "end_to_end_img_s": None, "report": None,
           "error": error, "images_planned": manifest.images_planned or None, "top1_ci95_low": None,
           "top1_ci95_high": None, "top5_ci95_low": None, "top5_ci95_high": None, "device_list": None,
           "shards_failed": None, "simulated": job.backend == "sim", "excluded_devices": None}
    if report is None:
        return row
    model, per_device = report.model, report.per_device
    ci1, ci5 = report.top1_ci95 or (None, None), report.top5_ci95 or (None, None)
    return row | {
        "finished": report.finished or row["finished"], "model": model.get("arch") or row["model"],
        "model_sha256": (model.get("sha256") or model.get("artifact_key") or "")[:16] or None,
        "precision": report.precision or job.precision, "devices": devices_summary(per_device) or None,
        "images": report.images, "top1": report.top1, "top5": report.top5,
        "throughput_img_s": report.throughput_img_s, "end_to_end_img_s": report.throughput.end_to_end_img_s,
        "report": (report.files or {}).get("json"), "error": error or report.error,
        "images_planned": report.images_planned or row["images_planned"],
        "top1_ci95_low": ci1[0], "top1_ci95_high": ci1[1], "top5_ci95_low": ci5[0], "top5_ci95_high": ci5[1],
        "device_list": [device_cell(d) for d in per_device] or None,
        "shards_failed": [f["shard_id"] for f in report.shards_failed] or None,
        "simulated": any(d.get("backend") == "sim" for d in per_device) or job.backend == "sim",
        "excluded_devices": [device_cell(e) for e in report.excluded_devices or ()] or None}


def record(report_dir: str, row: dict) -> None:
    """Insert or replace a run's row."""
    with _connect(report_dir) as db:
        db.execute(f"INSERT OR REPLACE INTO runs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                   [row.get(c) if not isinstance(row.get(c), (dict, list)) else json.dumps(row.get(c))
                    for c in COLUMNS])
    db.close()


def query(report_dir: str, *, state: str | None = None, backend: str | None = None, since: float | None = None,
          limit: int = 20) -> list[dict]:
    """Runs from the index, newest first."""
    if not os.path.isfile(os.path.join(report_dir, INDEX)):
        return []
    where, args = [], []
    for col, value in (("state", state), ("backend", backend)):
        if value:
            where.append(f"{col} = ?")
            args.append(value)
    if since:
        where.append("created >= ?")
        args.append(since)
    db = _connect(report_dir, write=False)
    try:
        sql = f"SELECT {_select(db)} FROM runs" + (f" WHERE {' AND '.join(where)}" if where else "") + \
            " ORDER BY created DESC LIMIT ?"
        return [_row(r) for r in db.execute(sql, [*args, limit])]
    finally:
        db.close()


def _row(values) -> dict:
    row = dict(zip(COLUMNS, values))
    for c in ("device_list", "shards_failed", "excluded_devices"):
        if isinstance(row.get(c), str):
            row[c] = json.loads(row[c])
    if row.get("simulated") is not None:
        row["simulated"] = bool(row["simulated"])
    return row


def get(report_dir: str, run_id: str) -> dict | None:
    if not os.path.isfile(os.path.join(report_dir, INDEX)):
        return None
    db = _connect(report_dir, write=False)
    try:
        r = db.execute(f"SELECT {_select(db)} FROM runs WHERE run_id = ?", [run_id]).fetchone()
        return _row(r) if r else None
    finally:
        db.close()
