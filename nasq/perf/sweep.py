"""Batch-size sweeps: a sweep's id and folder, the rows already measured, and the measurement of
one point on a worker's device (``measure_point``, behind the ``nasq.sweep_point`` task).

A point's row is written to the sweep's folder (``<report_dir>/sweeps/<sweep id>/points/``),
the durable record; the sweep id is a hash of everything that defines it, so submitting the
same sweep again reuses the points already there.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from typing import TYPE_CHECKING

import numpy as np

from ..config import MAX_SHARD_IMAGES, WorkerConfig
from ..envinfo import host_environment
from ..files import write_json
from ..inference.evaluate import evaluate_range
from ..inference.resources import DeviceResources
from ..model.spec import ModelRef
from ..results.merge import accuracy
from ..wire import DatasetRef
from .timing import is_oom, measure_stable, summarize

if TYPE_CHECKING:
    from ..wire import SweepPoint


def point_file(folder: str, point_id: str) -> str:
    return os.path.join(folder, "points", re.sub(r"[^A-Za-z0-9_.-]+", "_", point_id) + ".json")


def sweep_folder(report_dir: str, sid: str) -> str:
    folder = os.path.abspath(os.path.join(report_dir, "sweeps", sid))
    os.makedirs(os.path.join(folder, "points"), exist_ok=True)
    return folder


#: the definition's numbers that are seconds or percentages: 1 and 1.0 are the same sweep
_REAL_FIELDS = ("min_time_s", "stability_pct")


def sweep_id(definition: dict) -> str:
    """A sweep's id: a hash of what defines its measurement, its numbers normalised (an API
    call's ``min_time_s=1`` and the CLI's ``--min-time 1`` name one sweep)."""
    canonical = {**definition, **{k: float(definition[k]) for k in _REAL_FIELDS
                                  if isinstance(definition.get(k), (int, float))}}
    return "sweep-" + hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()[:12]


def read_rows(folder: str, point_ids: list[str]) -> list[dict]:
    """The rows of the points already measured."""
    rows = []
    for pid in point_ids:
        path = point_file(folder, pid)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                rows.append(json.load(f))
    return rows


def measure_point(point: SweepPoint, *, resources: DeviceResources, worker: WorkerConfig,
                  digest_list=None) -> dict:
    """One sweep point on this worker's device: timed compute (bench) or an evaluation (eval).

    An out-of-memory error (or any failure) becomes the row's ``error``, and an OOM also
    drops the model to free the device. The row is written to the sweep's folder and returned.

    Raises:
        RootError: a path of the point outside the worker's roots (nothing is read or written).
    """
    point = point.within(worker.roots)  # RootError (the task fails) before anything is read or written
    bs = point.batch_size
    row = {"sweep_id": point.sweep_id, "point_id": point.point_id, "worker": worker.name, "device": worker.device,
           "host": host_environment()["host"], "batch_size": bs, "stability_pct": point.stability_pct, "mode": point.mode, "backend": point.backend,
           "precision": point.precision, "dataset": point.data, "dataset_fingerprint": point.dataset_fingerprint,
           "finished_at": None}
    b = None
    try:
        b = resources.backend_for(point.backend, ModelRef(point.weights), bs, worker.backend_options(point.precision))
        b.reset_peak_memory()
        source = resources.source_for(DatasetRef(point.data, "", 0, point.dataset_fingerprint, point.dataset_content),
                                      digest_list)
        n = min(len(source), point.images or len(source), MAX_SHARD_IMAGES)  # an eval point is at most a shard
        if point.mode == "bench":
            crops = np.stack([source.load(i) for i in range(min(n, bs, 64))])
            batch = crops[np.arange(bs) % len(crops)]
            lat, stability = measure_stable(b.compute_fn(batch), min_time_s=point.min_time_s,
                                            stability_pct=point.stability_pct)
            row.update(summarize(lat, bs), **stability)
        else:
            lat: list[float] = []
            out = evaluate_range(source, b, 0, n, batch_size=bs, labels=resources.labels_for(point.labels),
                                 latencies=lat)
            row.update(summarize(lat, bs))
            row["img_s"] = len(out["indices"]) / out["timing"]["compute_s"]
            row.update({k: v for k, v in accuracy(out["labels"], out["top5"]).items() if k != "correct"},
                       images=len(out["indices"]), errors=len(out["errors"]))
        peak = b.peak_memory_bytes()
        row["peak_mib"] = round(peak / 2**20, 1) if peak is not None else None
    except Exception as e:  # noqa: BLE001 - an OOM (or any failure) is a row, not a crash
        row["error"] = "out of memory" if is_oom(e) else f"{type(e).__name__}: {e}"
        if is_oom(e):
            resources.drop_backend()
    if b is not None:
        row.update(versions=b.versions(), **b.identity(), environment=host_environment(), model=b.model_info.get("arch"),
                   model_sha256=b.model_info.get("sha256") or b.model_info.get("artifact_key"))
    row["finished_at"] = time.time()
    row["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(row["finished_at"]))
    path = point_file(point.folder, point.point_id)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(row, path)
    return row
