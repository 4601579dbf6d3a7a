"""The session: one way to reach a deployment (the configured broker, or a private local
cluster started for the duration), submission by canvas (a chord for an evaluation, a chain
for a build, a group for a sweep) and the one wait loop that watches a run's record."""
from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable

import redis
from celery import chain, chord, group
from celery.result import AsyncResult
from kombu.exceptions import BatchPublishError, OperationalError

from ..config import Settings
from ..errors import NasqError, RunError
from ..wire import (BUILD_QUEUE, TASK_BUILD_COMMIT, TASK_BUILD_DEVICE, TASK_BUILD_EXPORT, TASK_BUILD_FAILED,
                    TASK_BUILD_SIMPLIFY, TASK_EVAL_SHARD, TASK_MERGE, TASK_RUN_FAILED, TASK_SWEEP_POINT, SweepPoint,
                    merge_task_id, shard_task_id, shard_tasks, sweep_point_task_id, worker_queue)
from .app import make_app
from .broker import probe
from .local import LocalCluster, WorkerSpec
from .store import RunStore


#: what a broker that went away raises, in redis-py and in kombu
BROKER_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OperationalError)


@dataclass
class Progress:
    """What the wait loop shows: units done, a failure recorded by the workers, a status line."""

    done: int = 0
    #: what ended the work: a message (a RunError), or the error itself (its class says how)
    failed: str | Exception | None = None
    #: a line said when it changes (the broker is full, nobody serves the queue)
    status: str | None = None
    #: lines said once each (a worker excluded, a queue served again)
    notes: tuple[str, ...] = ()
    #: what a timeout says about the work: whether anything goes on
    on_timeout: str | None = None


#: one submission at a time per process: ``_sending_unawaited`` patches the app for its block
_SENDING = threading.Lock()


@contextmanager
def _sending_unawaited(app, producer):
    """Every message ``app`` sends in this block goes through ``producer`` (and so into its
    publish batch: a chord does not hand the producer it is given on to its header's group), and
    the result backend subscribes to none of their results (the client follows the run's record)."""
    backend = app.backend
    subscribing = getattr(backend, "subscribe_on_send", None)  # nasq's ResultBackend (redis) only
    app.producer_or_acquire = lambda producer_=None: nullcontext(producer_ or producer)
    if subscribing is not None:
        backend.subscribe_on_send = False
    try:
        yield
    finally:
        del app.producer_or_acquire  # the class's method again
        if subscribing is not None:
            backend.subscribe_on_send = subscribing


