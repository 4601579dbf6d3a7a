"""Sharding and submission.

A run is a manifest in Redis (config, shard ids and ranges, dataset fingerprint) and a
chord: a group of ``nasq.eval_shard`` tasks whose callback ``nasq.merge_run`` merges them.
Tasks are addressed by name; payloads carry paths and index ranges, never image bytes.
Shard task ids are ``<run_id>:<shard_id>`` so the merge can look a late shard up.
"""
from __future__ import annotations

import math
import os
import secrets
import time

from celery import chord, group

from nasq import __version__
from nasq.celery_app import TASK_EVAL_SHARD, TASK_MERGE, TASK_RUN_FAILED
from nasq.errors import NasqError
from nasq.runstate import RunStore


def plan_shards(n_images: int, shard_size: int, batch_size: int) -> list[dict]:
    """Split ``range(n_images)`` into shards; sizes are rounded up to a multiple of the batch size
    so that every batch is the same in a distributed and a single-process run."""
    if n_images <= 0:
        return []
    size = max(batch_size, math.ceil(max(1, shard_size) / batch_size) * batch_size)
    return [{"shard_id": f"shard-{k:05d}", "start": s, "stop": min(s + size, n_images)}
            for k, s in enumerate(range(0, n_images, size))]


def auto_shard_size(n_images: int, workers: int | None, batch_size: int, *, per_worker: int = 4,
                    cap: int = 1000) -> int:
    """Several shards per worker (so a slow device does not hold the run), at most ``cap`` images."""
    workers = max(1, workers or 8)
    return max(batch_size, min(cap, math.ceil(n_images / (workers * per_worker))))


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def submit_run(app, store: RunStore, *, dataset: dict, labels: str | None, model: dict, backend: str,
               batch_size: int, precision: str | None, shard_size: int, queue: str,
               output: dict | None = None, run_id: str | None = None, extra: dict | None = None):
    """Record the manifest and submit the chord.

    Args:
        dataset: ``Source.describe()`` of the data folder (root, kind, images, fingerprint).
        model: ``ModelRef.to_dict()``: what workers load.
        queue: the evaluation queue the target workers consume.
        output: ``{"dir": ..., "fmt": "NPY"}`` to write full logits in ais_bench's layout.

    Returns:
        (manifest, AsyncResult of the merge)
    """
    run_id = run_id or new_run_id()
    shards = plan_shards(dataset["images"], shard_size, batch_size)
    for s in shards:
        s["task_id"] = f"{run_id}:{s['shard_id']}"
    job = {"dataset": dataset, "labels": labels, "model": model, "backend": backend,
           "batch_size": batch_size, "precision": precision, "output": output}
    manifest = {"run_id": run_id, "created": time.time(), "nasq_version": __version__, "queue": queue,
                "submitted_from": os.uname().nodename, **job, "shards": shards, **(extra or {})}
    store.save_manifest(manifest)
    result = _submit_chord(app, manifest, shards, merge_id=f"{run_id}:merge")
    store.set_state(run_id, "running", shards=len(shards))
    return manifest, result


def _job(manifest: dict) -> dict:
    return {k: manifest[k] for k in ("dataset", "labels", "model", "backend", "batch_size", "precision", "output")}


def _submit_chord(app, manifest: dict, shards: list[dict], *, merge_id: str):
    run_id, queue, job = manifest["run_id"], manifest["queue"], _job(manifest)
    # argsrepr: what Flower shows instead of the whole job dict
    header = group(app.signature(TASK_EVAL_SHARD, args=(run_id, s["shard_id"], s["start"], s["stop"], job),
                                 queue=queue, task_id=s["task_id"],
                                 argsrepr=f"run={run_id} {s['shard_id']} images=[{s['start']},{s['stop']}) "
                                          f"batch={job['batch_size']} backend={job['backend']}") for s in shards)
    body = app.signature(TASK_MERGE, kwargs={"run_id": run_id}, queue=queue, task_id=merge_id,
                         argsrepr=f"run={run_id} shards={len(manifest['shards'])}")
    body.link_error(app.signature(TASK_RUN_FAILED, kwargs={"run_id": run_id}, queue=queue))
    if not shards:  # nothing to redo: the merge fetches every shard's stored result itself
        return body.clone(args=([],)).apply_async()
    return chord(header, app=app)(body)


def resume_run(app, store: RunStore, run_id: str):
    """Run again only the shards of ``run_id`` that failed or have no stored result, then merge
    them with the results the run already has. Shard task ids stay the same, so the merge finds
    every result by id.

    Returns:
        (manifest, AsyncResult of the merge, shard ids resubmitted)
    """
    manifest = store.manifest(run_id)
    if manifest is None:
        raise NasqError(f"no run {run_id!r} in this Redis (runs expire after result_expires)")
    redo = []
    for s in manifest["shards"]:
        r = app.AsyncResult(s["task_id"])
        done = r.state == "SUCCESS" and isinstance(r.result, dict) and r.result.get("status") == "ok"
        if not done:
            redo.append(s)
    if redo:
        store.r.hdel(f"nasq:run:{run_id}:attempts", *[s["shard_id"] for s in redo])
        store.r.hdel(f"nasq:run:{run_id}:shard_done", *[s["shard_id"] for s in redo])
    n = store.r.incr(f"nasq:run:{run_id}:resumes")
    store.set_state(run_id, "running", shards=len(manifest["shards"]), resumed=len(redo))
    result = _submit_chord(app, manifest, redo, merge_id=f"{run_id}:merge-r{n}")
    return manifest, result, [s["shard_id"] for s in redo]
