"""Build tasks, consumed on the ``build`` queue only. Each step is a view over
``nasq.artifacts.pipeline``; see there for the chains, the lock and the clean-up."""
from __future__ import annotations

from nasq.artifacts import pipeline, steps
from nasq.artifacts.spec import BuildSpec
from nasq.artifacts.store import ArtifactStore
from nasq.wire import (TASK_BUILD_COMMIT, TASK_BUILD_DEVICE, TASK_BUILD_EXPORT, TASK_BUILD_FAILED,
                            TASK_BUILD_SIMPLIFY)
from workers.app import WorkerTask, app

WAIT_RETRIES = 3600  # x 2 s: how long a request waits for another one's build of the same key


def _begin(task, begin, spec: dict) -> dict:
    """The first step of a chain; while another request builds the same key, retry later
    instead of holding this worker."""
    try:
        return begin(BuildSpec.from_dict(spec).within(task.worker.roots), store=task.store, artifacts=task.artifacts)
    except pipeline.BuildBusy:
        raise task.retry(countdown=2, max_retries=WAIT_RETRIES) from None


@app.task(name=TASK_BUILD_EXPORT, bind=True, base=WorkerTask)
def build_export(self, spec: dict) -> dict:
    return _begin(self, pipeline.begin_export, spec)


@app.task(name=TASK_BUILD_SIMPLIFY, bind=True, base=WorkerTask)
def build_simplify(self, state: dict) -> dict:
    return pipeline.step(state, "simplify", steps.simplify, store=self.store, artifacts=self.artifacts)


@app.task(name=TASK_BUILD_DEVICE, bind=True, base=WorkerTask)
def build_device(self, spec: dict) -> dict:
    return _begin(self, pipeline.begin_device, spec)


@app.task(name=TASK_BUILD_COMMIT, bind=True, base=WorkerTask)
def build_commit(self, state: dict) -> dict:
    return pipeline.commit(state, store=self.store, artifacts=self.artifacts)


@app.task(name=TASK_BUILD_FAILED)
def build_failed(request, exc, traceback, spec: dict | None = None) -> None:
    """Errback (unbound, see workers.tasks.run_failed): remove the staging directory, free the lock."""
    if spec:
        pipeline.abort(BuildSpec.from_dict(spec), exc, store=WorkerTask.run_store(),
                       artifacts=ArtifactStore(WorkerTask.configured().settings.artifact_dir))
