"""The Celery application: settings for long accelerator tasks, JSON only.

Tasks are implemented in ``workers/`` and addressed here by name, so clients send them
without importing worker code.
"""
from __future__ import annotations

from celery import Celery

from ..config import Settings

TASK_EVAL_SHARD = "nasq.eval_shard"
TASK_MERGE = "nasq.merge_run"
TASK_RUN_FAILED = "nasq.run_failed"
TASK_BUILD_EXPORT = "nasq.build.export"
TASK_BUILD_SIMPLIFY = "nasq.build.simplify"
TASK_BUILD_DEVICE = "nasq.build.device"
TASK_BUILD_COMMIT = "nasq.build.commit"
TASK_BUILD_FAILED = "nasq.build.failed"

TASK_SWEEP_POINT = "nasq.sweep_point"

BUILD_QUEUE = "build"


def worker_queue(node_name: str) -> str:
    """The queue only one worker consumes: sweeps address a device through it."""
    return f"w.{node_name}"


def eval_queue(backend: str) -> str:
    """Default evaluation queue of a backend: workers of that runtime consume it."""
    return f"eval.{backend}"


def celery_config(settings: Settings) -> dict:
    vt = {"visibility_timeout": settings.visibility_timeout}
    return dict(
        broker_url=settings.broker_url,
        result_backend=settings.backend_url,
        # JSON only, on both sides: pickle would let anyone who can write to Redis run code.
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # Long accelerator tasks: acknowledge after the work, requeue if the worker dies,
        # hold at most one unstarted shard per worker.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_transport_options=vt,
        result_backend_transport_options=vt,
        visibility_timeout=settings.visibility_timeout,
        result_expires=settings.result_expires,
        # Chords: the merge must see every shard result; keys must not be evicted.
        result_extended=True,
        task_track_started=True,
        task_send_sent_event=True,
        worker_send_task_events=True,
        # Every build task runs on the build queue, which evaluation workers never consume.
        task_routes={"nasq.build.*": {"queue": BUILD_QUEUE}},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # The model loads lazily on the first task, not in worker_process_init.
        worker_proc_alive_timeout=60.0,
    )


def make_app(settings: Settings | None, *, include: list[str] | None = None) -> Celery:
    """A Celery app bound to ``settings``' broker and result backend (configure it later with
    ``configure`` when ``settings`` is None). ``include``: task modules the worker imports."""
    app = Celery("nasq", include=include or [])
    if settings is not None:
        configure(app, settings)
    return app


def configure(app: Celery, settings: Settings) -> None:
    app.conf.update(celery_config(settings))
