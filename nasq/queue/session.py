"""The session: one way to reach a deployment (the configured broker, or a private local
cluster started for the duration), submission by canvas (a chord for an evaluation, a chain
for a build, a group for a sweep) and the one wait loop that watches a run's record."""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from collections.abc import Iterable
from typing import Callable

import redis
from celery import chord
from celery.result import AsyncResult
from kombu.exceptions import OperationalError

from ..config import Settings
from ..errors import NasqError, RunError
from ..rundata import PlannedShard, RunManifest
from ..wire import SweepPoint
from . import messages
from .app import make_app
from .broker import probe
from .local import LocalCluster, WorkerSpec
from .store import RunStore
from .transport import forget_result_subscriptions, sending_in_one_write


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
        forget_result_subscriptions(self.app)
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
        return sorted(self.store.registry.live_consumers(queue))

    def require_consumer(self, queue: str, hint: str) -> None:
        """Raise unless a worker answering right now consumes ``queue``."""
        queues = self.app.control.inspect(timeout=2.0).active_queues() or {}
        if not any(q["name"] == queue for qs in queues.values() for q in qs):
            raise NasqError(f"no worker consumes the {queue} queue: {hint}")

    # ------------------------------------------------------------------ canvases
    def submit_run(self, manifest: RunManifest, shards: Iterable[PlannedShard] | None = None, *,
                   merge_id: str | None = None,
                   dispatches: dict[str, int] | None = None):
        """The chord of an evaluation: one ``eval_shard`` per shard (all of the manifest's by
        default; ``dispatches``: shard id -> its dispatch count, for shards sent again by a
        resume), then ``merge_run``; an errback marks the run failed. Returns the merge's result."""
        tasks = manifest.tasks(shards)
        header, body = messages.run_chord_parts(self.app, manifest, tasks, merge_id=merge_id, dispatches=dispatches)
        if not tasks:  # nothing to redo: the merge fetches every shard's stored result itself
            return body.clone(args=([],)).apply_async()
        with sending_in_one_write(self.app, len(tasks)):  # every shard and its task-sent event
            return chord(header, app=self.app)(body)

    def submit_build(self, spec) -> object:
        """The chain of a build on the build queue: export -> simplify -> commit for ONNX,
        device -> commit for a device artifact; an errback cleans up after a failed step."""
        return messages.build_chain(self.app, spec).apply_async()

    def submit_sweep(self, points: list[SweepPoint]):
        """The group of a sweep: each point on the queue of the one worker it measures."""
        return messages.sweep_group(self.app, points).apply_async()

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
