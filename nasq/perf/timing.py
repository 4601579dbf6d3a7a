"""Timing, as timm's benchmark.py and ais_bench do it: warm up, wait for the device before
reading the clock, repeat until both a minimum count and a minimum time are reached, report
min/mean/median/p99 latency and ``throughput = batch_size * 1000 / mean_ms``."""
from __future__ import annotations

import time

import numpy as np


def measure(fn, *, warmup: int = 3, min_iters: int = 10, min_time_s: float = 2.0, max_iters: int = 10_000) -> list[float]:
    """Latencies in ms of ``fn`` (which must wait for the device itself)."""
    for _ in range(warmup):
        fn()
    lat, t_end = [], time.perf_counter() + min_time_s
    while (len(lat) < min_iters or time.perf_counter() < t_end) and len(lat) < max_iters:
        t = time.perf_counter()
        fn()
        lat.append((time.perf_counter() - t) * 1e3)
    return lat


def summarize(lat_ms: list[float], bs: int) -> dict:
    arr = np.asarray(lat_ms)
    mean = float(arr.mean())
    return {"iters": len(arr), "min_ms": round(float(arr.min()), 3), "mean_ms": round(mean, 3),
            "median_ms": round(float(np.median(arr)), 3), "p99_ms": round(float(np.percentile(arr, 99)), 3),
            "img_s": round(bs * 1000.0 / mean, 2)}


def is_oom(e: BaseException) -> bool:
    return "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"
