"""The machine a number was measured on: host, CPU, cores, memory, OS, Python and nasq, read
once per process (the report's environment block; the accelerator's own facts come from the
backend's ``environment()``)."""
from __future__ import annotations

import functools
import os
import platform
import socket


@functools.lru_cache(maxsize=1)
def host_environment() -> dict:
    from . import __version__

    return {"host": socket.gethostname(), "os": platform.platform(terse=True), "machine": platform.machine(),
            "cpu": _cpu_model(), "cpu_cores": os.cpu_count(), "cpus_usable": len(_affinity()),
            "memory_gib": _memory_gib(), "python": platform.python_version(), "nasq": __version__}


def _affinity() -> set:
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None
