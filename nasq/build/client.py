"""Requesting a build: a cache hit answers at once; otherwise the build runs as Celery
chains on the ``build`` queue (a private Redis and build worker when no broker is set)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from ..config import Settings, load_settings
from ..errors import NasqError
from .spec import BuildSpec, make_spec
from .store import ArtifactStore


@dataclass
class BuildResult:
    key: str
    path: str
    meta: dict
    cached: bool

    @property
    def table(self) -> str:
        from .verify import table

        rows = [r for r in self.meta.get("verification") or [] if r]
        lines = [f"artifact  {self.path}", f"key       {self.key}",
                 f"target    {self.meta['target']}  ({'cache hit' if self.cached else 'built in %s s' % self.meta.get('build_s')})",
                 f"files     {', '.join(self.meta.get('files', {}))}"]
        g = self.meta.get("graph")
        if g:
            lines.append(f"graph     {g['nodes']} nodes, {g['slice_nodes']} Slice, {g['consecutive_slice_pairs']} consecutive Slice pairs")
        for s in self.meta.get("steps", []):
            if "command" in s:
                lines.append(f"step      {s['name']} ({s['seconds']} s): {s['command'].splitlines()[0]}")
        if rows:
            lines += ["verification against PyTorch fp32 (fixed batch of generated images):", table(rows)]
        return "\n".join(lines)


def _wait(result, r, key: str, timeout: float | None, log) -> dict:
    t0, last = time.time(), None
    while not result.ready():
        status = r.get(f"nasq:build:status:{key}")
        status = status.decode() if status else "queued"
        if status != last:
            log(f"build {key}: {status}")
            last = status
        if timeout and time.time() - t0 > timeout:
            raise NasqError(f"build {key} did not finish within {timeout:.0f} s (it goes on on the build worker)")
        time.sleep(0.3)
    try:
        return result.get(propagate=True, disable_sync_subtasks=False)
    except NasqError:
        raise
    except Exception as e:
        raise NasqError(f"build {key} failed: {e}") from None
    finally:
        result.backend.remove_pending_result(result)


def _submit(app, spec: BuildSpec):
    from celery import chain

    from ..celery_app import (BUILD_QUEUE, TASK_BUILD_COMMIT, TASK_BUILD_DEVICE, TASK_BUILD_EXPORT,
                              TASK_BUILD_FAILED, TASK_BUILD_SIMPLIFY)

    sig = lambda name, *args: app.signature(name, args=args, queue=BUILD_QUEUE)  # noqa: E731
    if spec.target == "onnx":
        c = chain(sig(TASK_BUILD_EXPORT, spec.to_dict()), sig(TASK_BUILD_SIMPLIFY), sig(TASK_BUILD_COMMIT))
    else:
        c = chain(sig(TASK_BUILD_DEVICE, spec.to_dict()), sig(TASK_BUILD_COMMIT))
    c.link_error(app.signature(TASK_BUILD_FAILED, kwargs={"spec": spec.to_dict()}, queue=BUILD_QUEUE))
    return c.apply_async()


def _require_build_worker(app) -> None:
    from ..celery_app import BUILD_QUEUE

    queues = app.control.inspect(timeout=2.0).active_queues() or {}
    if not any(q["name"] == BUILD_QUEUE for qs in queues.values() for q in qs):
        raise NasqError("no worker consumes the build queue: start one with `nasq worker --queues build` "
                        "(it needs the weights and the artifact directory at the same paths as here)")


def run_build(app, spec: BuildSpec, store: ArtifactStore, *, timeout: float | None, log) -> BuildResult:
    """Build ``spec`` (and the ONNX artifact it needs) through ``app``'s build queue."""
    import redis

    r = redis.Redis.from_url(app.conf.result_backend or app.conf.broker_url)
    if spec.target != "onnx" and store.get(spec.onnx_key) is None:
        onnx_spec = spec.onnx_spec()
        _wait(_submit(app, onnx_spec), r, onnx_spec.key, timeout, log)
    state = _wait(_submit(app, spec), r, spec.key, timeout, log)
    return BuildResult(spec.key, store.path(spec.key), state["meta"], state["cached"])


def cached(*, weights: str, target: str, num_outputs: int | None = None, opset: int | None = None,
           batch_size: int | None = None, settings: Settings) -> BuildResult | None:
    """The artifact if it is already built (no build, no broker needed)."""
    spec = make_spec(weights=weights, target=target, cache_dir=settings.artifact_dir, num_outputs=num_outputs,
                     opset=opset, batch_size=batch_size)
    store = ArtifactStore(settings.artifact_dir)
    meta = store.get(spec.key)
    return BuildResult(spec.key, store.path(spec.key), meta, True) if meta else None


def build(*, weights: str, target: str = "onnx", batch_size: int | None = None, gears: list[int] | None = None,
          opset: int | None = None, soc_version: str | None = None, num_outputs: int | None = None,
          tolerance: float = 1e-4, accept_tolerance: bool = False, broker: str | None = None,
          settings: Settings | None = None, app=None, timeout: float | None = None, log=print) -> BuildResult:
    """Build (or reuse) a verified model artifact.

    Args:
        target: "onnx" (exported, simplified, checked, verified), "ort" (+ ONNX Runtime offline
            optimization), "om" (+ ATC for ``soc_version``), "trt" (+ TensorRT engine).
        batch_size: a fixed batch size (None: dynamic batch); ``gears``: ATC dynamic batch gears.
        opset: ONNX opset (default 17; 11 for om, as ATC accepted in the seed).
        tolerance: max |logit difference| / max |logit| allowed at each step.
        accept_tolerance: keep an artifact that misses the tolerance (a shape mismatch stays fatal).
        app: a Celery app whose build queue to use (default: the configured broker, else a
            private Redis and build worker for the duration of the call).

    Returns:
        BuildResult: artifact directory, key, metadata (verification numbers, commands, timings).
    """
    settings = settings or load_settings(broker_url=broker)
    spec = make_spec(weights=weights, target=target, cache_dir=settings.artifact_dir, num_outputs=num_outputs,
                     opset=opset, batch_size=batch_size, gears=gears, soc_version=soc_version,
                     tolerance=tolerance, accept_tolerance=accept_tolerance)
    store = ArtifactStore(settings.artifact_dir)
    meta = store.get(spec.key)
    if meta is not None:
        return BuildResult(spec.key, store.path(spec.key), meta, True)
    if app is not None:
        return run_build(app, spec, store, timeout=timeout, log=log)
    from ..celery_app import make_app

    if settings.broker_url:
        app = make_app(settings)
        _require_build_worker(app)
        return run_build(app, spec, store, timeout=timeout, log=log)
    from ..local import LocalCluster

    workdir = os.path.join(settings.work_dir, time.strftime("build-%Y%m%d-%H%M%S-") + str(os.getpid()))
    with LocalCluster(devices=[], backend="torch", queue="", workdir=workdir, build_workers=1, settings=settings,
                      log=log) as url:
        local = Settings(**{**settings.__dict__, "broker_url": url, "result_backend": None})
        return run_build(make_app(local), spec, store, timeout=timeout, log=log)
