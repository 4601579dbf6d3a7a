"""The Celery application: settings for long accelerator tasks, JSON only (task and queue
names are in ``nasq.wire``)."""
from __future__ import annotations

import os

from celery import Celery

from ..config import Settings
from ..errors import NasqError
from ..wire import BUILD_QUEUE, BUILD_TASKS
from .transport import TRANSPORT, result_backend_url


def celery_config(settings: Settings) -> dict:
    # Bounded waits on the broker: a silent server fails a call instead of hanging it, idle
    # connections are checked, and a restart is retried (kombu) for broker_outage_s.
    vt = {"visibility_timeout": settings.visibility_timeout,
          "socket_connect_timeout": settings.broker_connect_timeout_s,
          "socket_timeout": settings.broker_socket_timeout_s,
          "health_check_interval": settings.broker_health_check_s}
    return {**dict(
        broker_url=settings.broker_url,
        # kombu's Redis transport, made to survive a broker at maxmemory (transport.py)
        broker_transport=TRANSPORT,
        result_backend=result_backend_url(settings.backend_url),
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
        result_expires=settings.result_expires,
        # Chords: the merge must see every shard result; keys must not be evicted.
        result_extended=True,
        # no STARTED state in the result backend (two writes per shard): the run's ledger says
        # which shard runs where, and Flower has the task-started event
        task_track_started=False,
        # Task events only when asked for (task_events, or Flower's enable_events): four
        # messages a shard that nothing but a monitor reads. Worker heartbeats go on regardless.
        task_send_sent_event=settings.task_events,
        worker_send_task_events=settings.task_events,
        # Every build task runs on the build queue, which evaluation workers never consume.
        task_routes={BUILD_TASKS: {"queue": BUILD_QUEUE}},
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=settings.broker_connect_timeout_s,
        redis_socket_connect_timeout=settings.broker_connect_timeout_s,
        redis_socket_timeout=settings.broker_socket_timeout_s,
        redis_backend_health_check_interval=settings.broker_health_check_s,
        worker_hijack_root_logger=False,
        # The model loads lazily on the first task, not in worker_process_init.
        worker_proc_alive_timeout=60.0,
    ), **signing_config(settings)}  # signing replaces the JSON serializer of messages


def signing_config(settings: Settings) -> dict:
    """Message signing with Celery's ``auth`` serializer, when the settings name a key: every
    task, control and event message is signed with this process's key, and only messages
    signed by a certificate in the store are accepted. Results stay JSON (they are data, never
    code). Nothing when signing is off."""
    parts = (settings.signing_key, settings.signing_cert, settings.signing_cert_store)
    if not any(parts):
        return {}
    if not all(parts):
        raise NasqError("message signing needs all three of signing_key, signing_cert and signing_cert_store "
                        "(NASQ_SIGNING_KEY, NASQ_SIGNING_CERT, NASQ_SIGNING_CERT_STORE)")
    for what, path in (("signing_key", settings.signing_key), ("signing_cert", settings.signing_cert)):
        if not os.path.isfile(path):
            raise NasqError(f"{what} {path} does not exist")
    store = settings.signing_cert_store
    if os.path.isdir(store):
        store = os.path.join(store, "*.pem")
    return dict(task_serializer="auth", event_serializer="auth", accept_content=["auth"], security_key=settings.signing_key,
                security_certificate=settings.signing_cert, security_cert_store=store, security_digest="sha256")


def make_app(settings: Settings | None, *, include: list[str] | None = None) -> Celery:
    """A Celery app bound to ``settings``' broker and result backend (configure it later with
    ``configure`` when ``settings`` is None). ``include``: task modules the worker imports."""
    app = Celery("nasq", include=include or [])
    if settings is not None:
        configure(app, settings)
    return app


def configure(app: Celery, settings: Settings) -> None:
    app.conf.update(celery_config(settings))
    if app.conf.task_serializer == "auth":
        try:
            app.setup_security()
        except Exception as e:  # noqa: BLE001 - unreadable key or certificates: one line
            raise NasqError(f"message signing: {type(e).__name__}: {e}") from None
