"""Is the device there? Asked when a worker starts (and before an embedded run starts any),
so that a worker for a GPU or NPU this machine does not have refuses in one line instead of
taking shards and failing them.

Nothing here initializes CUDA or ACL in the asking process (it forks workers, or is a worker
whose pool forks): GPUs are listed by ``nvidia-smi``, NPUs counted by pyACL in a child process
pinned as the worker will be.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys

from ..errors import BackendError

#: the variable that makes one accelerator the only one a process sees
VISIBLE = {"cuda": "CUDA_VISIBLE_DEVICES", "npu": "ASCEND_RT_VISIBLE_DEVICES"}


def physical_id(kind: str, index: int, environ=os.environ) -> str:
    """The id to pin device ``index`` of ``kind`` to: the index-th entry of the visibility
    variable already set (SLURM and Kubernetes set it), else the index itself.

    Raises:
        ValueError: the index is past the devices the variable leaves visible.
    """
    visible = environ.get(VISIBLE[kind])
    if visible is None or not visible.strip():
        return str(index)
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if index >= len(ids) or ids == ["-1"]:
        raise ValueError(f"{kind}:{index}: this process may see only {len(ids)} device(s) "
                         f"({VISIBLE[kind]}={visible}); device indices count those")
    return ids[index]


@functools.lru_cache(maxsize=8)
def gpu_facts(physical: str | None) -> dict:
    """Name, driver and memory of the GPU the process is pinned to (its id on the machine, as
    nvidia-smi counts), for reports; {} without nvidia-smi. Asked once per process and GPU: every
    shard's result carries it (the caller must not change the dict)."""
    if not shutil.which("nvidia-smi") or not physical:
        return {}
    try:
        out = subprocess.run(["nvidia-smi", "-i", physical, "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    parts = [p.strip() for p in out.strip().split(",")]
    return dict(zip(("accelerator", "driver", "memory"), parts)) if len(parts) == 3 else {}


def nvidia_gpus() -> list[tuple[str, str]] | None:
    """(index, UUID) of every GPU ``nvidia-smi -L`` lists; None without an NVIDIA driver."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    gpus = []
    for line in out.splitlines():  # "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5d1c...)", "  MIG 1g.10gb ... (UUID: MIG-...)"
        uuid = line.rsplit("UUID:", 1)[-1].strip(" )") if "UUID:" in line else ""
        if line.startswith("GPU ") and ":" in line:
            gpus.append((line[4:line.index(":")].strip(), uuid))
        elif uuid:  # a MIG instance: addressed by its UUID only
            gpus.append(("", uuid))
    return gpus


def check_cuda(device: str, physical: str) -> None:
    gpus = nvidia_gpus()
    if gpus is None:
        raise BackendError(f"{device}: no NVIDIA GPU on this machine (no nvidia-smi, so no NVIDIA driver); "
                           "run this worker on a GPU host, or use --device cpu")
    # CUDA takes an index, a UUID or a unique prefix of one (GPU-5d1c, MIG-...)
    if not any(physical == index or (physical[:4] in ("GPU-", "MIG-") and uuid.startswith(physical))
               for index, uuid in gpus):
        raise BackendError(f"{device}: this machine has no GPU {physical} (nvidia-smi lists {len(gpus)}: "
                           f"{', '.join(i for i, _ in gpus if i) or 'none'}; indices count CUDA_VISIBLE_DEVICES' entries)")


_ACL_COUNT = ("import acl\nret = acl.init()\ncount, ret2 = acl.rt.get_device_count()\n"
              "print(count, ret, ret2)\nacl.finalize()\n")


def check_npu(device: str, physical: str) -> None:
    """The NPU is visible to pyACL (CANN's runtime) when pinned as the worker will be."""
    env = dict(os.environ, ASCEND_RT_VISIBLE_DEVICES=physical)
    try:
        p = subprocess.run([sys.executable, "-c", _ACL_COUNT], capture_output=True, text=True, timeout=30, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BackendError(f"{device}: could not ask CANN's runtime for its NPUs ({type(e).__name__})") from None
    if p.returncode != 0 and "ModuleNotFoundError" in p.stderr:
        raise BackendError(f"{device}: no CANN runtime on this machine (pyACL's `acl` module is not importable: "
                           "install the CANN toolkit and `source set_env.sh` before starting the worker)")
    try:
        count, *_ = (int(x) for x in p.stdout.split())
    except ValueError:
        raise BackendError(f"{device}: CANN's runtime could not count its NPUs: "
                           f"{(p.stderr.strip().splitlines() or ['no answer'])[-1][:200]}") from None
    if count < 1:
        raise BackendError(f"{device}: this machine has no NPU {physical} visible to CANN (npu-smi info lists "
                           "the NPUs; indices count ASCEND_RT_VISIBLE_DEVICES' entries)")


def check_present(device: str, environ=os.environ) -> None:
    """Refuse a GPU or NPU this machine does not have, in one line (BackendError); the CPU is
    always there."""
    kind, _, index = device.partition(":")
    if kind not in VISIBLE:
        return
    try:
        physical = physical_id(kind, int(index or 0), environ)
    except ValueError as e:
        raise BackendError(str(e)) from None
    (check_cuda if kind == "cuda" else check_npu)(device, physical)
