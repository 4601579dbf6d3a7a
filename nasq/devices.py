"""Which devices this machine has, found without initializing CUDA in this process
(a process that forks workers must never touch CUDA)."""
from __future__ import annotations

import os
import shutil
import subprocess


def cuda_device_count() -> int:
    """GPUs visible to a child process, read from nvidia-smi and CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    n = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    if visible:
        n = min(n, len([v for v in visible.split(",") if v.strip()]))
    return n


def local_devices(backend: str, device: str = "auto", workers: int | None = None) -> list[str]:
    """Devices for an embedded run: one worker per GPU, else ``workers`` CPU workers (default 1).

    ``device`` may be "auto", "cpu", "cuda" (all GPUs) or a comma-separated list such as
    "cuda:0,cuda:2".
    """
    if device not in ("auto", "cpu", "cuda"):
        return [d.strip() for d in device.split(",") if d.strip()]
    gpus = cuda_device_count() if device != "cpu" and backend in ("torch", "onnxruntime") else 0
    if device == "cuda" and not gpus:
        from .errors import NasqError

        raise NasqError("--device cuda: no NVIDIA GPU is visible (nvidia-smi found none)")
    if gpus and backend == "torch":
        devs = [f"cuda:{i}" for i in range(gpus)]
        return devs[: workers] if workers else devs
    return ["cpu"] * max(1, workers or 1)
