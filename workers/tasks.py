"""Celery tasks. Each is a thin view: decode the payload, call one library function,
return a small JSON dict.

``nasq.eval_shard`` catches its own errors and returns ``status: "error"``, because a
failed header task would make the chord drop every result. A worker *process* that dies
mid-shard is a requeue (late acks + reject on worker lost); a per-shard attempt counter in
Redis stops a shard that always kills its worker from looping forever.
"""
from __future__ import annotations

import logging
import os
import socket
import time

from celery import Task
from celery.exceptions import Retry
from celery.signals import heartbeat_sent, worker_ready, worker_shutdown

from nasq import backends
from nasq.celery_app import TASK_EVAL_SHARD, TASK_MERGE, TASK_RUN_FAILED, TASK_SWEEP_POINT
from nasq.data import open_source, read_labels
from nasq.errors import NasqError, RunError
from nasq.evaluate import evaluate_range
from nasq.outputs import OutputWriter
from nasq.report import MissingShards, merge, merge_partial, write_run_files
from nasq.runstate import RunStore
from nasq.spec import ModelRef
from workers.app import app, settings

log = logging.getLogger("nasq.worker")

#: threads decoding the next batch while the device runs the current one (`--decode-threads`)
LOADER_THREADS = int(os.environ.get("NASQ_DECODE_THREADS", "1"))

#: how long the merge waits for a shard that is still running (a redelivered one) before failing
MERGE_WAIT_S = float(os.environ.get("NASQ_MERGE_WAIT_S", "900"))


_STORE: RunStore | None = None


def _store() -> RunStore:
    global _STORE
    if _STORE is None:
        _STORE = RunStore(settings.backend_url, expires=settings.result_expires)
    return _STORE


