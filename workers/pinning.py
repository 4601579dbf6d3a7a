"""Device pinning: the environment a worker process needs *before* any framework starts.

One worker process per device. The device is made the only one visible to the process
(``CUDA_VISIBLE_DEVICES``, ``ASCEND_RT_VISIBLE_DEVICES``), so inside it is always index 0.

A device index counts the devices this process may see, as CUDA does: where the variable is
already set (SLURM and Kubernetes set it), ``cuda:1`` under ``CUDA_VISIBLE_DEVICES=2,3`` is the
machine's GPU 3, and the worker is pinned to ``3``.
"""
from __future__ import annotations

import os

from nasq.backends.devices import VISIBLE, physical_id
from nasq.config import parse_device

__all__ = ["VISIBLE", "apply", "physical_id", "pinning_env"]


def pinning_env(device: str, threads: int | None = None, environ=os.environ) -> tuple[dict[str, str], str]:
    """(environment updates, device name inside the pinned process)."""
    kind, index = parse_device(device)
    env: dict[str, str] = {}
    if kind == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU worker never grabs a GPU by accident
        local = "cpu"
    else:
        env[VISIBLE[kind]] = physical_id(kind, index, environ)
        local = f"{kind}:0"
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    return env, local


def apply(device: str, threads: int | None = None) -> tuple[str, str | None]:
    """Pin this process; must run before torch, onnxruntime or acl are imported.

    Returns:
        (the device inside the process, such as "cuda:0"; the physical id it is pinned to, or
        None on the CPU)
    """
    env, local = pinning_env(device, threads)
    os.environ.update(env)
    kind, _ = parse_device(device)
    return local, (env[VISIBLE[kind]] if kind in VISIBLE else None)
