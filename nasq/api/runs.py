"""Evaluations: submitted (``submit_evaluation``), run and waited for (``evaluate``), finished
(``resume``), or run in this process for reference (``evaluate_local``). The run's state is
changed only through the run store's transitions (``nasq.runstate``)."""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Callable

import redis

from .. import backends
from ..config import DEFAULT_BATCH_SIZE, BackendOptions, Settings, load_settings
from ..data.labels import read_labels
from ..errors import BrokerTrouble, NasqError
from ..flags import flag_of
from ..request import EvalRequest, rerun_argv, takes_request
from ..queue.broker import probe
from ..queue.healing import Healer
from ..queue.local import WorkerSpec, cpu_threads, local_devices
from ..queue.session import BROKER_ERRORS, Session
from ..queue.store import BrokerFull
from ..runstate import RESENT, RunState, Transition, may
from ..rundata import RunManifest
from ..wire import BUILD_QUEUE, DatasetRef, EvalJob, eval_queue, merge_task_id
from .builds import cached_build, prepare_model
from .handle import EvalResult, RunHandle
from .checks import Plan, check_worker_roots, needs_build, plan_request, plan_run, with_roots


def rerun_command(plan: Plan, *, queue: str, broker_url: str | None, devices: list[str] | None = None,
                  options: BackendOptions | None = None) -> list[str]:
    """The ``nasq eval`` command line that runs this evaluation again (the report's "rerun
    with"): the request's flags as checked (``request.rerun_argv``: absolute paths, every choice
    explicit), then where it runs. A broker URL that holds a password is never written: the
    command then says ``--broker "$NASQ_BROKER_URL"`` (the shell fills it in)."""
    request = plan.request
    cmd = ["nasq", "eval", *rerun_argv(request)]
    if broker_url:
        from urllib.parse import parse_qs, urlsplit

        cmd += ["--queue", queue] if queue != eval_queue(request.backend) else []
        parts = urlsplit(broker_url)
        secret = parts.password or "password" in parse_qs(parts.query)
        return cmd + ["--broker", "$NASQ_BROKER_URL" if secret else broker_url]
    if devices:
        cmd += ["--device", ",".join(dict.fromkeys(devices))] if devices[0] != "cpu" else ["--device", "cpu"]
        cmd += ["--workers", str(len(devices))]
    if options is not None:
        cmd += [x for flag, on in (("--compile", options.compile != "none"), ("--cuda-graphs", options.cuda_graphs),
                                   ("--kernels", options.kernels != "torch")) if on
                for x in ([flag] if flag == "--cuda-graphs" else
                          [flag, options.compile if flag == "--compile" else options.kernels])]
    return cmd


