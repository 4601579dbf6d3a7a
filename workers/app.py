"""The worker's Celery app and the base class of its tasks.

``nasq worker`` (``workers/__main__.py``) builds one ``WorkerConfig`` from its flags and the
settings and calls ``configure``; Celery imports the task modules when the worker starts, and
the pool's child process inherits both. Tasks reach the configuration, the run store and what
the process keeps loaded through ``WorkerTask``, never through the environment.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import ClassVar

from celery import Task
from celery.signals import heartbeat_sent, worker_ready, worker_shutdown

from nasq.artifacts.store import ArtifactStore
from nasq.config import WorkerConfig
from nasq.inference.resources import DeviceResources
from nasq.queue.app import configure as configure_app
from nasq.queue.app import make_app
from nasq.queue.healing import heal_active
from nasq.queue.store import RunStore

log = logging.getLogger("nasq.worker")

app = make_app(None, include=["workers.tasks", "workers.build_tasks"])


class WorkerTask(Task):
    """Base of every nasq task: the worker's configuration, its run store and loaded model."""

    config: ClassVar[WorkerConfig | None] = None
    _store: ClassVar[RunStore | None] = None
    _resources: ClassVar[DeviceResources | None] = None

    @property
    def worker(self) -> WorkerConfig:
        return WorkerTask.configured()

    @staticmethod
    def configured() -> WorkerConfig:
        if WorkerTask.config is None:
            raise RuntimeError("this worker was not configured: start it with `nasq worker` (or `python -m workers`)")
        return WorkerTask.config

    @staticmethod
    def run_store() -> RunStore:
        if WorkerTask._store is None:
            s = WorkerTask.configured().settings
            WorkerTask._store = RunStore.for_settings(s, ride_out=True)
        return WorkerTask._store

    @property
    def store(self) -> RunStore:
        return WorkerTask.run_store()

    @property
    def resources(self) -> DeviceResources:
        if WorkerTask._resources is None:
            WorkerTask._resources = DeviceResources(self.worker.local_device)
        return WorkerTask._resources

    @property
    def artifacts(self) -> ArtifactStore:
        return ArtifactStore(self.worker.settings.artifact_dir)


def configure(config: WorkerConfig) -> None:
    """Bind the app to the configuration's broker and hand the configuration to the tasks."""
    configure_app(app, config.settings)
    # visible in Flower (a worker's Config tab, /api/workers "conf") and `celery inspect conf`
    app.conf.update(nasq_device=config.device, nasq_physical_device=config.physical_device,
                    nasq_backend=config.backend, nasq_precision=config.precision)
    WorkerTask.config = config


@worker_ready.connect
def _register(sender=None, **_):
    c = WorkerTask.configured()
    WorkerTask.run_store().register_worker(c.name, {**c.describe(), "host": socket.gethostname(),
                                                    "pid": os.getpid(), "started": _STARTED, "current": None})


_STARTED = time.time()
_last_heal = [0.0]


@heartbeat_sent.connect
def _heartbeat(sender=None, **_):
    """Every heartbeat (about 2 s): stay in the registry (again, after a broker that lost its
    data), and now and then look for shards whose worker is gone (``nasq.queue.healing``)."""
    c, store = WorkerTask.configured(), WorkerTask.run_store()
    try:
        if not store.touch_worker(c.name):
            _register()
        every = max(1.0, c.settings.lease_s / 3)
        if time.time() - _last_heal[0] >= every:
            _last_heal[0] = time.time()
            if store.heal_turn(every):  # one worker per interval, not the whole fleet
                heal_active(app, store, lease_s=c.settings.lease_s)
    except Exception:  # noqa: BLE001 - a broker blip must not stop the heartbeat
        log.warning("heartbeat bookkeeping failed", exc_info=True)


@worker_shutdown.connect
def _unregister(sender=None, **_):
    WorkerTask.run_store().unregister_worker(WorkerTask.configured().name)
