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
from celery.worker import consumer as celery_consumer

from nasq.artifacts.store import ArtifactStore
from nasq.config import WorkerConfig
from nasq.errors import NasqError
from nasq.inference.resources import DeviceResources
from nasq.queue.app import configure as configure_app
from nasq.queue.app import make_app
from nasq.queue.healing import Healer
from nasq.queue.store import BrokerFull, RunStore

log = logging.getLogger("nasq.worker")



def _deployment_settings():
    """The deployment's settings (its environment variables, the settings file) when they name a broker,
    read as ``nasq worker`` reads them, so that Celery's own command line reaches the deployment
    with this app: ``celery -A workers.app inspect ping|active|stats``, ``status``, ``events``.
    ``nasq worker`` configures the app again with its flags."""
    from nasq.config import load_settings

    try:
        settings = load_settings()
    except NasqError as e:
        log.warning("nasq settings not read (%s): the app has no broker until a worker configures it", e)
        return None
    return settings if settings.broker_url else None


def _make_app():
    """The app, on the deployment's settings where they are whole; on none otherwise (a missing
    signing key, say: ``nasq worker`` then says what is wrong in one line, as it configures)."""
    include = ["workers.tasks", "workers.build_tasks"]
    try:
        return make_app(_deployment_settings(), include=include)
    except NasqError as e:
        log.warning("nasq settings not usable (%s): the app has no broker until a worker configures it", e)
        return make_app(None, include=include)


app = _make_app()
app.conf.worker_consumer = f"{__name__}:Consumer"  # below: records messages refused for their signature


class WorkerTask(Task):
    """Base of every nasq task: the worker's configuration, its run store and loaded model."""

    config: ClassVar[WorkerConfig | None] = None
    started: ClassVar[float] = 0.0  # when the worker was configured (not when this module was imported)
    _store: ClassVar[RunStore | None] = None
    _healer: ClassVar[Healer | None] = None
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
        """The run store of tasks: it rides out a broker restart and waits while the broker is full."""
        if WorkerTask._store is None:
            s = WorkerTask.configured().settings
            WorkerTask._store = RunStore.for_settings(s, ride_out=True)
        return WorkerTask._store

    @staticmethod
    def run_healer() -> Healer:
        if WorkerTask._healer is None:
            WorkerTask._healer = Healer.for_settings(app, WorkerTask.run_store(), WorkerTask.configured().settings)
        return WorkerTask._healer

    @property
    def store(self) -> RunStore:
        return WorkerTask.run_store()

    @property
    def healer(self) -> Healer:
        return WorkerTask.run_healer()

    @property
    def resources(self) -> DeviceResources:
        if WorkerTask._resources is None:
            from nasq.data.hostcache import HostCache

            WorkerTask._resources = DeviceResources(self.worker.local_device,
                                                    host_cache=HostCache.for_settings(self.worker.settings))
        return WorkerTask._resources

    @property
    def artifacts(self) -> ArtifactStore:
        return ArtifactStore(self.worker.settings.artifact_dir)


def configure(config: WorkerConfig) -> None:
    """Bind the app to the configuration's broker and hand the configuration to the tasks."""
    configure_app(app, config.settings)
    # a worker waits for messages in one BRPOP of worker_poll_s (kombu's default asks every second)
    app.conf.broker_transport_options = {**app.conf.broker_transport_options,
                                         "polling_interval": max(0.5, config.settings.worker_poll_s)}
    # visible in Flower (a worker's Config tab, /api/workers "conf") and `celery inspect conf`
    app.conf.update(nasq_device=config.device, nasq_physical_device=config.physical_device,
                    nasq_backend=config.backend, nasq_precision=config.precision)
    WorkerTask.config = config
    WorkerTask.started = time.time()


_last_heal = [0.0]
#: the main process's own store and healer (registry, heartbeat, healing turns): it must never
#: wait (on a full broker they give up until the next beat)
_beat: dict = {}


def _main_store() -> RunStore:
    if not _beat:
        c = WorkerTask.configured()
        _beat["store"] = store = RunStore.for_settings(c.settings, wait_when_full=False)
        _beat["healer"] = Healer.for_settings(app, store, c.settings)
    return _beat["store"]


@worker_ready.connect
def _register(sender=None, **_):
    c = WorkerTask.configured()
    _main_store().registry.register_worker(c.name, {**c.describe(), "host": socket.gethostname(), "pid": os.getpid(),
                                           "started": WorkerTask.started, "heartbeat_s": c.settings.worker_heartbeat_s})


@heartbeat_sent.connect
def _heartbeat(sender=None, **_):
    """Every heartbeat (worker_heartbeat_s): stay in the registry (again, after a broker that lost its
    data), and now and then look for shards whose worker is gone (``nasq.queue.healing``)."""
    c = WorkerTask.configured()
    store = _main_store()
    try:
        if not store.registry.touch_worker(c.name, c.settings.worker_heartbeat_s):  # first: it is what "alive" reads
            _register()
        every = max(1.0, c.settings.lease_s / 3)
        if time.time() - _last_heal[0] >= every:
            _last_heal[0] = time.time()
            if store.ledger.heal_turn(every):  # one worker per interval, not the whole fleet
                _beat["healer"].heal_active()
    except BrokerFull:
        pass  # said once a minute by the transport and the tasks; nothing to do until memory is freed
    except Exception:  # noqa: BLE001 - a broker blip must not stop the heartbeat
        log.warning("heartbeat bookkeeping failed", exc_info=True)


class Consumer(celery_consumer.Consumer):
    """Celery's consumer, which also records a message it refuses for its signature before any
    task runs (kombu's ContentDisallowed: unsigned while signing is on, or signed while it is
    off; the auth serializer's error, a DecodeError: a signature or certificate it does not
    trust) for the message's run, so that the client that sent it says why nothing runs
    instead of waiting (``RunRecords.refusals``). Celery logs and discards the message as before."""

    def on_invalid_task(self, body, message, exc):
        _record_refusal(message, exc)
        return super().on_invalid_task(body, message, exc)

    def on_decode_error(self, message, exc):
        _record_refusal(message, exc)
        return super().on_decode_error(message, exc)


def _record_refusal(message, exc) -> None:
    text = f"{type(exc).__name__}: {exc}"
    if type(exc).__name__ not in ("ContentDisallowed", "DecodeError", "SecurityError"):
        return
    try:
        from nasq.wire import run_of_task

        run_id = run_of_task((message.headers or {}).get("id"))
        if run_id is None:
            return
        signed = message.content_type == "application/data"  # Celery's auth serializer
        _main_store().runs.record_refusal(run_id, WorkerTask.configured().name, signed=signed, text=text)
    except Exception:  # noqa: BLE001 - Celery logs the refusal all the same
        log.warning("could not record the refusal of a message", exc_info=True)


@worker_shutdown.connect
def _unregister(sender=None, **_):
    _main_store().registry.unregister_worker(WorkerTask.configured().name)