@worker_ready.connect
def _register(sender=None, **_):
    name = os.environ.get("NASQ_WORKER_NAME") or getattr(sender, "hostname", socket.gethostname())
    _store().register_worker(name, {"device": os.environ.get("NASQ_WORKER_DEVICE", "cpu"),
                                    "backend": os.environ.get("NASQ_WORKER_BACKEND"),
                                    "precision": os.environ.get("NASQ_WORKER_PRECISION"),
                                    "queues": os.environ.get("NASQ_WORKER_QUEUES", "").split(","),
                                    "host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                                    "current": None})


@heartbeat_sent.connect
def _heartbeat(sender=None, **_):
    if os.environ.get("NASQ_WORKER_NAME"):
        _store().touch_worker(os.environ["NASQ_WORKER_NAME"])


@worker_shutdown.connect
def _unregister(sender=None, **_):
    if os.environ.get("NASQ_WORKER_NAME"):
        _store().unregister_worker(os.environ["NASQ_WORKER_NAME"])


class DeviceTask(Task):
    """Holds the loaded backend, dataset listing and labels for the life of the process."""

    _runner = None
    _runner_key = None
    _sources: dict = {}
    _labels: dict = {}

    @property
    def store(self) -> RunStore:
        return _store()

    def backend_for(self, name: str, model: ModelRef, batch_size: int, precision: str):
        # the mtime: a checkpoint rewritten in place is loaded again
        key = (name, model.weights, os.path.getmtime(model.weights), model.num_outputs, precision)
        if DeviceTask._runner_key != key:
            if DeviceTask._runner is not None:
                DeviceTask._runner.close()
            DeviceTask._runner, DeviceTask._runner_key = None, None  # stays empty if the load below fails
            device = os.environ.get("NASQ_WORKER_LOCAL_DEVICE", "cpu")
            t = time.perf_counter()
            b = backends.create(name, device)
            b.load(model, batch_size=batch_size, precision=precision)
            log.info("loaded %s on %s in %.1f s", model.weights, device, time.perf_counter() - t)
            DeviceTask._runner, DeviceTask._runner_key = b, key
        return DeviceTask._runner

    def source_for(self, dataset: dict):
        src = DeviceTask._sources.get(dataset["root"])
        if src is None or src.fingerprint != dataset["fingerprint"]:
            src = open_source(dataset["root"])
            if src.fingerprint != dataset["fingerprint"]:
                raise RunError(f"the dataset at {dataset['root']} on {socket.gethostname()} differs from the one the "
                               f"run was submitted with (fingerprint {src.fingerprint} vs {dataset['fingerprint']}); "
                               "every worker must see the same files")
            DeviceTask._sources[dataset["root"]] = src
        return src

    def labels_for(self, path: str | None):
        if path is None:
            return None
        key = (path, os.path.getmtime(path))
        if key not in DeviceTask._labels:
            DeviceTask._labels = {key: read_labels(path)}
        return DeviceTask._labels[key]


@app.task(name=TASK_EVAL_SHARD, bind=True, base=DeviceTask)
def eval_shard(self, run_id: str, shard_id: str, start: int, stop: int, job: dict) -> dict:
    """Evaluate images [start, stop) of the run's dataset; returns top-5 per image."""
    worker_backend = os.environ.get("NASQ_WORKER_BACKEND", job["backend"])
    precision = job.get("precision") or os.environ.get("NASQ_WORKER_PRECISION", "fp32")
    base = {"run_id": run_id, "shard_id": shard_id, "start": start, "stop": stop,
            "worker": self.request.hostname or socket.gethostname(),
            "device": os.environ.get("NASQ_WORKER_DEVICE", "cpu"), "backend": worker_backend,
            "precision": precision}
    store = self.store
    attempt = store.next_attempt(run_id, shard_id)
    base["attempt"] = attempt
    if attempt > settings.max_attempts:
        msg = (f"started {attempt - 1} times without finishing (its worker died each time); "
               f"giving up after max_attempts={settings.max_attempts}")
        store.shard_finished(run_id, shard_id, {"status": "error", "error": msg, "worker": base["worker"]})
        return {**base, "status": "error", "error": msg}
    store.shard_started(run_id, shard_id, {"worker": base["worker"], "device": base["device"], "images": stop - start})
    store.touch_worker(base["worker"], current={"run_id": run_id, "shard_id": shard_id, "images": stop - start,
                                                "since": time.time()})
    try:
        if worker_backend != job["backend"]:
            raise NasqError(f"this worker runs backend {worker_backend!r} but the run asked for {job['backend']!r}; "
                            f"start a worker with --backend {job['backend']} on the run's queue")
        source = self.source_for(job["dataset"])
        labels = self.labels_for(job.get("labels"))
        backend = self.backend_for(worker_backend, ModelRef.from_dict(job["model"]), job["batch_size"], precision)
        out = job.get("output")
        writer = OutputWriter(out["dir"], out.get("fmt", "NPY")) if out else None
        result = evaluate_range(source, backend, start, stop, batch_size=job["batch_size"], labels=labels,
                                writer=writer, on_batch=lambda n: store.shard_progress(run_id, shard_id, n),
                                loader_threads=LOADER_THREADS)
    except Exception as e:  # noqa: BLE001 - a shard reports its failure instead of breaking the chord
        log.exception("shard %s of run %s failed", shard_id, run_id)
        msg = f"{type(e).__name__}: {e}"
        store.shard_finished(run_id, shard_id, {"status": "error", "error": msg, "worker": base["worker"]})
        store.touch_worker(base["worker"], current=None)
        return {**base, "status": "error", "error": msg}
    summary = {"status": "ok", "worker": base["worker"], "device": base["device"], "images": len(result["indices"]),
               "errors": len(result["errors"]), **result["timing"]}
    store.shard_finished(run_id, shard_id, summary)
    rate = summary["images"] / summary["wall_s"] if summary["wall_s"] else None
    store.touch_worker(base["worker"], current=None, last_rate_img_s=rate)
    return {**base, "status": "ok", **result, "versions": backend.versions(), "model_info": backend.model_info,
            "device_name": backend.describe_device()}


@app.task(name=TASK_MERGE, bind=True, base=DeviceTask, max_retries=None)
def merge_run(self, results: list, run_id: str, _first_try: float | None = None) -> dict:
    """Chord callback: validate the shard results and compute the report."""
    store = self.store
    manifest = store.manifest(run_id)
    if manifest is None:
        raise RunError(f"run {run_id}: its manifest is gone from Redis (expired or flushed)")
    results = list(results or [])
    results += _late_results(self, manifest, results)
    try:
        report, predictions = merge(manifest, results)
    except MissingShards as e:
        waiting = set(store.running(run_id))
        pending = [sid for sid in e.missing if sid in waiting]
        first_try = _first_try or time.time()
        if pending and time.time() - first_try < MERGE_WAIT_S:
            # A redelivered shard is still running: its result lands in the backend by task id.
            raise self.retry(countdown=5, kwargs={"run_id": run_id, "_first_try": first_try})
        _failed(store, manifest, results, e)
        raise
    except Retry:
        raise
    except NasqError as e:
        _failed(store, manifest, results, e)
        raise
    try:
        report["files"] = write_run_files(report, list(_shard_timings(manifest, results)),
                                          os.path.join(settings.report_dir, run_id))
    except OSError as e:  # the report still reaches Redis and the client
        log.warning("run %s: could not write report files: %s", run_id, e)
    store.save_report(run_id, report, predictions)
    store.set_state(run_id, "done", images=report["images"], top1=report["top1"], top5=report["top5"],
                    throughput_img_s=report["throughput_img_s"])
    return report


def _failed(store: RunStore, manifest: dict, results: list, error: Exception) -> None:
    """Mark the run failed, keeping what it finished: a partial report (and files), so that
    `nasq resume` reruns only the rest."""
    run_id = manifest["run_id"]
    hint = f"{error} -- `nasq resume {run_id}` reruns only the failed or missing shards"
    partial = merge_partial(manifest, results, str(error))
    if partial is not None:
        report, predictions = partial
        try:
            report["files"] = write_run_files(report, list(_shard_timings(manifest, results)),
                                              os.path.join(settings.report_dir, run_id))
        except OSError as e:
            log.warning("run %s: could not write the partial report files: %s", run_id, e)
        store.save_report(run_id, report, predictions)
    store.set_state(run_id, "failed", error=hint, partial=partial is not None)


def _shard_timings(manifest: dict, results: list):
    seen = set()
    for r in results:
        if isinstance(r, dict) and r.get("run_id") == manifest["run_id"] and r.get("status") == "ok" \
                and r["shard_id"] not in seen:
            seen.add(r["shard_id"])
            yield {"worker": r["worker"], "device": r["device"], "images": len(r["indices"]), **r["timing"]}


def _late_results(task, manifest: dict, results: list) -> list:
    """Results of shards absent from the chord's list, fetched from the backend by task id."""
    have = {r.get("shard_id") for r in results if isinstance(r, dict)}
    late = []
    for s in manifest["shards"]:
        if s["shard_id"] in have:
            continue
        res = task.app.AsyncResult(s["task_id"])
        if res.state == "SUCCESS" and isinstance(res.result, dict):
            late.append(res.result)
    return late


@app.task(name=TASK_RUN_FAILED)
def run_failed(request, exc, traceback, run_id: str | None = None) -> None:
    """Errback of the merge (not bound: Celery passes (request, exc, traceback) only to
    unbound errbacks): mark the run failed so waiting clients stop."""
    if run_id:
        _store().set_state(run_id, "failed", error=f"{type(exc).__name__}: {exc}")


@app.task(name=TASK_SWEEP_POINT, bind=True, base=DeviceTask)
def sweep_point(self, point: dict) -> dict:
    """One sweep point on this worker's device: timed compute (bench) or an evaluation (eval).
    The row is written to the sweep's folder (the durable record) and returned."""
    import numpy as np

    from nasq.bench import is_oom, measure, summarize
    from nasq.report import accuracy, write_json
    from nasq.sweep import point_file

    bs = point["batch_size"]
    row = {"sweep_id": point["sweep_id"], "point_id": point["point_id"], "worker": self.request.hostname,
           "device": os.environ.get("NASQ_WORKER_DEVICE", "cpu"), "batch_size": bs, "mode": point["mode"],
           "backend": point["backend"], "precision": point["precision"], "dataset": os.path.basename(point["data"]),
           "dataset_fingerprint": point["dataset_fingerprint"], "finished_at": None}
    b = None
    try:
        b = self.backend_for(point["backend"], ModelRef(point["weights"]), bs, point["precision"])
        b.reset_peak_memory()
        source = self.source_for({"root": point["data"], "fingerprint": point["dataset_fingerprint"]})
        n = min(len(source), point.get("images") or len(source))
        if point["mode"] == "bench":
            crops = np.stack([source.load(i) for i in range(min(n, bs, 64))])
            batch = crops[np.arange(bs) % len(crops)]
            row.update(summarize(measure(b.compute_fn(batch), min_time_s=point["min_time_s"]), bs))
        else:
            lat: list[float] = []
            out = evaluate_range(source, b, 0, n, batch_size=bs, labels=self.labels_for(point.get("labels")),
                                 latencies=lat)
            row.update(summarize(lat, bs))
            row["img_s"] = round(len(out["indices"]) / out["timing"]["compute_s"], 3)
            row.update({k: v for k, v in accuracy(out["labels"], out["top5"]).items() if k != "correct"},
                       images=len(out["indices"]), errors=len(out["errors"]))
        peak = b.peak_memory_bytes()
        row["peak_mib"] = round(peak / 2**20, 1) if peak is not None else None
    except Exception as e:  # noqa: BLE001 - an OOM (or any failure) is a row, not a crash
        row["error"] = "out of memory" if is_oom(e) else f"{type(e).__name__}: {e}"
        if is_oom(e) and DeviceTask._runner is not None:  # drop the model: free the device
            DeviceTask._runner.close()
            DeviceTask._runner, DeviceTask._runner_key = None, None
    if b is not None:
        row.update(versions=b.versions(), device_name=b.describe_device(),
                   model_sha256=b.model_info.get("sha256") or b.model_info.get("artifact_key"))
    row["finished_at"] = time.time()
    path = point_file(point["folder"], point["point_id"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(row, path)
    return row