def _submit(session: Session, plan: Plan, *, queue: str, shard_size: int | None, workers: int | None,
            rerun: str | None, log, command: list[str] | None = None, require_workers: int | None = None) -> RunHandle:
    from ..data.digests import pack
    from ..files import cached_sha256, file_digest
    from ..queue.transport import BrokerView
    from ..queue.trust import ManifestTrust

    model = prepare_model(weights=plan.weights, backend=plan.backend, num_outputs=plan.num_outputs,
                          settings=session.settings, session=session, build_options=plan.build, log=log)
    pinned = os.path.join(model.weights, "meta.json") if os.path.isdir(model.weights) else model.weights
    if os.path.isfile(pinned):  # every shard checks that the workers load this file (an artifact: its meta.json,
        # which records the sha256 of each of its files)
        model = replace(model, sha256=cached_sha256(pinned, os.path.join(session.settings.artifact_dir,
                                                                         ".digests.json")))
    job = EvalJob(dataset=DatasetRef(**plan.source.describe()), labels=plan.labels, model=model, backend=plan.backend,
                  batch_size=plan.batch_size, precision=plan.precision, output=plan.output,
                  labels_sha256=file_digest(plan.labels) if plan.labels else None)
    if session.cluster is None:  # a deployment: warn first, and plan for the workers serving the queue now
        live = session.live_workers(queue)
        if require_workers and len(live) < require_workers:
            raise NasqError(f"{len(live)} live worker(s) consume queue {queue}"
                            + (f" ({', '.join(live)})" if live else "") + f", fewer than --require-workers "
                            f"{require_workers}: nothing was submitted (start more with `nasq worker --backend "
                            f"{plan.backend} --queues {queue}`)")
        live = warn_if_unserved(session, queue, log, live)
        check_worker_roots(session, queue, job)
        for warning in session.store.runs.broker_warnings():
            log(f"warning: {warning}")
        workers = workers or len(live) or None
    if session.store.is_full():
        raise BrokerFull(f"nothing was queued: {session.store.full_message()}")
    broker = BrokerView.for_app(session.app, session.settings)
    try:
        broker_id = broker.server_id()
    finally:
        broker.close()
    manifest = RunManifest.plan(job, queue=queue, shard_size=shard_size, workers=workers, broker_id=broker_id,
                                command=command, request=plan.request.to_payload() if plan.request else None)
    run_id = manifest.run_id
    sealed = ManifestTrust(session.app).seal(manifest)
    try:
        if plan.source.content:  # the list the workers check every image against
            session.store.runs.save_digests(plan.source.content, pack(plan.source.digests))
        session.store.runs.save_manifest(manifest, sealed)
        session.store.runs.add_merge_id(run_id, merge_task_id(run_id))
        result = session.submit_run(manifest)
        session.store.runs.transition(run_id, Transition.START, shards=len(manifest.shards))
    except (BrokerFull, redis.exceptions.OutOfMemoryError, *BROKER_ERRORS) as e:
        # kombu reports a write the broker refused as a connection error, and a big pipelined write
        # can fill the broker for a moment by itself: either way, say that it was full
        if not isinstance(e, BROKER_ERRORS) or session.store.is_full() or "maxmemory" in str(e):
            raise BrokerFull(f"run {run_id} could not be submitted whole: {session.store.full_message()}. Once "
                             f"memory is freed, finish it with `nasq resume {run_id}`") from None
        raise BrokerTrouble(f"the broker went away while run {run_id} was being submitted ({e}); when it is back, "
                            f"`nasq resume {run_id}` finishes it if the broker kept its record, else rerun it with: "
                            f"{rerun or 'the same command'}") from None
    log(f"run {run_id}: {len(plan.source)} images in {len(manifest.shards)} shards "
        f"of <= {max((s.images for s in manifest.shards), default=0)} on queue {queue}")
    return RunHandle(run_id, manifest, result, session, rerun=rerun or "submit the evaluation again")


def warn_if_unserved(session: Session, queue: str, log, live: list[str] | None = None) -> list[str]:
    """The live workers of ``queue`` (``live``: as read already); a warning when there are none."""
    live = session.live_workers(queue) if live is None else live
    if not live:
        log(f"warning: no live nasq worker consumes queue {queue!r}; the run waits until one starts "
            f"(e.g. `nasq worker --backend {queue.split('.', 1)[-1]}` with the same broker)")
    return live


def _broker_then_plan(settings, request: EvalRequest, log) -> Plan:
    """The broker first, when there is one (a wrong password or a silent broker is one line before
    the heavy checks), then the user's input."""
    if settings.broker_url:
        probe(settings)
    return plan_request(request, digest_cache=settings.artifact_dir, log=log)


@takes_request()
def submit_evaluation(request: EvalRequest, /, *, broker: str | None = None, settings: Settings | None = None,
                      rerun: str | None = None, log=print) -> RunHandle:
    """Queue an evaluation on a running deployment and return at once (what ``python -m producer``
    does). ``RunHandle.wait()`` follows it; ``nasq status RUN_ID`` too, from any machine.

    The evaluation is an ``EvalRequest``, or its fields as keywords (``weights=``, ``data=``,
    ``batch_size=``, ...: ``help(submit_evaluation)`` lists them with their defaults).
    ``require_workers``: refuse to submit (NasqError) when fewer live workers consume the queue.

    Raises:
        NasqError: no broker configured, bad weights, data, labels or precision, or fewer live
            workers than ``require_workers``.
    """
    settings = settings or load_settings(broker_url=broker)
    if not settings.broker_url:
        raise NasqError("no broker: pass --broker redis://HOST:6379/0 or set NASQ_BROKER_URL")
    backends.check_options(request.backend, request.precision)
    plan = _broker_then_plan(settings, request, log)
    session = Session(settings)
    try:
        queue = request.queue or eval_queue(request.backend)
        return _submit(session, plan, queue=queue, shard_size=request.shard_size, workers=None, rerun=rerun, log=log,
                       command=rerun_command(plan, queue=queue, broker_url=settings.broker_url),
                       require_workers=request.require_workers)
    except BaseException:
        session.close()
        raise


