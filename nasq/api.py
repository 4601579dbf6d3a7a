"""The Python API. Keyword-only functions that return dataclasses; the CLI maps flags onto them.

Example::

    from nasq.api import evaluate
    result = evaluate(weights="nasnetalarge-a1897284.pth", data="/data/imagenet/val",
                      labels="/data/imagenet/val_label.txt", batch_size=8)
    print(result.report["top1"], result.report["throughput_img_s"])
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

from . import backends
from .celery_app import eval_queue, make_app
from .config import Settings, load_settings
from .data import Source, find_labels, open_source, read_labels, stem
from .errors import DatasetError, NasqError, RunError
from .report import render
from .runstate import RunStore
from .spec import ModelRef
from .sweep import SweepHandle, submit_sweep  # noqa: F401  (part of the API; defined in nasq.sweep)


@dataclass
class EvalResult:
    run_id: str
    report: dict
    predictions: dict | None

    @property
    def table(self) -> str:
        return render(self.report)


def _labels_for(source: Source, data: str, labels: str | None) -> str | None:
    path = labels or find_labels(data)
    if path is None:
        return None
    table = read_labels(path)
    if not any(stem(n) in table for n in source.names):
        raise DatasetError(f"none of the {len(source)} images in {source.root} has a label in {path}: "
                           "is it the right label file?")
    return os.path.abspath(path)


def check_weights(weights: str, backend: str) -> str:
    """Check the weights here, before anything is queued: a checkpoint is read (md5 for the
    seed's file, key layout, head size); a built model must suit the backend."""
    from .model import infer_arch, read_checkpoint

    cls = backends.backend_class(backend)
    weights = os.path.abspath(weights)
    if not os.path.exists(weights):
        raise NasqError(f"weights {weights!r} do not exist")
    if weights.endswith((".pth", ".pt")):
        infer_arch(read_checkpoint(weights))
        if ".pth" not in cls.artifact_suffixes and backend != "onnxruntime":
            raise NasqError(f"backend {backend} runs a compiled model ({', '.join(cls.artifact_suffixes)}), "
                            f"not a checkpoint: build one with `nasq build` and pass it as --weights")
    elif not (weights.endswith(cls.artifact_suffixes) or os.path.isfile(os.path.join(weights, "meta.json"))):
        raise NasqError(f"backend {backend} cannot run {weights!r}; it takes {', '.join(cls.artifact_suffixes)}")
    return weights


def needs_build(weights: str, backend: str) -> bool:
    return backend == "onnxruntime" and weights.endswith((".pth", ".pt"))


def prepare_model(*, weights: str, backend: str, num_outputs: int | None, settings: Settings, app=None,
                  log=print) -> ModelRef:
    """What workers load: the checkpoint itself, or (onnxruntime) the verified ORT artifact,
    built once on the build queue and reused."""
    if not needs_build(weights, backend):
        return ModelRef(weights=weights, num_outputs=num_outputs)
    from .build.client import build

    res = build(weights=weights, target="ort", num_outputs=num_outputs, settings=settings, app=app, log=log)
    log(f"onnxruntime artifact {res.key} ({'cache hit' if res.cached else 'built'}): {res.path}")
    return ModelRef(weights=res.path, num_outputs=num_outputs,
                    options={"provenance": {**(res.meta.get("model") or {}), "artifact_key": res.key}})


def _wait(result, store: RunStore, manifest: dict, *, progress: bool, timeout: float | None, cluster=None) -> dict:
    run_id = manifest["run_id"]
    total = manifest["dataset"]["images"]
    bar = None
    interactive = progress and sys.stderr.isatty()
    if interactive:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", desc=f"run {run_id}", file=sys.stderr, dynamic_ncols=True)
    t0 = last_line = time.time()
    try:
        while not result.ready():
            if cluster is not None:
                cluster.check()
            st = store.state(run_id) or {}
            if st.get("state") == "failed":
                raise RunError(st.get("error", f"run {run_id} failed"))
            if timeout and time.time() - t0 > timeout:
                raise RunError(f"run {run_id} did not finish within {timeout:.0f} s; it goes on on the workers")
            done = min(total, store.images_done(run_id))
            if bar is not None:
                bar.n = done
                bar.refresh()
            elif progress and time.time() - last_line >= 10:
                last_line = time.time()
                print(f"run {run_id}: {done}/{total} images, {done / (last_line - t0):.1f} img/s", file=sys.stderr)
            time.sleep(0.5)
        if bar is not None:
            bar.n = total
            bar.refresh()
    finally:
        if bar is not None:
            bar.close()
    try:
        return result.get(propagate=True, disable_sync_subtasks=False)
    except NasqError:
        raise
    except Exception as e:  # a task error comes back re-raised from its serialized form
        raise RunError(f"run {run_id} failed: {e}") from None


def evaluate(*, weights: str, data: str, labels: str | None = None, backend: str = "torch",
             device: str = "auto", workers: int | None = None, batch_size: int = 8,
             shard_size: int | None = None, num_outputs: int | None = None, precision: str | None = None,
             broker: str | None = None, queue: str | None = None, output_dir: str | None = None,
             outfmt: str = "NPY", progress: bool = True, timeout: float | None = None,
             settings: Settings | None = None, log=print) -> EvalResult:
    """Evaluate a checkpoint (or built model) on a dataset folder across workers.

    With no broker configured, starts a private Redis and one local worker per device
    (``workers`` CPU workers when there is no GPU), runs, and stops them. With a broker,
    only submits and waits; workers run wherever they were started.

    Args:
        weights: Cadene-format checkpoint (.pth), or a built model for its backend.
        data: JPEG folder, .bin folder or u8 shard folder.
        labels: val_label.txt (default: one beside or inside ``data``; none: no accuracy).
        num_outputs: None keeps the checkpoint's head; 1000 drops the background class.
        output_dir, outfmt: also write full logits per image in ais_bench's layout.

    Returns:
        EvalResult with the report (see README, "The report") and per-image predictions.

    Raises:
        NasqError: bad weights, data or labels (before anything is queued); RunError if the
            run fails (missing or failed shards, lost local workers).
    """
    from .plugins import component

    submit = component("producer")
    settings = settings or load_settings(broker_url=broker)
    source = open_source(data)
    labels_path = _labels_for(source, data, labels)
    weights = check_weights(weights, backend)
    queue = queue or eval_queue(backend)
    output = {"dir": os.path.abspath(output_dir), "fmt": outfmt.upper()} if output_dir else None

    def run(app_settings: Settings, n_workers: int | None, cluster=None) -> EvalResult:
        app = make_app(app_settings)
        model = prepare_model(weights=weights, backend=backend, num_outputs=num_outputs, settings=app_settings,
                              app=app if cluster is not None else None, log=log)
        store = RunStore(app_settings.backend_url, expires=app_settings.result_expires)
        size = shard_size or submit.auto_shard_size(len(source), n_workers, batch_size)
        manifest, result = submit.submit_run(app, store, dataset=source.describe(), labels=labels_path,
                                             model=model.to_dict(), backend=backend, batch_size=batch_size,
                                             precision=precision, shard_size=size, queue=queue, output=output)
        log(f"run {manifest['run_id']}: {len(source)} images in {len(manifest['shards'])} shards "
            f"of <= {manifest['shards'][0]['stop'] if manifest['shards'] else 0} on queue {queue}")
        if cluster is None:
            _warn_if_unserved(store, queue, log)
        try:
            report = _wait(result, store, manifest, progress=progress, timeout=timeout, cluster=cluster)
        finally:
            # Drop the result subscription now: an embedded Redis is about to stop.
            app.backend.remove_pending_result(result)
        return EvalResult(manifest["run_id"], report, store.predictions(manifest["run_id"]))

    if settings.broker_url:
        return run(settings, workers)
    from .devices import local_devices
    from .local import LocalCluster

    devices = local_devices(backend, device, workers)
    threads = max(1, (os.cpu_count() or 1) // len(devices)) if devices[0] == "cpu" else None
    workdir = os.path.join(settings.work_dir, time.strftime("%Y%m%d-%H%M%S-") + str(os.getpid()))
    build_workers = 0
    if needs_build(weights, backend):
        from .build.client import cached

        build_workers = 0 if cached(weights=weights, target="ort", num_outputs=num_outputs, settings=settings) else 1
    cluster = LocalCluster(devices=devices, backend=backend, queue=queue, workdir=workdir, precision=precision,
                           threads=threads, build_workers=build_workers, settings=settings, log=log)
    with cluster as url:
        local = Settings(**{**settings.__dict__, "broker_url": url, "result_backend": None})
        return run(local, len(devices), cluster=cluster)


def resume(run_id: str, *, broker: str | None = None, settings: Settings | None = None, progress: bool = True,
           timeout: float | None = None, log=print) -> EvalResult:
    """Finish a failed or interrupted run: only its failed or missing shards run again (on the
    run's queue), then the merge combines them with the results the run already has.

    Raises:
        NasqError: no broker, or no such run (records expire after ``result_expires``).
    """
    from .plugins import component

    submit = component("producer")
    settings = settings or load_settings(broker_url=broker)
    if not settings.broker_url:
        raise NasqError("resume needs the broker the run was submitted to (--broker or NASQ_BROKER_URL); an embedded "
                        "run's private Redis is gone with it")
    app = make_app(settings)
    store = RunStore(settings.backend_url, expires=settings.result_expires)
    manifest, result, redo = submit.resume_run(app, store, run_id)
    log(f"run {run_id}: {len(redo)} of {len(manifest['shards'])} shards resubmitted"
        + (f" ({', '.join(redo[:5])}{' ...' if len(redo) > 5 else ''})" if redo else "; merging the stored results"))
    _warn_if_unserved(store, manifest["queue"], log)
    try:
        report = _wait(result, store, manifest, progress=progress, timeout=timeout)
    finally:
        app.backend.remove_pending_result(result)
    return EvalResult(run_id, report, store.predictions(run_id))


def _warn_if_unserved(store: RunStore, queue: str, log) -> None:
    live = [n for n, w in store.workers().items() if w["alive"] and queue in w.get("queues", [])]
    if not live:
        log(f"warning: no live nasq worker consumes queue {queue!r}; the run waits until one starts "
            f"(e.g. `nasq worker --backend {queue.split('.', 1)[-1]}` with the same broker)")


def evaluate_local(*, weights: str, data: str, labels: str | None = None, backend: str = "torch",
                   device: str = "cpu", batch_size: int = 8, num_outputs: int | None = None,
                   precision: str = "fp32", settings: Settings | None = None) -> dict:
    """Single-process reference: the same evaluation in this process, no queue.

    Returns the per-image predictions in the same form as ``EvalResult.predictions``.
    """
    from .evaluate import evaluate_range

    settings = settings or load_settings()
    source = open_source(data)
    labels_path = _labels_for(source, data, labels)
    model = prepare_model(weights=check_weights(weights, backend), backend=backend, num_outputs=num_outputs,
                          settings=settings, log=lambda *_: None)
    b = backends.create(backend, device)
    b.load(model, batch_size=batch_size, precision=precision)
    try:
        out = evaluate_range(source, b, 0, len(source), batch_size=batch_size,
                             labels=read_labels(labels_path) if labels_path else None)
    finally:
        b.close()
    return {k: out[k] for k in ("names", "indices", "labels", "top5", "scores")} | {"errors": out["errors"]}
