"""Benchmarks in this process (``bench``) and batch-size sweeps across workers (``submit_sweep``,
``list_sweeps``, ``resume_sweep``)."""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

from .. import backends
from ..config import BackendOptions, Settings, cache_dir, load_settings
from ..data.labels import find_labels
from ..data.sources import open_source
from ..errors import NasqError
from ..perf.bench import BenchResult
from ..perf.sweep import point_file, read_rows, sweep_folder, sweep_id
from ..queue.local import WorkerSpec, cpu_threads, worker_name
from ..queue.session import Progress, Session
from ..results.sweeps import PERCENTILES, render_markdown, write_report
from ..wire import SweepPoint, eval_queue
from .builds import prepare_model
from .checks import check_weights, with_roots


def bench(*, backend: str = "torch", device: str = "cpu", precision: str = "fp32", compile: str = "none",
          cuda_graphs: bool = False, kernels: str = "torch", device_decode: bool = False, batch_sizes: list[int],
          mode: str = "compute",
          weights: str | None = None, data: str | None = None, arch: str = "large", baseline: bool = True,
          min_time_s: float = 2.0, settings: Settings | None = None, log=print) -> BenchResult:
    """``nasq bench``: one backend configuration plus eager baselines, in this process.
    A backend that runs a built model (onnxruntime) gets the verified artifact, built once.
    See ``nasq.perf.bench.bench``."""
    from ..demo import prepare
    from ..perf.bench import bench as run_bench

    backends.check_options(backend, precision, compile)
    settings = settings or load_settings()
    options = BackendOptions(precision=precision, compile=compile, cuda_graphs=cuda_graphs, kernels=kernels,
                             device_decode=device_decode,
                             cache_dir=os.path.join(settings.artifact_dir, "inductor-cache"))
    workdir = os.path.join(cache_dir(), f"bench-{arch}")
    if weights is None or data is None:
        demo = prepare(workdir, 32, arch=arch, log=log)
        weights, data = weights or demo["weights"], data or demo["data"]
    target = None
    if backend != "torch":
        target = prepare_model(weights=os.path.abspath(weights), backend=backend, num_outputs=None,
                               settings=settings, log=log)
    return run_bench(backend=backend, device=device, options=options, batch_sizes=batch_sizes, mode=mode,
                     weights=weights, target=target, data=data, arch=arch, baseline=baseline, min_time_s=min_time_s,
                     workdir=workdir, log=log)


@dataclass(frozen=True)
class SweepReport:
    """A sweep's rows, the report files written (JSON, CSV, Markdown, HTML, plots), the Markdown
    text and the decision: per device the best batch size, and the best within a latency budget."""

    rows: list[dict]
    files: dict
    markdown: str
    decision: list[dict]


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

    def report(self, out_dir: str | None = None, *, latency_budget_ms: float | None = None,
               percentile: int = 99) -> SweepReport:
        """Rows of the finished points and what they decide (per device the batch size of the
        highest throughput; with ``latency_budget_ms``, the highest throughput whose latency at
        ``percentile`` (50, 90, 95 or 99) is within it), written as JSON, CSV, Markdown, HTML
        and three PNG plots."""
        if percentile not in PERCENTILES:
            raise NasqError(f"percentile must be one of {', '.join(map(str, PERCENTILES))}, not {percentile!r}")
        if latency_budget_ms is not None and not latency_budget_ms > 0:
            raise NasqError(f"latency_budget_ms must be a positive number of ms, not {latency_budget_ms!r}")
        rows = read_rows(self.folder, [p.point_id for p in self.points])
        files, decision = write_report(rows, out_dir or self.folder, latency_budget_ms=latency_budget_ms,
                                       percentile=percentile)
        return SweepReport(rows, files, render_markdown(rows, decision), decision)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()