@takes_request()
def evaluate(request: EvalRequest, /, *, device: str = "auto", workers: int | None = None, compile: str | None = None,
             cuda_graphs: bool = False, kernels: str = "torch", broker: str | None = None, progress: bool = True,
             timeout: float | None = None, settings: Settings | None = None, rerun: str | None = None, log=print,
             on_report: Callable[[EvalResult], None] | None = None) -> EvalResult:
    """Evaluate a checkpoint (or built model) on a dataset folder across workers.

    With no broker configured, starts a private Redis and one local worker per device
    (``workers`` CPU workers when there is no GPU), runs, and stops them. With a broker,
    only submits and waits; workers run wherever they were started.

    The evaluation is an ``EvalRequest``, or its fields as keywords (``help(evaluate)`` lists
    them with their defaults; the flags of ``nasq eval`` say what each means).

    Args:
        weights: Cadene-format checkpoint (.pth), or a built model for its backend.
        data: JPEG folder, .bin folder or u8 shard folder.
        labels: val_label.txt (default: one beside or inside ``data``; none: no accuracy).
        num_outputs: None keeps the checkpoint's head; 1000 drops the background class.
        device, workers: embedded runs: the local workers' devices and how many.
        compile, cuda_graphs, kernels: embedded runs: options of the local workers.
        rerun: the command that submits this run again, said if a broker loses the run.
        on_report: called with the result as soon as the numbers are in, before the plots and
            the HTML page are rendered (``RunHandle.wait``).
        output_dir, outfmt: also write full logits per image in ais_bench's layout.
        soc_version, gears: ais_bench with a checkpoint: the chip the .om is built for (ATC on the
            build queue) and its dynamic batch gears (default: a static .om of ``batch_size``).
        require_workers: with a broker, refuse to submit when fewer live workers consume the queue.

    Returns:
        EvalResult with the report (see docs/REPORT.md) and per-image predictions.

    Raises:
        NasqError: bad weights, data, labels or precision (before anything starts); RunError if
            the run fails (missing or failed shards, lost local workers).
    """
    settings = settings or load_settings(broker_url=broker)
    backend, precision, num_outputs = request.backend, request.precision, request.num_outputs
    backends.check_options(backend, precision, compile)
    if settings.broker_url:
        given = [flag_of(n) for n, v in (("compile", compile), ("cuda_graphs", cuda_graphs), ("kernels", kernels))
                 if v not in (None, False, "none", "torch")]
        if given:
            raise NasqError(f"{', '.join(given)} set how the workers of an embedded run load the model; with a broker "
                            "(--broker, NASQ_BROKER_URL or the config file) the workers run already: give it to "
                            "`nasq worker` instead")
    plan = _broker_then_plan(settings, request, log)
    queue = request.queue or eval_queue(backend)
    local, devices = None, None
    if not settings.broker_url:
        devices = local_devices(backend, device, workers)
        for d in dict.fromkeys(devices):  # a device that is not there: one line before anything starts
            backends.backend_class(backend).check_device(d)
        settings = with_roots(settings, read=[plan.source.root, os.path.dirname(plan.weights),
                                               plan.labels and os.path.dirname(plan.labels)],
                               write=[plan.output.dir if plan.output else None])
        threads = cpu_threads(devices)
        local = [WorkerSpec(device=d, backend=backend, queues=(queue,), options=BackendOptions(
                     precision=precision or "fp32", threads=threads if d == "cpu" else None, compile=compile or "none",
                     cuda_graphs=cuda_graphs, kernels=kernels)) for d in devices]
        if needs_build(plan.weights, backend) and not cached_build(
                weights=plan.weights, target=backends.backend_class(backend).build_target, num_outputs=num_outputs,
                settings=settings, build_options=plan.build):
            local.append(WorkerSpec(queues=(BUILD_QUEUE,)))
        workers = len(devices)
    with Session.open(settings, workers=local, log=log) as session:
        command = rerun_command(plan, queue=queue, broker_url=settings.broker_url, devices=devices,
                                options=BackendOptions(compile=compile or "none", cuda_graphs=cuda_graphs,
                                                       kernels=kernels))
        handle = _submit(session, plan, queue=queue, shard_size=request.shard_size, workers=workers, rerun=rerun,
                         log=log, command=command, require_workers=request.require_workers)
        return handle.wait(progress=progress, timeout=timeout, log=log, on_report=on_report)


