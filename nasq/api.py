"""The Python API: keyword-only functions that return dataclasses; the CLI maps flags onto them.

Example::

    from nasq.api import evaluate
    result = evaluate(weights="nasnetalarge-a1897284.pth", data="/data/imagenet/val",
                      labels="/data/imagenet/val_label.txt", batch_size=8)
    print(result.report["top1"], result.report["throughput_img_s"])

Every check of the user's input (weights, data, labels, precision) happens here, before a
Redis or a worker starts; the queue layer (``nasq.queue``) does the rest.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, replace

import redis

from . import backends
from .artifacts.spec import check_om_options, make_spec
from .artifacts.store import ArtifactStore, BuildResult
from .config import BackendOptions, Settings, load_settings
from .roots import split_paths
from .data.labels import find_labels, out_of_range, read_labels, stem
from .data.sources import Source, check_usable, open_source
from .errors import DatasetError, NasqError, RunError
from .model.spec import ModelRef
from .perf.bench import BenchResult
from .perf.sweep import sweep_folder, point_file, read_rows, sweep_id
from .queue.app import BUILD_QUEUE, eval_queue
from .queue.healing import Healer
from .queue.local import WorkerSpec, cpu_threads, local_devices, worker_name
from .queue.messages import (MAX_BATCH_SIZE, DatasetRef, EvalJob, OutputSpec, SweepPoint, make_manifest,
                             merge_task_id, shard_task_id)
from .queue.session import BROKER_ERRORS, Progress, Session
from .queue.broker import probe
from .queue.store import BrokerFull
from .runstate import RunState, is_ended
from .results.report import render
from .results.sweeps import render_markdown, write_report

__all__ = ["BenchResult", "BuildResult", "EvalResult", "RunHandle", "SweepHandle", "SweepReport", "bench", "build",
           "evaluate", "evaluate_local", "resume", "submit_evaluation", "submit_sweep"]


# ------------------------------------------------------------------------------ checks

def check_precision(backend: str, precision: str | None, compile: str | None = None) -> None:
    """Refuse a precision (or compile mode) the backend does not have, naming the valid ones."""
    valid = backends.precisions(backend)
    if precision is not None and precision not in valid:
        raise NasqError(f"backend {backend} runs precision {', '.join(valid)}, not {precision!r}")
    modes = backends.backend_class(backend).compile_modes
    if compile not in (None, "none") and compile not in modes:
        raise NasqError(f"backend {backend} compiles with {', '.join(modes)}, not {compile!r}")


def check_weights(weights: str, backend: str, num_outputs: int | None = None) -> str:
    """Check the weights here, before anything is queued: a checkpoint is read whole (md5 for
    the seed's file, head size, every key and every shape); a built model must suit the backend."""
    from .model.checkpoint import check_state_dict, read_checkpoint

    cls = backends.backend_class(backend)
    weights = os.path.abspath(weights)
    if not os.path.exists(weights):
        raise NasqError(f"weights {weights} do not exist")
    if weights.endswith((".pth", ".pt")):
        check_state_dict(read_checkpoint(weights), weights, num_outputs)
        if ".pth" not in cls.artifact_suffixes and not needs_build(weights, backend):
            raise NasqError(f"backend {backend} runs a compiled model ({', '.join(cls.artifact_suffixes)}), "
                            f"not a checkpoint: build one with `nasq build` and pass it as --weights")
    elif not (weights.endswith(cls.artifact_suffixes) or os.path.isfile(os.path.join(weights, "meta.json"))):
        raise NasqError(f"backend {backend} cannot run {weights!r}; it takes {', '.join(cls.artifact_suffixes)}")
    return weights


def _labels_for(source: Source, data: str, labels: str | None, *, allow_bad: bool = False) -> str | None:
    path = labels or (find_labels(data) if source.kind != "index" else None)
    if path is None:
        return None
    table = read_labels(path)
    if not any(stem(n) in table for n in source.names):
        raise DatasetError(f"none of the {len(source)} images in {source.root} has a label in {path}: "
                           "is it the right label file?")
    bad = out_of_range(table, source.names)
    if bad and not allow_bad:
        shown = ", ".join(f"{n} {label}" for n, label in bad[:3])
        raise DatasetError(f"{path}: {len(bad)} image(s) have labels outside the ImageNet classes 0-999 (e.g. {shown}); "
                           "they could never be predicted right. Fix the label file, or pass --allow-bad-labels to go "
                           "on (they count as misses)")
    return os.path.abspath(path)


def _with_roots(settings: Settings, *, read=(), write=()) -> Settings:
    """Settings for private local workers: they may read and write what this call names (a
    file's folder, a data folder, an output folder) besides what the settings allow."""
    def join(current: str, extra) -> str:
        return os.pathsep.join([*split_paths(current), *(os.path.abspath(p) for p in extra
                                                         if p and not str(p).startswith("index:"))])
    return replace(settings, read_roots=join(settings.read_roots, read), write_roots=join(settings.write_roots, write))


def _check_worker_roots(session: Session, queue: str, job: EvalJob) -> None:
    """Refuse a run that no live worker of ``queue`` may read (or write) by its roots, naming
    the roots, instead of failing every shard on the workers."""
    from .roots import RootError, Roots

    infos = [(n, w) for n, w in session.store.workers().items()
             if w["alive"] and queue in w.get("queues", []) and "read_roots" in w]
    errors = []
    for name, info in infos:
        try:
            job.within(Roots.of(info["read_roots"], info["write_roots"]))
            return
        except RootError as e:
            errors.append(f"{name}: {e}")
    if errors:
        raise NasqError(f"no live worker on {queue} may use this run's paths; {errors[0]}")


def needs_build(weights: str, backend: str) -> bool:
    """A checkpoint given to a backend that runs a built model (onnxruntime, openvino)."""
    return backends.backend_class(backend).build_target is not None and weights.endswith((".pth", ".pt"))


# ------------------------------------------------------------------------------ builds

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
        settings = _with_roots(settings, read=[os.path.dirname(spec.weights)])
    with Session.open(settings, workers=[WorkerSpec(queues=(BUILD_QUEUE,))], log=log) as s:
        return _build(s, spec, artifacts, timeout=timeout, log=log)


def _build(session: Session, spec, artifacts: ArtifactStore, *, timeout: float | None, log) -> BuildResult:
    if session.cluster is None:
        session.require_consumer(BUILD_QUEUE, "start one with `nasq worker --queues build` (it needs the weights "
                                              "and the artifact directory at the same paths as here)")

    def one(s) -> dict:
        return session.wait(session.submit_build(s), label=f"build {s.key}", timeout=timeout, log=log,
                            poll=lambda: Progress(status=session.store.build_status(s.key) or "queued"))

    if spec.target != "onnx" and artifacts.get(spec.onnx_key) is None:
        one(spec.onnx_spec())
    state = one(spec)
    return BuildResult(spec.key, artifacts.path(spec.key), state["meta"], state["cached"])


def cached_build(*, weights: str, target: str, num_outputs: int | None = None, settings: Settings,
                 build_options: dict | None = None) -> BuildResult | None:
    """The artifact if it is already built (no build, no broker needed)."""
    spec = make_spec(weights=weights, target=target, cache_dir=settings.artifact_dir, num_outputs=num_outputs,
                     **(build_options or {}))
    return ArtifactStore(settings.artifact_dir).result(spec.key)


def build_options_for(backend: str, weights: str, *, batch_size: int, soc_version: str | None = None,
                      gears: list[int] | None = None) -> dict:
    """What the backend's build target needs besides the checkpoint: for ais_bench (an ATC
    build), the chip and either the batch gears or the one batch size, as the seed builds one
    .om per batch size.

    Raises:
        NasqError: --soc-version/--gears where no .om is built, an ATC build without a chip, or a
            batch size that is not one of the gears.
    """
    if not needs_build(weights, backend) or backends.backend_class(backend).build_target != "om":
        if soc_version or gears:
            raise NasqError("--soc-version and --gears say how to build an .om from a checkpoint (--backend ais_bench "
                            f"with a .pth); they do not apply to --backend {backend} with {os.path.basename(weights)}")
        return {}
    if not soc_version:
        raise NasqError("the ais_bench backend runs an .om: pass --soc-version (e.g. Ascend310P3, see `npu-smi info`) "
                        "to build one on the build queue (a build worker on a CANN host, with atc), or --weights X.om")
    if gears and batch_size not in gears:
        raise NasqError(f"-b {batch_size} is not one of the gears {','.join(map(str, gears))}")
    check_om_options(soc_version, gears)
    return {"soc_version": soc_version, "gears": sorted(gears)} if gears else \
        {"soc_version": soc_version, "batch_size": batch_size}


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


# ------------------------------------------------------------------------------ evaluations

@dataclass
class EvalResult:
    run_id: str
    report: dict
    predictions: dict | None
    #: what the merging worker could not do once the report was final (the run history not
    #: updated, files not moved into place), by what
    notes: dict | None = None
    #: the run's Redis was the command's own (an embedded run): it is gone once the command ends
    embedded: bool = False

    @property
    def table(self) -> str:
        return render(self.report)


@dataclass
class RunHandle:
    """A submitted evaluation: ``wait()`` follows it to its report."""

    run_id: str
    manifest: dict
    result: object
    session: Session
    #: the command that submits the same run again (said when a broker lost the run)
    rerun: str = "submit the evaluation again"

    def wait(self, *, progress: bool = True, timeout: float | None = None, log=print) -> EvalResult:
        """Follow the run's record to its report. While waiting, shards whose worker is gone
        (lease expired) are dispatched again (``nasq.queue.healing``); a broker that goes away
        is waited for (until ``timeout``)."""
        store, run_id, total = self.session.store, self.run_id, self.manifest["dataset"]["images"]
        every = max(1.0, self.session.settings.lease_s / 3)
        last_heal, full = [time.time()], [None]
        healer = Healer.for_settings(self.session.app, store, self.session.settings)

        def poll() -> Progress:
            if not store.has_run(run_id):
                return Progress(failed=f"the broker lost run {run_id} (it restarted without persistence, or the "
                                       f"records expired); rerun it with: {self.rerun}")
            if time.time() - last_heal[0] >= every:
                last_heal[0] = time.time()
                full[0] = None
                try:
                    for sid in healer.heal(run_id):
                        log(f"run {run_id}: {sid} dispatched again (its worker or its message was lost)")
                except (BrokerFull, redis.exceptions.OutOfMemoryError):
                    full[0] = store.full_message()
            st = store.state(run_id) or {}
            failed = st.get("error", f"run {run_id} {st['state']}") \
                if st.get("state") in (RunState.FAILED, RunState.CANCELLED) else None
            return Progress(done=min(total, store.images_done(run_id)), failed=failed, status=full[0])

        try:
            report = self.session.wait(_RunRecord(store, run_id), label=f"run {run_id}", poll=poll, total=total,
                                       timeout=timeout, progress=progress, log=log)
        finally:
            if self.result is not None:
                self.session.app.backend.remove_pending_result(self.result)
        # the merging worker moves the files into place and records the run after the state says
        # done: wait for that (renames and one row), so that every path printed exists
        deadline = time.time() + 60
        while not store.published(run_id) and time.time() < deadline:
            time.sleep(0.1)
        return EvalResult(run_id, report, store.predictions(run_id), store.notes(run_id),
                          embedded=self.session.cluster is not None)

    def close(self) -> None:
        """Drop the connections of a handle from ``submit_evaluation`` (the run goes on)."""
        self.session.close()


class _RunRecord:
    """A run's record as something to wait on: ready once the run is done (its report) or failed.
    The chord's own result is not enough: a run that heals is merged outside the chord."""

    def __init__(self, store, run_id: str):
        self.store, self.run_id = store, run_id

    def ready(self) -> bool:
        return is_ended((self.store.state(self.run_id) or {}).get("state"))

    def get(self, **_) -> dict:
        st = self.store.state(self.run_id) or {}
        if st.get("state") != RunState.DONE:
            raise RunError(st.get("error", f"run {self.run_id} failed"))
        return self.store.report(self.run_id)


@dataclass(frozen=True)
class _Plan:
    """An evaluation checked and ready to submit."""

    weights: str
    source: Source
    labels: str | None
    backend: str
    batch_size: int
    precision: str | None
    num_outputs: int | None
    output: OutputSpec | None
    #: the build target's options (ais_bench: chip, gears or batch size)
    build: dict


def _plan(*, weights, data, labels, backend, batch_size, precision, num_outputs, output_dir, outfmt,
          allow_bad_labels: bool = False, soc_version: str | None = None, gears: list[int] | None = None) -> _Plan:
    check_precision(backend, precision)
    if not (isinstance(batch_size, int) and 1 <= batch_size <= MAX_BATCH_SIZE):
        raise NasqError(f"batch_size must be 1 to {MAX_BATCH_SIZE}, not {batch_size!r}")
    source = open_source(data)
    check_usable(source)
    output = OutputSpec(os.path.abspath(output_dir), outfmt.upper()) if output_dir else None
    weights = check_weights(weights, backend, num_outputs)
    return _Plan(weights=weights, source=source, labels=_labels_for(source, data, labels, allow_bad=allow_bad_labels),
                 backend=backend, batch_size=batch_size, precision=precision, num_outputs=num_outputs, output=output,
                 build=build_options_for(backend, weights, batch_size=batch_size, soc_version=soc_version, gears=gears))


def _submit(session: Session, plan: _Plan, *, queue: str, shard_size: int | None, workers: int | None,
            rerun: str | None, log) -> RunHandle:
    from .files import cached_sha256, file_digest
    from .queue.transport import BrokerView
    from .queue.trust import ManifestTrust

    model = prepare_model(weights=plan.weights, backend=plan.backend, num_outputs=plan.num_outputs,
                          settings=session.settings, session=session, build_options=plan.build, log=log)
    if os.path.isfile(model.weights):  # every shard checks that the workers load this file
        model = replace(model, sha256=cached_sha256(model.weights, os.path.join(session.settings.artifact_dir,
                                                                                ".digests.json")))
    job = EvalJob(dataset=DatasetRef(**plan.source.describe()), labels=plan.labels, model=model, backend=plan.backend,
                  batch_size=plan.batch_size, precision=plan.precision, output=plan.output,
                  labels_sha256=file_digest(plan.labels) if plan.labels else None)
    if session.cluster is None:  # a deployment: warn first, and plan for the workers serving the queue now
        live = _warn_if_unserved(session, queue, log)
        _check_worker_roots(session, queue, job)
        for warning in session.store.broker_warnings():
            log(f"warning: {warning}")
        workers = workers or len(live) or None
    if session.store.is_full():
        raise BrokerFull(f"nothing was queued: {session.store.full_message()}")
    broker = BrokerView.for_app(session.app, session.settings)
    try:
        broker_id = broker.server_id()
    finally:
        broker.close()
    manifest = make_manifest(job, queue=queue, shard_size=shard_size, workers=workers, broker_id=broker_id)
    run_id = manifest["run_id"]
    sealed = ManifestTrust(session.app).seal(manifest)
    try:
        session.store.save_manifest(manifest, sealed)
        session.store.add_merge_id(run_id, merge_task_id(run_id))
        result = session.submit_run(manifest)
        session.store.transition(run_id, "start", shards=len(manifest["shards"]))
    except (BrokerFull, redis.exceptions.OutOfMemoryError):
        raise BrokerFull(f"run {run_id} could not be submitted whole: {session.store.full_message()}. Once memory is "
                         f"freed, finish it with `nasq resume {run_id}`") from None
    except BROKER_ERRORS as e:
        raise RunError(f"the broker went away while run {run_id} was being submitted ({e}); when it is back, "
                       f"rerun it with: {rerun or 'the same command'}") from None
    log(f"run {run_id}: {len(plan.source)} images in {len(manifest['shards'])} shards "
        f"of <= {max((s['stop'] - s['start'] for s in manifest['shards']), default=0)} on queue {queue}")
    return RunHandle(run_id, manifest, result, session, rerun=rerun or "submit the evaluation again")


def _warn_if_unserved(session: Session, queue: str, log) -> list[str]:
    """The live workers of ``queue``; a warning when there are none."""
    live = session.live_workers(queue)
    if not live:
        log(f"warning: no live nasq worker consumes queue {queue!r}; the run waits until one starts "
            f"(e.g. `nasq worker --backend {queue.split('.', 1)[-1]}` with the same broker)")
    return live


def submit_evaluation(*, weights: str, data: str, labels: str | None = None, backend: str = "torch",
                      batch_size: int = 8, shard_size: int | None = None, num_outputs: int | None = None,
                      precision: str | None = None, queue: str | None = None, output_dir: str | None = None,
                      outfmt: str = "NPY", broker: str | None = None, settings: Settings | None = None,
                      allow_bad_labels: bool = False, rerun: str | None = None, soc_version: str | None = None,
                      gears: list[int] | None = None, log=print) -> RunHandle:
    """Queue an evaluation on a running deployment and return at once (what ``python -m producer``
    does). ``RunHandle.wait()`` follows it; ``nasq status RUN_ID`` too, from any machine.

    Raises:
        NasqError: no broker configured, or bad weights, data, labels or precision.
    """
    settings = settings or load_settings(broker_url=broker)
    if not settings.broker_url:
        raise NasqError("no broker: pass --broker redis://HOST:6379/0 or set NASQ_BROKER_URL")
    check_precision(backend, precision)
    probe(settings)  # the broker first: a wrong password or a silent broker is one line before the heavy checks
    plan = _plan(weights=weights, data=data, labels=labels, backend=backend, batch_size=batch_size,
                 precision=precision, num_outputs=num_outputs, output_dir=output_dir, outfmt=outfmt,
                 allow_bad_labels=allow_bad_labels, soc_version=soc_version, gears=gears)
    session = Session(settings)
    try:
        return _submit(session, plan, queue=queue or eval_queue(backend), shard_size=shard_size, workers=None,
                       rerun=rerun, log=log)
    except BaseException:
        session.close()
        raise


def evaluate(*, weights: str, data: str, labels: str | None = None, backend: str = "torch",
             device: str = "auto", workers: int | None = None, batch_size: int = 8,
             shard_size: int | None = None, num_outputs: int | None = None, precision: str | None = None,
             compile: str | None = None, cuda_graphs: bool = False, kernels: str = "torch", broker: str | None = None,
             queue: str | None = None, output_dir: str | None = None, outfmt: str = "NPY", progress: bool = True,
             timeout: float | None = None, settings: Settings | None = None, allow_bad_labels: bool = False,
             rerun: str | None = None, soc_version: str | None = None, gears: list[int] | None = None,
             log=print) -> EvalResult:
    """Evaluate a checkpoint (or built model) on a dataset folder across workers.

    With no broker configured, starts a private Redis and one local worker per device
    (``workers`` CPU workers when there is no GPU), runs, and stops them. With a broker,
    only submits and waits; workers run wherever they were started.

    Args:
        weights: Cadene-format checkpoint (.pth), or a built model for its backend.
        data: JPEG folder, .bin folder or u8 shard folder.
        labels: val_label.txt (default: one beside or inside ``data``; none: no accuracy).
        num_outputs: None keeps the checkpoint's head; 1000 drops the background class.
        compile, cuda_graphs, kernels: embedded runs: options of the local workers.
        rerun: the command that submits this run again, said if a broker loses the run.
        output_dir, outfmt: also write full logits per image in ais_bench's layout.
        soc_version, gears: ais_bench with a checkpoint: the chip the .om is built for (ATC on the
            build queue) and its dynamic batch gears (default: a static .om of ``batch_size``).

    Returns:
        EvalResult with the report (see README, "The report") and per-image predictions.

    Raises:
        NasqError: bad weights, data, labels or precision (before anything starts); RunError if
            the run fails (missing or failed shards, lost local workers).
    """
    settings = settings or load_settings(broker_url=broker)
    check_precision(backend, precision, compile)
    if settings.broker_url:
        probe(settings)  # the broker first: a wrong password or a silent broker is one line before the heavy checks
    plan = _plan(weights=weights, data=data, labels=labels, backend=backend, batch_size=batch_size,
                 precision=precision, num_outputs=num_outputs, output_dir=output_dir, outfmt=outfmt,
                 allow_bad_labels=allow_bad_labels, soc_version=soc_version, gears=gears)
    queue = queue or eval_queue(backend)
    local = None
    if not settings.broker_url:
        devices = local_devices(backend, device, workers)
        for d in dict.fromkeys(devices):  # a device that is not there: one line before anything starts
            backends.backend_class(backend).check_device(d)
        settings = _with_roots(settings, read=[plan.source.root, os.path.dirname(plan.weights),
                                               plan.labels and os.path.dirname(plan.labels)],
                               write=[plan.output.dir if plan.output else None])
        threads = cpu_threads(devices)
        local = [WorkerSpec(device=d, backend=backend, queues=(queue,), precision=precision,
                            threads=threads if d == "cpu" else None, compile=compile, cuda_graphs=cuda_graphs,
                            kernels=kernels)
                 for d in devices]
        if needs_build(plan.weights, backend) and not cached_build(
                weights=plan.weights, target=backends.backend_class(backend).build_target, num_outputs=num_outputs,
                settings=settings, build_options=plan.build):
            local.append(WorkerSpec(queues=(BUILD_QUEUE,)))
        workers = len(devices)
    with Session.open(settings, workers=local, log=log) as session:
        handle = _submit(session, plan, queue=queue, shard_size=shard_size, workers=workers, rerun=rerun, log=log)
        return handle.wait(progress=progress, timeout=timeout, log=log)


def resume(run_id: str, *, broker: str | None = None, settings: Settings | None = None, progress: bool = True,
           timeout: float | None = None, log=print) -> EvalResult:
    """Finish a failed or interrupted run: only its failed or lost shards run again (on the run's
    queue, with the same task ids), then the merge combines them with the results the run
    already has. A shard that is queued, delivered or running on a live worker is left alone: on
    a healthy run, resume sends nothing and follows the run to its report.

    Raises:
        NasqError: no broker, no such run (records expire after ``result_expires``), a run that
            is done or cancelled, or (with message signing on) a run record that is not signed.
    """
    settings = settings or load_settings(broker_url=broker)
    if not settings.broker_url:
        raise NasqError("resume needs the broker the run was submitted to (--broker or NASQ_BROKER_URL); an embedded "
                        "run's private Redis is gone with it")
    session = Session(settings)
    try:
        store = session.store
        healer = Healer.for_settings(session.app, store, settings)
        manifest = healer.trust.manifest(store, run_id)
        if manifest is None:
            raise NasqError(f"no run {run_id!r} in this Redis (runs expire after result_expires)")
        state = store.state_name(run_id)
        if state in (RunState.DONE, RunState.CANCELLED):
            raise NasqError(f"run {run_id} is {state}; there is nothing to resume (`nasq status {run_id}` shows it)")
        plan = shards_to_redo(store, healer.broker, manifest, lease_s=settings.lease_s)
        # each shard sent again is claimed first: a concurrent resume, or healing, sends it once
        redo = [sid for sid, why in plan.items() if why in ("failed", "lost", "missing")
                and (store.claim_lost(run_id, sid) if why == "lost" else store.claim_stranded(run_id, sid))]
        busy = sum(1 for why in plan.values() if why in ("queued", "running"))
        if not redo and state == RunState.RUNNING and busy:
            log(f"run {run_id}: nothing to resubmit ({busy} shard(s) queued or running on live workers); following it")
            result = None
        else:
            n = store.next_resume(run_id)
            ok, now = store.transition(run_id, "resume", merge_id=merge_task_id(run_id, n), forget=tuple(redo),
                                       shards=len(manifest["shards"]), resumed=len(redo))
            if not ok:
                raise NasqError(f"run {run_id} is {now}; not resumed")
            result = session.submit_run(manifest, [s for s in manifest["shards"] if s["shard_id"] in redo],
                                        merge_id=merge_task_id(run_id, n))
            log(f"run {run_id}: {len(redo)} of {len(manifest['shards'])} shards resubmitted"
                + (f" ({', '.join(redo[:5])}{' ...' if len(redo) > 5 else ''})" if redo
                   else "; merging the stored results")
                + (f"; {busy} queued or running left alone" if busy else ""))
        _warn_if_unserved(session, manifest["queue"], log)
    except BaseException:
        session.close()
        raise
    with session:
        return RunHandle(run_id, manifest, result, session).wait(progress=progress, timeout=timeout, log=log)


def shards_to_redo(store, broker, manifest: dict, *, lease_s: float) -> dict[str, str]:
    """What each unfinished shard of a run is doing, as ``nasq resume`` sees it: "failed" (its
    last copy failed), "lost" (recorded as running, its lease expired), "running" (on a live
    worker), "queued" (its message waits in the queue, was delivered less than a lease ago, or
    was just sent again by healing) or "missing" (its message is nowhere: lost with a broker, or
    discarded). Shards that have their result are not listed."""
    run_id = manifest["run_id"]
    results, finished, running = store.result_ids(run_id), store.finished(run_id), store.running(run_id)
    lost = set(store.lost_shards(run_id))
    queued, unacked = broker.queued_task_ids(manifest["queue"]), broker.unacked_ages()
    recent = {sid for sid, t in store.redispatched_at(run_id).items() if time.time() - t < lease_s}
    out = {}
    for s in manifest["shards"]:
        sid, tid = s["shard_id"], shard_task_id(run_id, s["shard_id"])
        if sid in results:
            continue
        if sid in running:
            out[sid] = "lost" if sid in lost else "running"
        elif tid in queued or unacked.get(tid, lease_s + 1) <= lease_s or sid in recent:
            out[sid] = "queued"
        elif finished.get(sid, {}).get("status") == "error":
            out[sid] = "failed"
        else:
            out[sid] = "missing"
    return out


def evaluate_local(*, weights: str, data: str, labels: str | None = None, backend: str = "torch",
                   device: str = "cpu", batch_size: int = 8, num_outputs: int | None = None,
                   precision: str = "fp32", settings: Settings | None = None, soc_version: str | None = None,
                   gears: list[int] | None = None) -> dict:
    """Single-process reference: the same evaluation in this process, no queue.

    Returns the per-image predictions in the same form as ``EvalResult.predictions``.
    """
    from .inference.evaluate import evaluate_range

    settings = settings or load_settings()
    plan = _plan(weights=weights, data=data, labels=labels, backend=backend, batch_size=batch_size,
                 precision=precision, num_outputs=num_outputs, output_dir=None, outfmt="NPY",
                 soc_version=soc_version, gears=gears)
    model = prepare_model(weights=plan.weights, backend=backend, num_outputs=num_outputs, settings=settings,
                          build_options=plan.build, log=lambda *_: None)
    b = backends.create(backend, device)
    b.load(model, batch_size=batch_size, options=BackendOptions(precision=precision))
    try:
        out = evaluate_range(plan.source, b, 0, len(plan.source), batch_size=batch_size,
                             labels=read_labels(plan.labels) if plan.labels else None)
    finally:
        b.close()
    return {k: out[k] for k in ("names", "indices", "labels", "top5", "scores")} | {"errors": out["errors"]}


# ------------------------------------------------------------------------------ history, compare, cancel

def _store_or_none(settings: Settings):
    """The run store of the configured broker (checked), or None without one."""
    from .queue.broker import probe
    from .queue.store import RunStore

    if not settings.broker_url:
        return None
    probe(settings)
    return RunStore.for_settings(settings)


def list_runs(*, state: str | None = None, backend: str | None = None, since_days: float | None = None,
              limit: int = 20, broker: str | None = None, settings: Settings | None = None) -> list[dict]:
    """Recent runs, newest first: from the broker (when one is configured) and from the run
    history in the report dir, which outlives Redis. Each row: run_id, created, state, model,
    backend, precision, devices, batch_size, images, top1, top5, throughput_img_s, ..."""
    from .results.status import runs_rows

    settings = settings or load_settings(broker_url=broker)
    since = time.time() - since_days * 86400 if since_days else None
    return runs_rows(_store_or_none(settings), settings.report_dir, state=state, backend=backend, since=since,
                     limit=limit)


def load_run(run_id: str, *, settings: Settings) -> tuple[dict, dict | None]:
    """A run's report and per-image predictions: from the broker while it holds them, else from
    the report folder the history index names.

    Raises:
        NasqError: no such run in either place, or it has no report (it did not finish a shard).
    """
    import json

    from .results.history import get

    store = _store_or_none(settings)
    if store is not None and store.report(run_id):
        return store.report(run_id), store.predictions(run_id)
    row = get(settings.report_dir, run_id)
    path = (row or {}).get("report") or os.path.join(settings.report_dir, run_id, "report.json")
    if not os.path.isfile(path):
        raise NasqError(f"no report of run {run_id!r} in the broker or in {settings.report_dir} (runs table: "
                        "`nasq runs`)")
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    pred_path = os.path.join(os.path.dirname(path), "predictions.json")
    predictions = None
    if os.path.isfile(pred_path):
        with open(pred_path, encoding="utf-8") as f:
            predictions = json.load(f)
    return report, predictions


def compare_runs(run_a: str, run_b: str, *, broker: str | None = None, settings: Settings | None = None) -> dict:
    """``nasq compare``: accuracy on the images both runs saw (difference with a 95 % interval,
    McNemar's exact test), images whose top-1 changed, throughput per device, configuration
    differences. See ``nasq.results.compare``."""
    from .results.compare import compare

    settings = settings or load_settings(broker_url=broker)
    (a, pa), (b, pb) = load_run(run_a, settings=settings), load_run(run_b, settings=settings)
    if pa is None or pb is None:
        raise NasqError(f"run {run_a if pa is None else run_b} has no per-image predictions to compare")
    return compare(a, pa, b, pb)


def cancel(run_id: str, *, broker: str | None = None, settings: Settings | None = None, log=print) -> dict | None:
    """Cancel a run: mark it cancelled (its running shards stop at their next progress, shards that
    start later skip themselves, a late result or merge changes nothing), revoke its queued and
    running shards and its merges (a running shard is stopped at once), and keep what finished as
    a partial report. Returns that report (None if no shard had finished).

    Raises:
        NasqError: no broker, no such run, or a run that already ended.
    """
    from .queue.trust import ManifestTrust
    from .results.run import cancel_run

    settings = settings or load_settings(broker_url=broker)
    if not settings.broker_url:
        raise NasqError("cancel needs the broker the run was submitted to (--broker or NASQ_BROKER_URL)")
    with Session(settings) as session:
        store = session.store
        manifest = ManifestTrust(session.app).manifest(store, run_id)
        if manifest is None:
            raise NasqError(f"no run {run_id!r} in this Redis (runs expire after result_expires)")
        kept = store.result_ids(run_id)
        ids = [shard_task_id(run_id, s["shard_id"]) for s in manifest["shards"] if s["shard_id"] not in kept]

        def revoke() -> None:
            session.app.control.revoke(ids + store.merge_ids(run_id), terminate=True, signal="SIGTERM")
            log(f"run {run_id}: cancelled; {len(ids)} shard(s) and its merge revoked")

        partial = cancel_run(store, run_id, settings.report_dir, manifest=manifest, after_cancel=revoke)
        log(f"run {run_id}: " + (f"partial report of {partial['images']} images kept" if partial
                                 else "no shard had finished"))
        return partial


# ------------------------------------------------------------------------------ benchmarks

def bench(*, backend: str = "torch", device: str = "cpu", precision: str = "fp32", compile: str = "none",
          cuda_graphs: bool = False, kernels: str = "torch", device_decode: bool = False, batch_sizes: list[int],
          mode: str = "compute",
          weights: str | None = None, data: str | None = None, arch: str = "large", baseline: bool = True,
          min_time_s: float = 2.0, settings: Settings | None = None, log=print) -> BenchResult:
    """``nasq bench``: one backend configuration plus eager baselines, in this process.
    A backend that runs a built model (onnxruntime) gets the verified artifact, built once.
    See ``nasq.perf.bench.bench``."""
    from .demo import prepare
    from .perf.bench import bench as run_bench

    check_precision(backend, precision, compile)
    settings = settings or load_settings()
    options = BackendOptions(precision=precision, compile=compile, cuda_graphs=cuda_graphs, kernels=kernels,
                             device_decode=device_decode,
                             cache_dir=os.path.join(settings.artifact_dir, "inductor-cache"))
    workdir = os.path.expanduser(f"~/.cache/nasq/bench-{arch}")
    if weights is None or data is None:
        demo = prepare(workdir, 32, arch=arch, batch_size=8, log=log)
        weights, data = weights or demo["weights"], data or demo["data"]
    target = None
    if backend != "torch":
        target = prepare_model(weights=os.path.abspath(weights), backend=backend, num_outputs=None,
                               settings=settings, log=log)
    return run_bench(backend=backend, device=device, options=options, batch_sizes=batch_sizes, mode=mode,
                     weights=weights, target=target, data=data, arch=arch, baseline=baseline, min_time_s=min_time_s,
                     workdir=workdir, log=log)


# ------------------------------------------------------------------------------ sweeps

@dataclass(frozen=True)
class SweepReport:
    """A sweep's rows, the report files written (JSON, CSV, Markdown, plots), the Markdown table."""

    rows: list[dict]
    files: dict
    markdown: str


class SweepHandle:
    """A submitted sweep: ``status()``, ``wait()``, ``report()``; ``close()`` stops a private cluster."""

    def __init__(self, sweep_id: str, folder: str, points: list[SweepPoint], *, session: Session | None = None,
                 result=None, reused: int = 0):
        self.sweep_id, self.folder, self.points = sweep_id, folder, points
        self.session, self.result, self.reused = session, result, reused

    @property
    def cluster(self):
        return self.session.cluster if self.session is not None else None

    def status(self) -> dict:
        rows = read_rows(self.folder, [p.point_id for p in self.points])
        done = {r["point_id"] for r in rows}
        return {"sweep_id": self.sweep_id, "total": len(self.points), "done": len(rows),
                "errors": sum(1 for r in rows if r.get("error")), "reused": self.reused,
                "pending": [p.point_id for p in self.points if p.point_id not in done]}

    def wait(self, timeout: float | None = None, *, progress: bool = False, log=print) -> dict:
        """Until every point has its row; a private cluster stops once they all have."""
        if self.result is not None:
            try:
                self.session.wait(self.result, label=self.sweep_id, total=len(self.points), unit="points",
                                  timeout=timeout, progress=progress, log=log,
                                  poll=lambda: Progress(done=self.reused + self.result.completed_count()))
            finally:
                if self.status()["done"] == len(self.points):
                    self.close()
        return self.status()

    def report(self, out_dir: str | None = None) -> SweepReport:
        """Rows of the finished points, written as JSON, CSV, Markdown and two PNG plots."""
        rows = read_rows(self.folder, [p.point_id for p in self.points])
        return SweepReport(rows, write_report(rows, out_dir or self.folder), render_markdown(rows))

    def close(self) -> None:
        if self.session is not None:
            self.session.close()


def submit_sweep(*, batch_sizes: list[int], weights: str, data: str, backend: str = "torch", precision: str = "fp32",
                 devices: list[str] | None = None, workers: int | None = None, mode: str = "bench",
                 labels: str | None = None, images: int | None = None, min_time_s: float = 2.0,
                 broker: str | None = None, settings: Settings | None = None, log=print) -> SweepHandle:
    """Queue a batch-size sweep and return at once.

    Args:
        batch_sizes: the points, per device.
        devices: worker names to run on (default: every live worker of ``backend``). Without a
            broker: local devices ("cpu", "cuda:0", ...); ``workers`` CPU workers by default 2.
        mode: "bench" (compute latency/throughput, ``min_time_s`` per point) or "eval" (the
            dataset, or its first ``images``, evaluated: throughput plus top-1/top-5).

    Returns:
        SweepHandle. Points already measured by an identical sweep are reused, not rerun; a
        point that runs out of memory becomes an error row.
    """
    from .files import cached_sha256, write_json

    if mode not in SweepPoint.MODES:
        raise NasqError(f"mode must be one of {', '.join(SweepPoint.MODES)}, not {mode!r}")
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise NasqError("batch_sizes must be positive integers")
    check_precision(backend, precision)
    settings = settings or load_settings(broker_url=broker)
    source = open_source(data)
    if mode == "eval":
        labels = labels or find_labels(data)
    labels = os.path.abspath(labels) if labels else None
    weights = check_weights(weights, backend)
    session = None
    if settings.broker_url:
        session = Session(settings)
        try:
            slots = _slots(session, backend, devices)
        except BaseException:
            session.close()
            raise
    else:
        local_devs = devices or ["cpu"] * (workers or 2)
        host = socket.gethostname()
        slots = _number([(host, d, worker_name(d, i)) for i, d in enumerate(local_devs)])
        settings = _with_roots(settings, read=[source.root, os.path.dirname(weights),
                                               labels and os.path.dirname(os.path.abspath(labels))])
    names = [name for _, name in slots]
    # What defines the measurement (not worker names, which carry PIDs): a restarted worker on
    # the same device continues the same sweep.
    definition = {"mode": mode, "backend": backend, "precision": precision, "batch_sizes": sorted(set(batch_sizes)),
                  "devices": sorted(slot for slot, _ in slots), "dataset": source.fingerprint, "images": images,
                  "labels": labels, "min_time_s": min_time_s,
                  "weights": cached_sha256(weights, os.path.join(settings.artifact_dir, ".digests.json"))}
    sid = sweep_id(definition)
    folder = sweep_folder(settings.report_dir, sid)
    spec_file = os.path.join(folder, "sweep_spec.json")
    if not os.path.isfile(spec_file):
        write_json(definition | {"weights_path": weights, "data": source.root, "created": time.time()}, spec_file)
    # what the workers load: the checkpoint, or the backend's built artifact (built once here)
    model_path = prepare_model(weights=weights, backend=backend, num_outputs=None, settings=settings, session=session,
                               log=log).weights
    points = [SweepPoint.from_payload({  # checked here, as the worker will
        "sweep_id": sid, "point_id": f"{slot}|bs{bs}", "folder": folder, "worker": name, "batch_size": bs,
        "mode": mode, "backend": backend, "precision": precision, "weights": model_path, "data": source.root,
        "dataset_fingerprint": source.fingerprint, "labels": labels, "images": images, "min_time_s": min_time_s})
        for slot, name in slots for bs in definition["batch_sizes"]]
    todo = [p for p in points if not os.path.isfile(point_file(folder, p.point_id))]
    reused = len(points) - len(todo)
    result = None
    if todo:
        if session is None:  # no broker: local workers for the duration of the sweep
            threads = cpu_threads(local_devs)
            session = Session.open(settings, log=log, workers=[
                WorkerSpec(device=d, backend=backend, queues=(eval_queue(backend),), name=n, precision=precision,
                           threads=threads if d == "cpu" else None) for d, n in zip(local_devs, names)])
        try:
            result = session.submit_sweep(todo)
        except BaseException:
            session.close()
            raise
    log(f"{sid}: {len(points)} points on {len(names)} device(s), {reused} already done, {len(todo)} queued; "
        f"results in {folder}")
    return SweepHandle(sid, folder, points, session=session, result=result, reused=reused)


def _number(workers: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
    """(host, device, worker name) -> (slot, worker name): a slot names a device as
    ``host/device#k`` (k counts the workers on the same device of a host, by name), so it stays
    the same when a worker restarts under a new name."""
    seen: dict[tuple, int] = {}
    out = []
    for host, device, name in sorted(workers):
        k = seen[(host, device)] = seen.get((host, device), -1) + 1
        out.append((f"{host}/{device}#{k}", name))
    return out


def _slots(session: Session, backend: str, names: list[str] | None) -> list[tuple[str, str]]:
    """The (slot, worker name) pairs of the live workers of ``backend`` (or of ``names``)."""
    registry = session.store.workers()
    live = {n: info for n, info in registry.items()
            if info["alive"] and info.get("backend") == backend and eval_queue(backend) in info.get("queues", [])}
    if names:
        unknown = [n for n in names if n not in registry or not registry[n]["alive"]]
        if unknown:
            raise NasqError(f"no live worker named {', '.join(unknown)} (live: {', '.join(sorted(live)) or 'none'})")
        live = {n: registry[n] for n in names}
    if not live:
        raise NasqError(f"no live worker runs backend {backend}: start some with `nasq worker --backend {backend}`, "
                        "or submit without a broker to use local workers")
    return _number([(info.get("host", "?"), info.get("device", "?"), n) for n, info in live.items()])


def list_sweeps(*, settings: Settings | None = None, broker: str | None = None) -> list[dict]:
    """The sweeps in the report dir, newest first: id, definition, points done and errors."""
    import glob
    import json

    settings = settings or load_settings(broker_url=broker)
    out = []
    for spec_file in glob.glob(os.path.join(settings.report_dir, "sweeps", "*", "sweep_spec.json")):
        folder = os.path.dirname(spec_file)
        try:
            with open(spec_file, encoding="utf-8") as f:
                spec = json.load(f)
        except (OSError, ValueError):
            continue
        rows = []
        for p in glob.glob(os.path.join(folder, "points", "*.json")):
            try:
                with open(p, encoding="utf-8") as f:
                    rows.append(json.load(f))
            except (OSError, ValueError):
                pass
        total = len(spec.get("devices", spec.get("workers", []))) * len(spec.get("batch_sizes", []))
        out.append({"sweep_id": os.path.basename(folder), "created": spec.get("created", os.path.getmtime(spec_file)),
                    "mode": spec.get("mode"), "backend": spec.get("backend"), "precision": spec.get("precision"),
                    "devices": spec.get("devices", spec.get("workers")), "batch_sizes": spec.get("batch_sizes"),
                    "points": total, "done": len(rows), "errors": sum(1 for r in rows if r.get("error")),
                    "state": "done" if total and len(rows) >= total else "incomplete", "folder": folder,
                    "spec": spec})
    return sorted(out, key=lambda s: s["created"] or 0, reverse=True)


def resume_sweep(sweep: str, *, settings: Settings | None = None, broker: str | None = None, workers: int | None = None,
                 log=print) -> SweepHandle:
    """Submit a recorded sweep again: its measured points are reused, the rest run. The same
    devices must be there (with a broker: live workers on them; without: local workers)."""
    settings = settings or load_settings(broker_url=broker)
    found = [s for s in list_sweeps(settings=settings) if s["sweep_id"] == sweep]
    if not found:
        raise NasqError(f"no sweep {sweep!r} in {os.path.join(settings.report_dir, 'sweeps')} (`nasq sweeps` lists them)")
    spec = found[0]["spec"]
    slots = spec.get("devices") or []
    # without a broker: local workers on the recorded devices; with one: the live workers
    devices = None if settings.broker_url else [s.split("/", 1)[-1].rsplit("#", 1)[0] for s in slots] or None
    handle = submit_sweep(batch_sizes=spec["batch_sizes"], weights=spec["weights_path"], data=spec["data"],
                          backend=spec["backend"], precision=spec["precision"], mode=spec["mode"],
                          labels=spec.get("labels"), images=spec.get("images"), min_time_s=spec.get("min_time_s", 2.0),
                          devices=devices, settings=settings, workers=workers, log=log)
    if handle.sweep_id != sweep:
        handle.close()
        raise NasqError(f"sweep {sweep} was measured on {', '.join(slots)}; those devices are not all here now, so "
                        f"resuming it would start another sweep ({handle.sweep_id}). Start workers on them first")
    return handle
