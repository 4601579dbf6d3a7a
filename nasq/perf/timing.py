"""Timing, as timm's benchmark.py and ais_bench do it: warm up, wait for the device before
reading the clock, repeat until both a minimum count and a minimum time are reached (and, for
sweeps, until the median is stable between windows, as perf_analyzer does), report
min/mean/median/p90/p95/p99/max latency and ``throughput = batch_size * 1000 / mean_ms``."""
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


def measure_stable(fn, *, min_time_s: float = 2.0, stability_pct: float = 5.0, max_time_s: float | None = None,
                   warmup: int = 3, min_window: int = 8, clock=time.perf_counter) -> tuple[list[float], dict]:
    """Latencies in ms, measured in windows until the median of the last window is within
    ``stability_pct`` % of the one before (perf_analyzer's stability check), after at least
    ``min_time_s``; at most ``max_time_s`` (default 5 x ``min_time_s``, at least 2 s).

    ``clock``: seconds, monotonic (a test gives its own, so that the rule is checked exactly).

    Returns:
        (latencies, {"stable": bool, "windows": n, "last_change_pct": x})
    """
    for _ in range(warmup):
        fn()
    max_time_s = max_time_s or max(2.0, 5 * min_time_s)
    window_s = max(0.2, min_time_s / 4)
    lat: list[float] = []
    medians: list[float] = []
    t0 = clock()
    change = None
    while True:
        w, t_end = [], clock() + window_s
        while len(w) < min_window or clock() < t_end:
            t = clock()
            fn()
            w.append((clock() - t) * 1e3)
        lat += w
        medians.append(float(np.median(w)))
        if len(medians) >= 2:
            change = abs(medians[-1] - medians[-2]) / medians[-2] * 100
        elapsed = clock() - t0
        if elapsed >= min_time_s and change is not None and change < stability_pct:
            return lat, {"stable": True, "windows": len(medians), "last_change_pct": change}
        if elapsed >= max_time_s:
            return lat, {"stable": False, "windows": len(medians), "last_change_pct": change}


def summarize(lat_ms: list[float], bs: int) -> dict:
    """min/mean/median/p90/p95/p99/max latency (ms) and ``img_s = bs * 1000 / mean``; a p99
    from fewer than 100 samples is flagged (``p99_samples_ok``: False): it is about the max."""
    arr = np.asarray(lat_ms)
    mean = float(arr.mean())
    p90, p95, p99 = (float(x) for x in np.percentile(arr, [90, 95, 99]))
    # full precision: numbers are rounded where they are shown, never in the data
    return {"iters": len(arr), "min_ms": float(arr.min()), "mean_ms": mean, "median_ms": float(np.median(arr)),
            "p90_ms": p90, "p95_ms": p95, "p99_ms": p99, "max_ms": float(arr.max()), "p99_samples_ok": len(arr) >= 100,
            "img_s": bs * 1000.0 / mean}


def is_oom(e: BaseException) -> bool:
    return "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"