def submit_sweep(*, batch_sizes: list[int], weights: str, data: str, backend: str = "torch", precision: str = "fp32",
                 devices: list[str] | None = None, workers: int | None = None, mode: str = "bench",
                 labels: str | None = None, images: int | None = None, min_time_s: float = 2.0,
                 stability_pct: float = 5.0, broker: str | None = None, settings: Settings | None = None,
                 log=print) -> SweepHandle:
    """Queue a batch-size sweep and return at once.

    Args:
        batch_sizes: the points, per device.
        devices: worker names to run on (default: every live worker of ``backend``). Without a
            broker: local devices ("cpu", "cuda:0", ...); ``workers`` CPU workers by default 2.
        mode: "bench" (compute latency/throughput, ``min_time_s`` per point) or "eval" (the
            dataset, or its first ``images``, evaluated: throughput plus top-1/top-5).
        stability_pct: bench mode: a point is timed until the median of its last window is
            within this % of the one before (perf_analyzer's --stability-percentage), up to
            5 x ``min_time_s``; a point that never settles is marked not stable.

    Returns:
        SweepHandle. Points already measured by an identical sweep are reused, not rerun; a
        point that runs out of memory becomes an error row.
    """
    from ..files import cached_sha256, write_json

    if mode not in SweepPoint.MODES:
        raise NasqError(f"mode must be one of {', '.join(SweepPoint.MODES)}, not {mode!r}")
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise NasqError("batch_sizes must be positive integers")
    if not 0 < stability_pct <= 100:
        raise NasqError(f"stability_pct must be a percentage in (0, 100], not {stability_pct!r}")
    backends.check_options(backend, precision)
    settings = settings or load_settings(broker_url=broker)
    source = open_source(data)
    if mode == "eval" and source.kind != "index":  # what an eval point scores is what was listed, byte for byte
        from ..data.digests import cache_for, file_digests

        source.with_digests(file_digests(source, cache_for(source.root, settings.artifact_dir), log=log))
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
        settings = with_roots(settings, read=[source.root, os.path.dirname(weights),
                                               labels and os.path.dirname(os.path.abspath(labels))])
    names = [name for _, name in slots]
    # What defines the measurement (not worker names, which carry PIDs): a restarted worker on
    # the same device continues the same sweep.
    definition = {"mode": mode, "backend": backend, "precision": precision, "batch_sizes": sorted(set(batch_sizes)),
                  "devices": sorted(slot for slot, _ in slots), "dataset": source.fingerprint, "images": images,
                  "labels": labels, "min_time_s": min_time_s,
                  **({"stability_pct": stability_pct} if stability_pct != 5.0 else {}),  # the same id as before it
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
        "dataset_fingerprint": source.fingerprint, "labels": labels, "images": images, "min_time_s": min_time_s,
        "stability_pct": stability_pct, "dataset_content": source.content})
        for slot, name in slots for bs in definition["batch_sizes"]]
    todo = [p for p in points if not os.path.isfile(point_file(folder, p.point_id))]
    reused = len(points) - len(todo)
    result = None
    if todo:
        if session is None:  # no broker: local workers for the duration of the sweep
            threads = cpu_threads(local_devs)
            session = Session.open(settings, log=log, workers=[
                WorkerSpec(device=d, backend=backend, queues=(eval_queue(backend),), name=n, options=BackendOptions(
                    precision=precision, threads=threads if d == "cpu" else None)) for d, n in zip(local_devs, names)])
        try:
            if source.content:
                from ..data.digests import pack

                session.store.runs.save_digests(source.content, pack(source.digests))
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
    registry = session.store.registry.workers()
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

    from ..files import read_json

    settings = settings or load_settings(broker_url=broker)
    out = []
    for spec_file in glob.glob(os.path.join(settings.report_dir, "sweeps", "*", "sweep_spec.json")):
        folder = os.path.dirname(spec_file)
        spec = read_json(spec_file)
        if not isinstance(spec, dict):
            continue
        rows = [r for r in (read_json(p) for p in glob.glob(os.path.join(folder, "points", "*.json"))) if r]
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
                          stability_pct=spec.get("stability_pct", 5.0),
                          devices=devices, settings=settings, workers=workers, log=log)
    if handle.sweep_id != sweep:
        handle.close()
        raise NasqError(f"sweep {sweep} was measured on {', '.join(slots)}; those devices are not all here now, so "
                        f"resuming it would start another sweep ({handle.sweep_id}). Start workers on them first")
    return handle

