"""A build's life, step by step: the library functions behind the build tasks.

A chain's first task ``begin``s: the artifact is returned at once when it exists, else the
build lock is taken (``BuildBusy`` while another request holds it: the task retries without
holding a worker, so concurrent requests for one key build once). Each ``step`` runs in the
staging directory with the lock kept alive; ``commit`` publishes the directory with one
rename; ``abort`` (the errback) removes the staging directory and frees the lock, so a
failed build leaves nothing that looks complete. The build state travels from task to task
as a JSON dict. ``store`` is the run store (its build lock and the status line a waiting client shows).
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import time

from ..errors import NasqError
from ..files import file_digest
from . import steps
from .spec import BuildSpec, tool_versions
from .store import ArtifactStore

log = logging.getLogger("nasq.build")


class BuildBusy(Exception):
    """Another request is building this key: try again in a moment."""


def begin(spec: BuildSpec, *, store, artifacts: ArtifactStore) -> dict:
    """The build state for ``spec``: a cache hit, or a fresh staging directory under the lock."""
    meta = artifacts.verified(spec.key)
    if meta is not None:
        return {"cached": True, "key": spec.key, "meta": meta}
    if file_digest(spec.weights) != spec.weights_sha256:  # the key names these exact weights: never others
        raise NasqError(f"build {spec.key}: {spec.weights} is not the checkpoint the build was requested for "
                        "(its sha256 differs: changed since?); request the build again")
    lock = store.builds.build_lock(spec.key, spec.token)
    if not lock.take():
        store.builds.set_build_status(spec.key, f"waiting for the build in flight ({lock.holder()})")
        raise BuildBusy(spec.key)
    meta = artifacts.verified(spec.key)  # published while we waited for the lock
    if meta is not None:
        lock.free()
        return {"cached": True, "key": spec.key, "meta": meta}
    return {"cached": False, "key": spec.key, "spec": spec.to_dict(), "staging": artifacts.staging(spec.key, spec.token),
            "steps": [], "verification": [], "started": time.time(), "host": socket.gethostname()}


def begin_export(spec: BuildSpec, *, store, artifacts: ArtifactStore) -> dict:
    return step(begin(spec, store=store, artifacts=artifacts), "export", steps.export, store=store, artifacts=artifacts)


def begin_device(spec: BuildSpec, *, store, artifacts: ArtifactStore) -> dict:
    """A device artifact (ORT, OM, TensorRT) from the ONNX artifact it is built from."""
    onnx_dir = artifacts.path(spec.onnx_key)
    onnx = os.path.join(onnx_dir, "model.onnx")
    if artifacts.verified(spec.onnx_key) is None or not os.path.isfile(onnx):
        raise NasqError(f"build {spec.key}: its ONNX artifact {spec.onnx_key} is missing from {artifacts.root}")
    state = begin(spec, store=store, artifacts=artifacts)
    if not state["cached"]:
        shutil.copy(os.path.join(onnx_dir, steps.REFERENCE), state["staging"])
        onnx_meta = artifacts.get(spec.onnx_key) or {}
        state["model"], state["graph"] = onnx_meta.get("model"), onnx_meta.get("graph")
        state["verification"] = list(onnx_meta.get("verification") or [])  # the steps that made its input
    return step(state, spec.target, steps.DEVICE_STEPS[spec.target], onnx, store=store, artifacts=artifacts)


def _staging(state: dict, spec: BuildSpec, artifacts: ArtifactStore) -> str:
    """The staging directory of this request, recomputed: a path in the message is never trusted."""
    path = artifacts.staging_path(spec.key, spec.token)
    if state.get("staging") != path:
        raise NasqError(f"build {spec.key}: the state names another staging directory than its own")
    return path


def _held(state: dict, *, store, artifacts: ArtifactStore):
    """(spec, staging folder, lock) of a build in progress whose lock this request still holds."""
    spec = BuildSpec.from_dict(state["spec"])
    staging = _staging(state, spec, artifacts)
    lock = store.builds.build_lock(spec.key, spec.token)
    if not lock.renew():
        raise NasqError(f"build {spec.key}: lost its lock (expired?); another request may be building it")
    return spec, staging, lock


def step(state: dict, name: str, fn, *args, store, artifacts: ArtifactStore) -> dict:
    """Run one build step in the staging directory, the lock kept alive meanwhile."""
    if state["cached"]:
        return state
    spec, staging, lock = _held(state, store=store, artifacts=artifacts)
    store.builds.set_build_status(spec.key, f"{name} on {socket.gethostname()}")
    log.info("build %s: %s", spec.key, name)
    with lock.kept():
        record = fn(spec, *args, staging, state["verification"])
    state["steps"].append(record)
    return state


def commit(state: dict, *, store, artifacts: ArtifactStore) -> dict:
    """Write meta.json and publish the staging directory as the artifact."""
    if state["cached"]:
        return state
    spec, staging, _ = _held(state, store=store, artifacts=artifacts)
    files = sorted(f for f in os.listdir(staging) if not f.startswith(".") and f != steps.REFERENCE)
    meta = {"key": spec.key, "target": spec.target, "created": time.time(), "built_on": state["host"],
            "build_s": round(time.time() - state["started"], 2), "spec": state["spec"],
            "versions": tool_versions(spec.target), "steps": state["steps"], "verification": state["verification"],
            # which steps were checked against PyTorch fp32 and which could not be, and why
            "verified_steps": [r["step"] for r in state["verification"] if r.get("ok")],
            "unverified_steps": [{"step": s["name"], "reason": s["unverified"]} for s in state["steps"]
                                 if s.get("unverified")],
            "files": {f: file_digest(os.path.join(staging, f)) for f in files},
            "graph": next((s.get("graph") for s in reversed(state["steps"]) if s.get("graph")), state.get("graph")),
            "model": next((s["model"] for s in state["steps"] if s.get("model")), state.get("model"))}
    path = artifacts.commit(spec.key, staging, meta)
    store.builds.build_lock(spec.key, spec.token).free()
    store.builds.set_build_status(spec.key, "done")
    return {"cached": False, "key": spec.key, "meta": meta, "path": path}


def abort(spec: BuildSpec, error: BaseException, *, store, artifacts: ArtifactStore) -> None:
    """After a failed step: remove the staging directory, free the lock, record why."""
    artifacts.discard(artifacts.staging_path(spec.key, spec.token))
    store.builds.build_lock(spec.key, spec.token).free()
    store.builds.set_build_status(spec.key, f"failed: {type(error).__name__}: {error}")
