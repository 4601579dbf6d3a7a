"""Builds: a verified artifact (ONNX, ORT, OpenVINO IR, .om) made once on the build queue and
reused (``build``), and what workers load for a run (``prepare_model``)."""
from __future__ import annotations

import os
import time

from .. import backends
from ..artifacts.spec import make_spec
from ..artifacts.store import ArtifactStore, BuildResult
from ..config import Settings, load_settings
from ..errors import NasqError
from ..model.spec import ModelRef
from ..queue.local import WorkerSpec
from ..queue.session import Progress, Session
from ..wire import BUILD_QUEUE
from .checks import needs_build, with_roots


def build(*, weights: str, target: str = "onnx", batch_size: int | None = None, gears: list[int] | None = None,
          opset: int | None = None, soc_version: str | None = None, num_outputs: int | None = None,
          tolerance: float = 1e-4, accept_tolerance: bool = False, broker: str | None = None,
          settings: Settings | None = None, session: Session | None = None, timeout: float | None = None,
          log=print) -> BuildResult:
    """Build (or reuse) a verified model artifact on the build queue.

    Args:
        target: "onnx" (exported, simplified, checked, verified), "ort" (+ ONNX Runtime offline
            optimization), "om" (+ ATC for ``soc_version``), "trt" (+ TensorRT engine).
        batch_size: a fixed batch size (None: dynamic batch); ``gears``: ATC dynamic batch gears.
        opset: ONNX opset (default 17; 11 for om, as ATC accepted in the seed).
        tolerance: max |logit difference| / max |logit| allowed at each step.
        accept_tolerance: keep an artifact that misses the tolerance (a shape mismatch stays fatal).
        session: where to build (default: the configured broker, else a private Redis and build
            worker for the duration of the call).

    Returns:
        BuildResult: artifact directory, key, metadata (verification numbers, commands, timings).
    """
    settings = session.settings if session is not None else settings or load_settings(broker_url=broker)
    spec = make_spec(weights=weights, target=target, cache_dir=settings.artifact_dir, num_outputs=num_outputs,
                     opset=opset, batch_size=batch_size, gears=gears, soc_version=soc_version,
                     tolerance=tolerance, accept_tolerance=accept_tolerance)
    artifacts = ArtifactStore(settings.artifact_dir)
    hit = artifacts.result(spec.key)
    if hit is not None:
        return hit
    if session is not None:
        return _build(session, spec, artifacts, timeout=timeout, log=log)
    if not settings.broker_url:
        settings = with_roots(settings, read=[os.path.dirname(spec.weights)])
    with Session.open(settings, workers=[WorkerSpec(queues=(BUILD_QUEUE,))], log=log) as s:
        return _build(s, spec, artifacts, timeout=timeout, log=log)


def _build(session: Session, spec, artifacts: ArtifactStore, *, timeout: float | None, log) -> BuildResult:
    if session.cluster is None:
        session.require_consumer(BUILD_QUEUE, "start one with `nasq worker --queues build` (it needs the weights "
                                              "and the artifact directory at the same paths as here)")

    def one(s) -> dict:
        result = session.submit_build(s)
        try:
            return session.wait(result, label=f"build {s.key}", timeout=timeout, log=log,
                                poll=lambda: Progress(status=session.store.builds.build_status(s.key) or "queued"))
        except NasqError:
            if result.ready():  # a step failed (not a timeout: that build still runs)
                _until_cleaned_up(session.store, s.key)
            raise

    if spec.target != "onnx" and artifacts.verified(spec.onnx_key) is None:
        one(spec.onnx_spec())
    state = one(spec)
    return BuildResult(spec.key, artifacts.path(spec.key), state["meta"], state["cached"])


def _until_cleaned_up(store, key: str, wait_s: float = 30.0) -> None:
    """A failed step is stored (and the client told) before its errback removes the staging
    directory and frees the lock: wait for that (the lock is freed last), so that a failed build
    has left nothing when the error reaches the caller."""
    deadline = time.time() + wait_s
    while store.builds.build_lock(key, "anyone").holder() is not None and time.time() < deadline:
        time.sleep(0.1)


def cached_build(*, weights: str, target: str, num_outputs: int | None = None, settings: Settings,
                 build_options: dict | None = None) -> BuildResult | None:
    """The artifact if it is already built (no build, no broker needed)."""
    spec = make_spec(weights=weights, target=target, cache_dir=settings.artifact_dir, num_outputs=num_outputs,
                     **(build_options or {}))
    return ArtifactStore(settings.artifact_dir).result(spec.key)


def prepare_model(*, weights: str, backend: str, num_outputs: int | None, settings: Settings,
                  session: Session | None = None, build_options: dict | None = None, log=print) -> ModelRef:
    """What workers load: the checkpoint itself, or the verified artifact of the backend's build
    target (onnxruntime: ORT; openvino: OpenVINO IR; ais_bench: an .om, with ``build_options``' chip
    and gears), built once on the build queue and reused."""
    if not needs_build(weights, backend):
        return ModelRef(weights=weights, num_outputs=num_outputs)
    target = backends.backend_class(backend).build_target
    if target == "om" and not build_options:
        raise NasqError(f"backend {backend} runs an .om here: build one with `nasq build --weights {weights} --target "
                        "om --soc-version Ascend310P3 --gears 1,4,8` (on a CANN host) and pass it as --weights")
    res = build(weights=weights, target=target, num_outputs=num_outputs, settings=settings, session=session,
                log=log, **(build_options or {}))
    log(f"{backend} artifact {res.key} ({'cache hit' if res.cached else 'built'}): {res.path}")
    return ModelRef(weights=res.path, num_outputs=num_outputs,
                    options={"provenance": {**(res.meta.get("model") or {}), "artifact_key": res.key}})

