"""Batch-size sweeps: one queued job per (device, batch size), reported like the seed's
performance table, with latency percentiles, peak memory, accuracy (eval mode) and the
provenance of every row.

Each point is a ``nasq.sweep_point`` task sent to the queue of one worker (``w.<name>``), so
it runs on that device alone. Results are files in the sweep's folder
(``<report_dir>/sweeps/<sweep id>/points/``); the sweep id is a hash of everything that
defines it, so submitting the same sweep again reuses the points already there.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field

from .config import Settings, load_settings
from .errors import NasqError

MODES = ("bench", "eval")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def point_file(folder: str, point_id: str) -> str:
    return os.path.join(folder, "points", _safe(point_id) + ".json")


@dataclass
class SweepReport:
    rows: list[dict]
    files: dict = field(default_factory=dict)

    @property
    def markdown(self) -> str:
        return render_markdown(self.rows)


def render_markdown(rows: list[dict]) -> str:
    eval_mode = any(r.get("mode") == "eval" for r in rows)
    head = ["device", "worker", "batch size", "dataset", "throughput (img/s)", "latency min / median / p99 (ms)",
            "peak MiB"] + (["top-1 %", "top-5 %"] if eval_mode else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r.get("device_name") or "", r["worker"], r["batch_size"])):
        if r.get("error"):
            cells = [r.get("device_name") or r.get("device", "?"), r["worker"], str(r["batch_size"]),
                     r.get("dataset", ""), f"error: {r['error']}", "", ""] + (["", ""] if eval_mode else [])
        else:
            cells = [r.get("device_name") or r["device"], r["worker"], str(r["batch_size"]), r.get("dataset", ""),
                     f"{r['img_s']:.2f}", f"{r['min_ms']:.2f} / {r['median_ms']:.2f} / {r['p99_ms']:.2f}",
                     "-" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"]
            if eval_mode:
                cells += ["-" if r.get("top1") is None else f"{r['top1']:.2f}",
                          "-" if r.get("top5") is None else f"{r['top5']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plots(rows: list[dict], folder: str) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.get("error")]
    files = {}
    for name, ylabel, fn in (("throughput_vs_batch.png", "images / s", lambda r: r["img_s"]),
                             ("latency_vs_batch.png", "latency per batch (ms): median, bar to p99",
                              lambda r: r["median_ms"])):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for w in sorted({r["worker"] for r in ok}):
            mine = sorted((r for r in ok if r["worker"] == w), key=lambda r: r["batch_size"])
            xs, ys = [r["batch_size"] for r in mine], [fn(r) for r in mine]
            label = f"{w} ({mine[0].get('device_name') or mine[0]['device']})"
            if name.startswith("latency"):
                err = [[0] * len(mine), [r["p99_ms"] - r["median_ms"] for r in mine]]
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
            else:
                ax.plot(xs, ys, marker="o", label=label)
        for r in rows:
            if r.get("error"):
                ax.axvline(r["batch_size"], color="red", alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.set_title(("throughput" if name.startswith("throughput") else "latency") + " vs batch size"
                     + (" (red: error rows)" if any(r.get("error") for r in rows) else ""))
        ax.grid(alpha=0.3)
        if ok:
            ax.legend(fontsize=8)
        fig.tight_layout()
        files[name.split("_")[0]] = os.path.join(folder, name)
        fig.savefig(files[name.split("_")[0]], dpi=110)
        plt.close(fig)
    return files


def write_report(rows: list[dict], folder: str) -> dict:
    os.makedirs(folder, exist_ok=True)
    files = {"json": os.path.join(folder, "sweep.json"), "csv": os.path.join(folder, "sweep.csv"),
             "markdown": os.path.join(folder, "sweep.md")}
    with open(files["json"], "w") as f:
        json.dump(rows, f, indent=2)
    cols = ["device_name", "device", "worker", "batch_size", "mode", "dataset", "img_s", "min_ms", "mean_ms",
            "median_ms", "p99_ms", "peak_mib", "top1", "top5", "images", "error", "backend", "versions", "precision",
            "model_sha256", "dataset_fingerprint"]
    with open(files["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "versions": json.dumps(r.get("versions", {}))})
    with open(files["markdown"], "w") as f:
        f.write(render_markdown(rows))
    files.update(_plots(rows, folder))
    return files


class SweepHandle:
    """A submitted sweep: ``status()``, ``wait()``, ``report()``; ``close()`` stops a private cluster."""

    def __init__(self, sweep_id: str, folder: str, points: list[dict], *, app=None, cluster=None, skipped: int = 0):
        self.sweep_id, self.folder, self.points = sweep_id, folder, points
        self.app, self.cluster, self.skipped = app, cluster, skipped

    def _rows(self) -> list[dict]:
        rows = []
        for p in self.points:
            path = point_file(self.folder, p["point_id"])
            if os.path.isfile(path):
                with open(path) as f:
                    rows.append(json.load(f))
        return rows

    def status(self) -> dict:
        rows = self._rows()
        return {"sweep_id": self.sweep_id, "total": len(self.points), "done": len(rows),
                "errors": sum(1 for r in rows if r.get("error")), "reused": self.skipped,
                "pending": [p["point_id"] for p in self.points if not os.path.isfile(point_file(self.folder, p["point_id"]))]}

    def wait(self, timeout: float | None = None, poll: float = 0.5) -> dict:
        t0 = time.time()
        try:
            while True:
                st = self.status()
                if st["done"] == st["total"]:
                    return st
                if self.cluster is not None:
                    self.cluster.check()
                if timeout and time.time() - t0 > timeout:
                    raise NasqError(f"sweep {self.sweep_id}: {len(st['pending'])} point(s) not done after {timeout:.0f} s")
                time.sleep(poll)
        finally:
            if self.cluster is not None and self.status()["done"] == len(self.points):
                self.close()

    def report(self, out_dir: str | None = None) -> SweepReport:
        """Rows of the finished points, written as JSON, CSV, Markdown and two PNG plots."""
        rows = self._rows()
        return SweepReport(rows, write_report(rows, out_dir or self.folder))

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None


def _live_workers(app, store, backend: str) -> list[str]:
    from .celery_app import eval_queue

    names = [n for n, info in store.workers().items()
             if info["alive"] and info.get("backend") == backend and eval_queue(backend) in info.get("queues", [])]
    if not names:
        raise NasqError(f"no live worker runs backend {backend}: start some with `nasq worker --backend {backend}`, "
                        "or submit without a broker to use local workers")
    return sorted(names)


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
    from .celery_app import TASK_SWEEP_POINT, make_app, worker_queue
    from .data import find_labels, open_source
    from .hashing import cached_sha256
    from .runstate import RunStore

    if mode not in MODES:
        raise NasqError(f"mode must be one of {MODES}, not {mode!r}")
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise NasqError("batch_sizes must be positive integers")
    settings = settings or load_settings(broker_url=broker)
    source = open_source(data)
    if mode == "eval":
        labels = labels or find_labels(data)
    weights = os.path.abspath(weights)
    from .api import check_weights

    check_weights(weights, backend)
    cluster = app = None
    if settings.broker_url:
        app = make_app(settings)
        store = RunStore(settings.backend_url, expires=settings.result_expires)
        names = devices or _live_workers(app, store, backend)
    else:
        from .local import worker_name

        local_devs = devices or ["cpu"] * (workers or 2)
        names = [worker_name(d, i) for i, d in enumerate(local_devs)]  # the names LocalCluster gives them
    ident = {"mode": mode, "backend": backend, "precision": precision, "batch_sizes": sorted(set(batch_sizes)),
             "workers": sorted(names), "weights": cached_sha256(weights, os.path.join(settings.artifact_dir, ".digests.json")),
             "dataset": source.fingerprint, "images": images, "labels": labels, "min_time_s": min_time_s}
    sweep_id = "sweep-" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    folder = os.path.join(settings.report_dir, "sweeps", sweep_id)
    os.makedirs(os.path.join(folder, "points"), exist_ok=True)
    with open(os.path.join(folder, "sweep_spec.json"), "w") as f:
        json.dump(ident | {"weights_path": weights, "data": source.root}, f, indent=2)
    points = [{"point_id": f"{name}|bs{bs}", "sweep_id": sweep_id, "folder": folder, "worker": name,
               "batch_size": bs, "mode": mode, "backend": backend, "precision": precision, "weights": weights,
               "data": source.root, "dataset_fingerprint": source.fingerprint, "labels": labels,
               "images": images, "min_time_s": min_time_s}
              for name in names for bs in ident["batch_sizes"]]
    todo = [p for p in points if not os.path.isfile(point_file(folder, p["point_id"]))]
    skipped = len(points) - len(todo)
    if todo and app is None:  # no broker: local workers for the duration of the sweep
        from .celery_app import eval_queue
        from .local import LocalCluster

        workdir = os.path.join(settings.work_dir, time.strftime("sweep-%Y%m%d-%H%M%S-") + str(os.getpid()))
        threads = max(1, (os.cpu_count() or 1) // len(local_devs))
        cluster = LocalCluster(devices=local_devs, backend=backend, queue=eval_queue(backend), workdir=workdir,
                               precision=precision, threads=threads, settings=settings, log=log)
        url = cluster.start()
        app = make_app(Settings(**{**settings.__dict__, "broker_url": url, "result_backend": None}))
    for p in todo:
        app.send_task(TASK_SWEEP_POINT, args=(p,), queue=worker_queue(p["worker"]),
                      argsrepr=f"sweep={sweep_id} {mode} bs={p['batch_size']} on {p['worker']}")
    log(f"{sweep_id}: {len(points)} points on {len(names)} device(s), {skipped} already done, "
        f"{len(points) - skipped} queued; results in {folder}")
    return SweepHandle(sweep_id, folder, points, app=app, cluster=cluster, skipped=skipped)
