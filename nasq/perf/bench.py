"""``nasq bench``: latency and throughput per batch size, with the eager baselines measured in
the same process so results read as ratios on one machine. Timing as in ``perf.timing``; a
batch size that runs out of memory becomes an error row, not a crash.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field

import numpy as np

from .. import backends
from ..config import BackendOptions, cache_dir
from ..errors import NasqError
from ..model.spec import ModelRef
from ..tables import table
from .timing import is_oom, measure, summarize


@dataclass
class BenchResult:
    rows: list[dict]
    env: dict = field(default_factory=dict)

    @property
    def table(self) -> str:
        base = {r["batch_size"]: r["img_s"] for r in self.rows if r["config"] == "baseline eager fp32" and r.get("img_s")}
        rows = []
        for r in self.rows:
            if r.get("error"):
                rows.append([r["config"], r["batch_size"], f"error: {r['error']}"] + [""] * 6)
                continue
            ratio = f"{r['img_s'] / base[r['batch_size']]:.2f}x" if r["batch_size"] in base else ""
            peak = f"{r['peak_mib']:.0f}" if r.get("peak_mib") is not None else "-"
            rows.append([r["config"], r["batch_size"], f"{r['min_ms']:.2f}", f"{r['mean_ms']:.2f}",
                         f"{r['median_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['img_s']:.1f}", peak, ratio])
        return table(rows, ["config", "bs", "min ms", "mean ms", "median ms", "p99 ms", "img/s", "peak MiB",
                            "vs eager fp32"])


def _crops(src, n: int) -> np.ndarray:
    from ..data.transforms import ImageError

    crops = []
    for i in range(min(n, len(src))):
        try:
            crops.append(src.load(i))
        except ImageError:  # a bench skips unusable images
            continue
    if not crops:
        raise NasqError(f"no usable images in {src.root}")
    return np.stack(crops)


def run_config(name: str, backend: str, device: str, model: ModelRef, options: BackendOptions,
               batch_sizes: list[int], *, crops: np.ndarray, mode: str, source=None, min_time_s: float = 2.0,
               decode_workers: int | None = None, log=print) -> list[dict]:
    """One backend configuration over all batch sizes."""
    rows = []
    b = backends.create(backend, device)
    try:
        b.load(model, batch_size=max(batch_sizes), options=options)
    except Exception as e:  # noqa: BLE001
        return [{"config": name, "batch_size": bs, "error": f"{type(e).__name__}: {e}"} for bs in batch_sizes]
    for bs in batch_sizes:
        batch = crops[np.arange(bs) % len(crops)]
        try:
            b.reset_peak_memory()
            if mode == "compute":
                lat = measure(b.compute_fn(batch), min_time_s=min_time_s)
            else:
                lat = _e2e(b, source, bs, min_time_s=min_time_s, workers=decode_workers)
            peak = b.peak_memory_bytes()
            row = {"config": name, "batch_size": bs, **summarize(lat, bs),
                   "peak_mib": round(peak / 2**20, 1) if peak is not None else None}
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            row = {"config": name, "batch_size": bs, "error": "out of memory"}
            if device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()
        row.update({"backend": backend, "device": device, "precision": options.precision, "mode": mode,
                    "options": getattr(b, "options", options).describe(), "device_name": b.describe_device(),
                    "versions": b.versions()})
        rows.append(row)
        log(row_line(row))
    b.close()
    return rows


def row_line(r: dict) -> str:
    if r.get("error"):
        return f"{r['config']} bs={r['batch_size']}: {r['error']}"
    return (f"{r['config']} bs={r['batch_size']}: median {r['median_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
            f"{r['img_s']:.1f} img/s")


def _e2e(b, source, bs: int, *, min_time_s: float, workers: int | None) -> list[float]:
    """Per-batch latency from files: decode + preprocess (a thread pool), transfer, compute."""
    from concurrent.futures import ThreadPoolExecutor

    n = len(source)
    pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1)
    k = 0

    encoded = getattr(b, "decodes_jpeg", False) and source.kind == "jpeg"

    def read(i: int) -> bytes:
        with open(os.path.join(source.root, source.names[i]), "rb") as f:
            return f.read()

    def step():
        nonlocal k
        idx = [(k + j) % n for j in range(bs)]
        k += bs
        if encoded:  # the device decodes; the host only reads files
            b.predict_encoded(list(pool.map(read, idx)))
        else:
            b.predict_u8(np.stack(list(pool.map(source.load, idx))))

    try:
        return measure(step, warmup=1, min_iters=3, min_time_s=min_time_s)
    finally:
        pool.shutdown()


def bench(*, backend: str = "torch", device: str = "cpu", options: BackendOptions = BackendOptions(),
          batch_sizes: list[int], mode: str = "compute", weights: str | None = None, target: ModelRef | None = None,
          data: str | None = None, arch: str = "large", baseline: bool = True, min_time_s: float = 2.0,
          decode_workers: int | None = None, workdir: str | None = None, log=print) -> BenchResult:
    """Benchmark one backend configuration, plus eager fp32 (and fp16 on CUDA) baselines.

    Args:
        weights: checkpoint (default: the demo's calibrated random-weight one, made once in
            ``workdir``; speed depends only on shapes).
        target: what ``backend`` loads when it is not the checkpoint (a built artifact).
        data: JPEG folder for e2e mode and for the batches (default: the demo's images).
        options: precision and backend options (torch: compile, cuda_graphs, fold_bn, ...).
    """
    from ..data.sources import open_source
    from ..demo import prepare

    if mode not in ("compute", "e2e"):
        raise NasqError(f"--mode must be compute or e2e, not {mode!r}")
    workdir = workdir or os.path.join(cache_dir(), f"bench-{arch}")
    if weights is None or data is None:
        demo = prepare(workdir, 32, arch=arch, log=log)
        weights, data = weights or demo["weights"], data or demo["data"]
    source = open_source(data)
    crops = _crops(source, 64)
    model = ModelRef(os.path.abspath(weights))
    eager = BackendOptions(precision="fp32", fold_bn=False, channels_last=False)
    configs = [("baseline eager fp32", "torch", model, eager)] if baseline else []
    if baseline and device.startswith("cuda"):
        configs.append(("baseline eager fp16 channels-last", "torch", model,
                        dataclasses.replace(eager, precision="fp16", channels_last=True)))
    opt_text = ",".join(f"{k}={v}" for k, v in sorted(options.describe().items()))
    configs.append((f"{backend} {options.precision}" + (f" [{opt_text}]" if opt_text else ""), backend,
                    target or model, options))
    rows: list[dict] = []
    for name, be, m, opts in configs:
        rows += run_config(name, be, device, m, opts, batch_sizes, crops=crops, mode=mode, source=source,
                           min_time_s=min_time_s, decode_workers=decode_workers, log=log)
    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": os.uname().nodename, "weights": model.weights,
           "data": source.root, "mode": mode, "arch": arch}
    return BenchResult(rows, env)