class Session:
    """A connection to a nasq deployment. ``Session.open(settings, workers=[...])`` uses the
    configured broker, or starts a private Redis and the given local workers when there is none
    (``close()`` stops them)."""

    def __init__(self, settings: Settings, *, cluster: LocalCluster | None = None):
        if cluster is None:
            probe(settings)  # a wrong password or a silent broker: one line now, not a hang or a traceback later
        self.settings, self.cluster = settings, cluster
        self.app = make_app(settings)
        self.store = RunStore.for_settings(settings)

    @classmethod
    def open(cls, settings: Settings, *, workers: list[WorkerSpec] | None = None, log=print) -> Session:
        if settings.broker_url:
            return cls(settings)
        if not workers:
            raise NasqError("no broker: pass --broker redis://HOST:6379/0 or set NASQ_BROKER_URL")
        workdir = os.path.join(settings.work_dir, time.strftime("%Y%m%d-%H%M%S-") + str(os.getpid()))
        cluster = LocalCluster(workers, workdir=workdir, settings=settings, log=log)
        try:
            url = cluster.start()
            return cls(dataclasses.replace(settings, broker_url=url, result_backend=None), cluster=cluster)
        except BaseException:
            cluster.stop()
            raise

    def close(self) -> None:
        """Stop a private cluster and drop this client's broker and Redis connections."""
        # Results collected later (AsyncResult.__del__) would unsubscribe over the pubsub
        # connection, after a private Redis stopped: forget the subscriptions now.
        consumer = getattr(self.app.backend, "result_consumer", None)
        if consumer is not None and hasattr(consumer, "subscribed_to"):
            consumer.subscribed_to.clear()
        self.app.close()
        self.store.r.close()
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ who is listening
    def live_workers(self, queue: str) -> list[str]:
        """Workers in the registry with a recent heartbeat that consume ``queue``."""
        return sorted(self.store.live_consumers(queue))

    def require_consumer(self, queue: str, hint: str) -> None:
        """Raise unless a worker answering right now consumes ``queue``."""
        queues = self.app.control.inspect(timeout=2.0).active_queues() or {}
        if not any(q["name"] == queue for qs in queues.values() for q in qs):
            raise NasqError(f"no worker consumes the {queue} queue: {hint}")

    # ------------------------------------------------------------------ canvases
    def submit_run(self, manifest: dict, shards: list[dict] | None = None, *, merge_id: str | None = None,
                   dispatches: dict[str, int] | None = None):
        """The chord of an evaluation: one ``eval_shard`` per shard (all of the manifest's by
        default; ``dispatches``: shard id -> its dispatch count, for shards sent again by a
        resume), then ``merge_run``; an errback marks the run failed. Returns the merge's result."""
        run_id, queue = manifest["run_id"], manifest["queue"]
        tasks = shard_tasks(manifest, shards)
        body = self.app.signature(TASK_MERGE, kwargs={"run_id": run_id}, queue=queue,
                                  task_id=merge_id or merge_task_id(run_id),
                                  argsrepr=f"run={run_id} shards={len(manifest['shards'])}")
        body.link_error(self.app.signature(TASK_RUN_FAILED, kwargs={"run_id": run_id}, queue=queue))
        if not tasks:  # nothing to redo: the merge fetches every shard's stored result itself
            return body.clone(args=([],)).apply_async()
        # ignore_result: a shard's result is in the run's ledger and its chord part in the chord's
        # own set; Celery's copy of it (a read, a write and a publish) would be read by nobody
        header = group(self.app.signature(TASK_EVAL_SHARD, args=t.args(), queue=queue, argsrepr=t.argsrepr,
                                          task_id=shard_task_id(run_id, t.shard_id, (dispatches or {}).get(t.shard_id, 0)),
                                          ignore_result=True)
                       for t in tasks)
        # one pipelined write for every shard and its task-sent event
        try:
            with _SENDING, self.app.producer_or_acquire() as producer, \
                    producer.batch(max_size=4 * len(tasks) + 1000), _sending_unawaited(self.app, producer):
                return chord(header, app=self.app)(body)
        except BatchPublishError as e:  # the pipelined write failed: say why as the broker said it
            raise (e.__cause__ if isinstance(e.__cause__, Exception) else OperationalError(str(e))) from None

    def submit_build(self, spec) -> object:
        """The chain of a build on the build queue: export -> simplify -> commit for ONNX,
        device -> commit for a device artifact; an errback cleans up after a failed step."""
        sig = lambda name, *args: self.app.signature(name, args=args, queue=BUILD_QUEUE)  # noqa: E731
        if spec.target == "onnx":
            c = chain(sig(TASK_BUILD_EXPORT, spec.to_dict()), sig(TASK_BUILD_SIMPLIFY), sig(TASK_BUILD_COMMIT))
        else:
            c = chain(sig(TASK_BUILD_DEVICE, spec.to_dict()), sig(TASK_BUILD_COMMIT))
        c.link_error(self.app.signature(TASK_BUILD_FAILED, kwargs={"spec": spec.to_dict()}, queue=BUILD_QUEUE))
        return c.apply_async()

    def submit_sweep(self, points: list[SweepPoint]):
        """The group of a sweep: each point on the queue of the one worker it measures."""
        return group(self.app.signature(TASK_SWEEP_POINT, args=(p.to_payload(),), queue=worker_queue(p.worker),
                                        task_id=sweep_point_task_id(p.sweep_id, p.point_id), argsrepr=p.argsrepr)
                     for p in points).apply_async()

    # ------------------------------------------------------------------ the wait loop
    def wait(self, result, *, label: str, poll: Callable[[], Progress], total: int | None = None,
             unit: str = "img", timeout: float | None = None, progress: bool = True, log=print):
        """Wait for ``result`` (a run's merge, a build chain, a sweep group) and return its value.

        While it runs: local workers are checked (one that died ends the wait with its log),
        ``poll()`` reports progress and failures the workers recorded, and progress is shown
        (a bar on a terminal, else a line every 10 s).

        Raises:
            RunError: the work failed, a local worker died, or ``timeout`` passed.
        """
        bar = None
        if progress and total and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=total, unit=unit, desc=label, file=sys.stderr, dynamic_ncols=True)
        t0 = last_line = time.time()
        last_status, away, told, p = None, None, None, Progress()
        try:
            while True:
                if self.cluster is not None:
                    self.cluster.check()
                if timeout and time.time() - t0 > timeout:
                    where = ("its local workers were stopped with this command, so it is incomplete"
                             if self.cluster is not None else p.on_timeout
                             or "it goes on on the workers (`nasq status` follows it)")
                    raise RunError(f"{label} did not finish within {timeout:.0f} s; {where}")
                try:
                    if result.ready():
                        break
                    p = poll()
                except BROKER_ERRORS as e:
                    if away is None:
                        away = time.time()
                        log(f"{label}: lost the broker ({e}); waiting for it to come back"
                            + (f" (at most {timeout:.0f} s in all)" if timeout else ""))
                    time.sleep(1.0)
                    continue
                if away is not None:
                    log(f"{label}: the broker is back after {time.time() - away:.0f} s")
                    away = None
                if p is not told:  # poll() hands the same Progress back until it reads again
                    told = p
                    for note in p.notes:
                        log(f"{label}: {note}")
                if p.failed:
                    raise p.failed if isinstance(p.failed, Exception) else RunError(p.failed)
                if p.status and p.status != last_status:
                    log(f"{label}: {p.status}")
                last_status = p.status
                if bar is not None:
                    bar.n = min(total, p.done)
                    bar.refresh()
                elif progress and total and time.time() - last_line >= 10:
                    last_line = time.time()
                    log(f"{label}: {p.done}/{total} {unit}, {p.done / (last_line - t0):.1f} {unit}/s")
                time.sleep(0.3)
            try:
                value = result.get(propagate=True, disable_sync_subtasks=False)
                if bar is not None:  # all of it done: only now the bar is full
                    bar.n = total
                    bar.refresh()
                return value
            except NasqError:
                raise
            except Exception as e:  # a task error comes back re-raised from its serialized form
                raise RunError(f"{label} failed: {e}") from None
        finally:
            if bar is not None:
                bar.close()
            for r in getattr(result, "results", None) or [result]:
                if isinstance(r, AsyncResult):  # drop the subscription: a private Redis may stop next
                    self.app.backend.remove_pending_result(r)
