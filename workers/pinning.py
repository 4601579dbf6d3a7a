"""Device pinning: the environment a worker process needs *before* any framework starts.

One worker process per device. The device is made the only one visible to the process
(``CUDA_VISIBLE_DEVICES``, ``ASCEND_RT_VISIBLE_DEVICES``), so inside it is always index 0.

A device index counts the devices this process may see, as CUDA does: where the variable is
already set (SLURM and Kubernetes set it), ``cuda:1`` under ``CUDA_VISIBLE_DEVICES=2,3`` is the
machine's GPU 3, and the worker is pinned to ``3``.
"""
from __future__ import annotations

import os

from nasq.config import parse_device

VISIBLE = {"cuda": "CUDA_VISIBLE_DEVICES", "npu": "ASCEND_RT_VISIBLE_DEVICES"}


def physical_id(kind: str, index: int, environ=os.environ) -> str:
    """The id to pin device ``index`` of ``kind`` to: the index-th entry of the visibility
    variable already set, else the index itself."""
    visible = environ.get(VISIBLE[kind])
    if visible is None or not visible.strip():
        return str(index)
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if index >= len(ids) or ids == ["-1"]:
        raise ValueError(f"{kind}:{index}: this process may see only {len(ids)} device(s) "
                         f"({VISIBLE[kind]}={visible}); device indices count those")
    return ids[index]


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
