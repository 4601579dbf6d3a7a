"""Device pinning: the environment a worker process needs *before* any framework starts.

One worker process per device. The device is made the only one visible to the process
(``CUDA_VISIBLE_DEVICES``, ``ASCEND_RT_VISIBLE_DEVICES``), so inside it is always index 0.
"""
from __future__ import annotations

import os
import re

_DEVICE = re.compile(r"^(cpu|cuda:\d+|npu:\d+)$")


def parse_device(device: str) -> tuple[str, int | None]:
    if not _DEVICE.match(device):
        raise ValueError(f"device must be cpu, cuda:N or npu:N, not {device!r}")
    kind, _, index = device.partition(":")
    return kind, (int(index) if index else None)


def pinning_env(device: str, threads: int | None = None) -> tuple[dict[str, str], str]:
    """(environment updates, device name inside the pinned process)."""
    kind, index = parse_device(device)
    env: dict[str, str] = {}
    if kind == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU worker never grabs a GPU by accident
        local = "cpu"
    elif kind == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = str(index)
        local = "cuda:0"
    else:
        env["ASCEND_RT_VISIBLE_DEVICES"] = str(index)
        local = "npu:0"
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    return env, local


def apply(device: str, threads: int | None = None) -> str:
    """Pin this process; must run before torch, onnxruntime or acl are imported."""
    env, local = pinning_env(device, threads)
    os.environ.update(env)
    return local
