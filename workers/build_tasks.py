"""Build tasks, consumed on the ``build`` queue only.

Two chains: ``export -> simplify -> commit`` makes the verified ONNX artifact;
``device -> commit`` makes a device artifact (ORT, OM, TensorRT) from it. The first task of a
chain returns the artifact at once when it exists, takes the build lock otherwise, and
retries (without holding a worker) while another request holds it, so that concurrent
requests for the same key build once. An errback removes the staging directory and frees
the lock, so a failed build leaves nothing that looks complete.
"""
from __future__ import annotations

import logging
import os
import socket
import time

from nasq.build import steps
from nasq.build.lock import BuildLock
from nasq.build.spec import BuildSpec
from nasq.build.store import ArtifactStore
from nasq.celery_app import (TASK_BUILD_COMMIT, TASK_BUILD_DEVICE, TASK_BUILD_EXPORT, TASK_BUILD_FAILED,
                             TASK_BUILD_SIMPLIFY)
from nasq.errors import NasqError
from workers.app import app, settings
from workers.tasks import _store

log = logging.getLogger("nasq.build")
WAIT_RETRIES = 3600  # x 2 s: how long a request waits for another one's build of the same key


def _artifacts() -> ArtifactStore:
    return ArtifactStore(settings.artifact_dir)


def _lock(spec: BuildSpec) -> BuildLock:
    return BuildLock(_store().r, spec.key, spec.token)


def _status(key: str, text: str) -> None:
    _store().r.set(f"nasq:build:status:{key}", text, ex=3600)


def _begin(task, spec: BuildSpec) -> dict:
    store = _artifacts()
    meta = store.get(spec.key)
    if meta is not None:
        return {"cached": True, "key": spec.key, "meta": meta}
    lock = _lock(spec)
    if not lock.acquire():
        _status(spec.key, f"waiting for the build in flight ({lock.owner()})")
        raise task.retry(countdown=2, max_retries=WAIT_RETRIES)
    meta = store.get(spec.key)  # published while we waited for the lock
    if meta is not None:
        lock.release()
        return {"cached": True, "key": spec.key, "meta": meta}
    staging = store.staging(spec.key, spec.token)
    return {"cached": False, "key": spec.key, "spec": spec.to_dict(), "staging": staging, "steps": [],
            "verification": [], "started": time.time(), "host": socket.gethostname()}


def _run(state: dict, name: str, fn, *args) -> dict:
    if state["cached"]:
        return state
    spec = BuildSpec.from_dict(state["spec"])
    lock = _lock(spec)
    if not lock.extend():
        raise NasqError(f"build {spec.key}: lost its lock (expired?); another request may be building it")
    _status(spec.key, f"{name} on {socket.gethostname()}")
    log.info("build %s: %s", spec.key, name)
    with lock.kept():
        record = fn(spec, *args, state["staging"], state["verification"])
    state["steps"].append(record)
    return state


@app.task(name=TASK_BUILD_EXPORT, bind=True)
def build_export(self, spec: dict) -> dict:
    state = _begin(self, BuildSpec.from_dict(spec))
    if not state["cached"]:
        r = _store().r
        r.incr(f"nasq:build:exports:{state['key']}")
        r.expire(f"nasq:build:exports:{state['key']}", settings.result_expires)
    return _run(state, "export", steps.export)


@app.task(name=TASK_BUILD_SIMPLIFY)
def build_simplify(state: dict) -> dict:
    return _run(state, "simplify", steps.simplify)


@app.task(name=TASK_BUILD_DEVICE, bind=True)
def build_device(self, spec: dict) -> dict:
    s = BuildSpec.from_dict(spec)
    onnx = os.path.join(_artifacts().path(s.onnx_key), "model.onnx")
    if not os.path.isfile(onnx):
        raise NasqError(f"build {s.key}: its ONNX artifact {s.onnx_key} is missing from {settings.artifact_dir}")
    state = _begin(self, s)
    if not state["cached"]:
        import shutil

        shutil.copy(os.path.join(_artifacts().path(s.onnx_key), steps.REFERENCE), state["staging"])
        onnx_meta = _artifacts().get(s.onnx_key) or {}
        state["model"] = onnx_meta.get("model")
        state["graph"] = onnx_meta.get("graph")
        state["verification"] = list(onnx_meta.get("verification") or [])  # the steps that made its input
    return _run(state, s.target, steps.DEVICE_STEPS[s.target], onnx)


@app.task(name=TASK_BUILD_COMMIT)
def build_commit(state: dict) -> dict:
    if state["cached"]:
        return state
    spec = BuildSpec.from_dict(state["spec"])
    from nasq.build.spec import tool_versions
    from nasq.hashing import file_digest

    staging = state["staging"]
    files = sorted(f for f in os.listdir(staging) if not f.startswith(".") and f != steps.REFERENCE)
    meta = {"key": spec.key, "target": spec.target, "created": time.time(), "built_on": state["host"],
            "build_s": round(time.time() - state["started"], 2), "spec": state["spec"],
            "versions": tool_versions(spec.target), "steps": state["steps"], "verification": state["verification"],
            "files": {f: file_digest(os.path.join(staging, f)) for f in files},
            "graph": next((s.get("graph") for s in reversed(state["steps"]) if s.get("graph")), state.get("graph")),
            "model": next((s["model"] for s in state["steps"] if s.get("model")), state.get("model"))}
    path = _artifacts().commit(spec.key, staging, meta)
    _lock(spec).release()
    _status(spec.key, "done")
    return {"cached": False, "key": spec.key, "meta": meta, "path": path}


@app.task(name=TASK_BUILD_FAILED)
def build_failed(request, exc, traceback, spec: dict | None = None) -> None:
    """Errback: remove the staging directory, free the lock."""
    if not spec:
        return
    s = BuildSpec.from_dict(spec)
    store = _artifacts()
    store.discard(store.staging_path(s.key, s.token))
    _lock(s).release()
    _status(s.key, f"failed: {type(exc).__name__}: {exc}")