def resume(run_id: str, *, broker: str | None = None, settings: Settings | None = None, progress: bool = True,
           timeout: float | None = None, log=print,
           on_report: Callable[[EvalResult], None] | None = None) -> EvalResult:
    """Finish a failed or interrupted run: only its failed or lost shards run again (on the run's
    queue, each as a new attempt with a task id of its own), then the merge combines them with the results the run
    already has. A shard that is queued, delivered or running on a live worker is left alone: on
    a healthy run, resume sends nothing and follows the run to its report (``on_report``: as in
    ``evaluate``).

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
        from ..results.ending import refuse_if_final

        final = refuse_if_final(store, run_id, settings.report_dir)  # write once: the report folder decides
        if final is not None:
            raise NasqError(f"run {run_id} is {final}: its report is published in "
                            f"{os.path.join(settings.report_dir, run_id)} and is never changed; nothing to resume")
        state = store.runs.state_name(run_id)
        if state is not None and not may(Transition.RESUME, state):
            raise NasqError(f"run {run_id} is {state}; there is nothing to resume (`nasq status {run_id}` shows it)")
        seen: dict[str, int] = {}
        plan = healer.resumable(manifest, seen)
        redo = healer.claim_for_resume(run_id, plan, seen)
        busy = sum(1 for why in plan.values() if why not in RESENT)  # queued, or running on a live worker
        if not redo and state == RunState.RUNNING and busy:
            store.ledger.lift_exclusions(run_id)  # as a resume that sends shards does
            log(f"run {run_id}: nothing to resubmit ({busy} shard(s) queued or running on live workers); following it")
            result = None
        else:
            n = store.runs.next_resume(run_id)
            ok, now = store.runs.transition(run_id, Transition.RESUME, merge_id=merge_task_id(run_id, n), forget=tuple(redo),
                                       shards=len(manifest.shards), resumed=len(redo))
            if not ok:
                raise NasqError(f"run {run_id} is {now}; not resumed")
            result = session.submit_run(manifest, manifest.only(redo).shards,
                                        merge_id=merge_task_id(run_id, n), dispatches=redo)
            log(f"run {run_id}: {len(redo)} of {len(manifest.shards)} shards resubmitted"
                + (f" ({', '.join(list(redo)[:5])}{' ...' if len(redo) > 5 else ''})" if redo
                   else "; merging the stored results")
                + (f"; {busy} queued or running left alone" if busy else ""))
        warn_if_unserved(session, manifest.queue, log)
    except BaseException:
        session.close()
        raise
    with session:
        return RunHandle(run_id, manifest, result, session).wait(progress=progress, timeout=timeout, log=log,
                                                                 on_report=on_report)


def evaluate_local(*, weights: str, data: str, labels: str | None = None, backend: str = "torch",
                   device: str = "cpu", batch_size: int = DEFAULT_BATCH_SIZE, num_outputs: int | None = None,
                   precision: str = "fp32", settings: Settings | None = None, soc_version: str | None = None,
                   gears: list[int] | None = None) -> dict:
    """Single-process reference: the same evaluation in this process, no queue.

    Returns the per-image predictions in the same form as ``EvalResult.predictions``.
    """
    from ..inference.evaluate import evaluate_range

    settings = settings or load_settings()
    backends.check_options(backend, precision)
    plan = plan_run(weights=weights, data=data, labels=labels, backend=backend, batch_size=batch_size,
                    precision=precision, num_outputs=num_outputs, output_dir=None, outfmt="NPY", content=False,
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
