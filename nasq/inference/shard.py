"""One shard of a run on this worker: the library function behind the ``nasq.eval_shard`` task.

A copy of a shard has three round trips with the run's ledger: ``claim_shard`` (the run may
still start shards; counts the attempt, takes the lease, records it as running),
``shard_tick`` about once a second while it runs (progress; it also says when to stop: the run
was cancelled or merged, or the shard was dispatched again elsewhere and another copy holds the
lease or has kept its result) and ``commit_shard`` (the ledger keeps the shard's first ok
result and drops, counting it, any later copy). A worker *process* that dies mid-shard is a
requeue (late acks + reject on worker lost); the attempt counter stops a shard that always
kills its worker from looping forever.

A shard that cannot be evaluated returns ``status: "error"`` after recording it; the task then
raises ``ShardFailed`` so that Flower shows a FAILURE.
"""
from __future__ import annotations

import logging
import secrets
import time
from contextlib import contextmanager
from typing import Protocol

from ..config import WorkerConfig
from ..data.outputs import OutputWriter
from ..envinfo import host_environment
from ..errors import NasqError
from ..keepalive import every
from ..runstate import Outcome, RunState, ShardStatus
from ..wire import ShardTask
from . import failover
from .evaluate import evaluate_range
from .failover import FailureView
from .resources import DeviceResources

log = logging.getLogger("nasq.worker")

#: a running shard reports its progress (and learns whether to stop) at most this often
TICK_S = 1.0
#: upper bounds (seconds) of the batch-latency buckets each kept shard records for ``nasq metrics``
BATCH_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def batch_buckets(latencies_ms: list[float]) -> dict:
    """The shard's batch latencies as a histogram: per bucket of ``BATCH_BUCKETS_S`` (and one
    above the last) how many batches took at most that long and more than the bound before, with
    their sum in seconds and their count."""
    counts = [0] * (len(BATCH_BUCKETS_S) + 1)
    for ms in latencies_ms:
        s = ms / 1e3
        counts[next((i for i, b in enumerate(BATCH_BUCKETS_S) if s <= b), len(BATCH_BUCKETS_S))] += 1
    return {"counts": counts, "sum_s": sum(latencies_ms) / 1e3, "count": len(latencies_ms)}


class ShardBookkeeper(Protocol):
    """What a running shard needs of the run store: its claim, lease, ticks, commit and failure
    record (``queue.ledger.ShardLedger``), the live workers and the run's digest list (the
    Redis run store; a dict in unit tests)."""

    def claim_shard(self, run_id: str, shard_id: str, *, holder: str, lease_s: float, info: dict,
                    max_attempts: int) -> tuple[str, object]: ...
    def shard_tick(self, run_id: str, shard_id: str, *, holder: str, done: int,
                   lease_s: float) -> tuple[str, str | None]: ...
    def commit_shard(self, run_id: str, shard_id: str, *, holder: str, status: str, summary: dict,
                     result: dict | None = None, worker: str = "", reset_streak: bool = False) -> tuple[str, object]: ...
    def renew_lease(self, run_id: str, shard_id: str, holder: str, ttl_s: float) -> bool: ...
    def failure_view(self, run_id: str, shard_id: str, worker: str) -> FailureView: ...
    def record_failure(self, run_id: str, shard_id: str, *, holder: str, worker: str, seen: str,
                       failures: list[dict], streak: int | None, exclusion: dict | None, final: bool,
                       summary: dict, why: str) -> tuple[str, object]: ...
    def live_consumers(self, queue: str) -> set[str]: ...
    def digest_list(self, content: str) -> bytes | None: ...
    def nobody_since(self, run_id: str, shard_id: str, *, clear: bool = False) -> float: ...


class ShardStopped(Exception):
    """This copy of the shard stops: ``why`` is the run's state or "superseded"."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


_STOP_TEXT = {RunState.CANCELLED.value: "the run was cancelled", RunState.DONE.value: "the run was already merged",
              Outcome.SUPERSEDED.value: "the shard was dispatched again and another worker holds it",
              Outcome.DONE_ELSEWHERE.value: "another copy of the shard finished first",
              Outcome.GONE.value: "the run's record is gone"}


def run_shard(task: ShardTask, *, ledger: ShardBookkeeper, resources: DeviceResources, worker: WorkerConfig,
              queue: str | None = None) -> dict:
    """Evaluate images ``[task.start, task.stop)`` of the run's dataset on this worker, under
    the shard's lease. ``queue``: the queue the shard came from (a failed shard is sent again
    there, for another worker: ``failover``).

    Returns:
        A JSON-ready dict: the shard's identity and ``status``: "ok" (with the per-image top-5
        of ``evaluate_range``, timings and provenance, and ``kept``: whether this copy's result
        is the shard's), "error" (with ``error``; ``final``: the shard failed for good, else
        ``dispatches``: it is to be sent again for another worker, its dispatch count now;
        ``excluded``: this failure excluded the worker from the run; ``settled``: (shards
        finished, shards of the run, shards running) after a final failure), "refused" (the run
        holds the shard against this worker: ``reason``), "skipped" (the run may not start
        shards, or the shard has its result) or "stopped" (this copy gave up: see ``reason``).
    """
    job = task.job
    options = worker.backend_options(job.precision)
    holder = f"{worker.name}#{secrets.token_hex(3)}"
    host = host_environment()["host"]
    base = {"run_id": task.run_id, "shard_id": task.shard_id, "start": task.start, "stop": task.stop,
            "worker": worker.name, "host": host, "device": worker.device, "backend": worker.backend,
            "precision": options.precision}
    me = {"name": worker.name, "host": host, "device": worker.device}

    def failed(msg: str | None, *, final: str | None = None) -> dict:
        """This copy failed (``msg``), or this worker may not take the shard (None): decided by
        ``failover.decide`` and recorded at once (read again if another failure came first);
        ``final``: the shard fails for good with that sentence, no worker blamed."""
        s = worker.settings
        outcome, value, d = Outcome.CHANGED, None, None
        while outcome == Outcome.CHANGED:  # a compare and set: another failure of the shard came first
            view = ledger.failure_view(task.run_id, task.shard_id, worker.name)
            live = ledger.live_consumers(queue) if queue else set()
            d = failover.decide(view, worker=me, error=msg, live=live, queue=queue,
                                shard_max_devices=s.shard_max_devices, device_max_failures=s.device_max_failures,
                                final=final)
            summary = {"status": ShardStatus.ERROR, "error": d.error, "worker": worker.name, "host": host,
                       "device": worker.device, "images": 0, "finished_at": time.time()}
            outcome, value = ledger.record_failure(task.run_id, task.shard_id, holder=holder, worker=worker.name,
                                                   seen=view.raw, failures=d.failures, streak=d.streak,
                                                   exclusion=d.exclusion, final=d.final, summary=summary, why=d.why)
        out = {**base, "status": ShardStatus.ERROR, "error": d.error, "excluded": d.exclusion is not None}
        if outcome == Outcome.FAILED:
            return out | {"final": True, "settled": value}
        if outcome == Outcome.RETRY:
            return out | {"final": False, "dispatches": value}
        # another copy has the shard, or the run ended: nothing of this copy counts
        return {**base, "status": ShardStatus.SKIPPED, "reason": f"its failure was not recorded ({value})"}

    refusal = None
    try:  # the message itself, first: every path resolved and checked against this worker's roots,
        # the backend it asks for, the range against the folder (a hostile message goes no further)
        job = _checked(task, worker)
        source = resources.source_for(job.dataset, ledger.digest_list)
        if task.stop > len(source):
            raise NasqError(f"images [{task.start}, {task.stop}) are past the {len(source)} images of "
                            f"{job.dataset.root}")
        source.check_unchanged(task.start, task.stop)
    except NasqError as e:
        log.warning("shard %s of run %s refused: %s", task.shard_id, task.run_id, e)
        refusal = str(e)
    n = task.stop - task.start
    claim, value = ledger.claim_shard(task.run_id, task.shard_id, holder=holder, lease_s=worker.settings.lease_s,
                                      info={"worker": worker.name, "host": host, "device": worker.device, "images": n},
                                      max_attempts=worker.settings.max_attempts)
    if claim == Outcome.EXHAUSTED:
        return failed(None, final=f"started {int(value) - 1} times without finishing (the workers that started it "
                                  f"died); giving up after max_attempts={worker.settings.max_attempts}")
    if claim == Outcome.REFUSED:
        why = "this worker is excluded from the run" if value == Outcome.EXCLUDED else "this worker failed the shard before"
        others = None if queue is None else _others(ledger, task, worker.name, queue)
        if others is not None and not others[0]:
            # nobody else may take it: it fails at once when the other live workers may not (excluded, or
            # they failed it), or once no other live worker was there for longer than a restart takes
            grace = 0.0 if others[1] else max(worker.settings.lease_s, 2 * worker.settings.worker_heartbeat_s)
            if time.time() - ledger.nobody_since(task.run_id, task.shard_id) >= grace:
                log.warning("shard %s of run %s: %s, and no other live worker may take it: it fails", task.shard_id,
                            task.run_id, why)
                return failed(None)
        return {**base, "status": ShardStatus.REFUSED, "reason": why}
    if claim != Outcome.OK:  # a late delivery (or one of no run): nothing was evaluated, so nothing is dropped either
        if refusal:
            return {**base, "status": ShardStatus.ERROR, "error": refusal, "final": True}
        why = {Outcome.ENDED: f"the run is {value}", Outcome.HAS_RESULT: "the shard already has its result",
               Outcome.GONE: "the run's record is gone"}[Outcome(claim)]
        log.info("shard %s of run %s skipped: %s", task.shard_id, task.run_id, why)
        return {**base, "status": ShardStatus.SKIPPED, "reason": why}
    if refusal:
        return failed(refusal)
    _, streak = value
    with _lease(ledger, task, holder, worker.settings.lease_s) as lease:
        ticker = _Ticker(ledger, task, holder, worker.settings.lease_s, lease)
        try:
            labels = resources.labels_for(job.labels, job.labels_sha256)
            backend = resources.backend_for(worker.backend, job.model, job.batch_size, options)
            load_s = resources.last_load_s  # 0 when the model was already loaded
            if getattr(backend, "read_mbps", None):  # a SIMULATED shared file system's share of this host
                from ..data.hostcache import ReadThrottle

                source.throttle = ReadThrottle(source.root, backend.read_mbps)
            writer = OutputWriter(job.output.dir, job.output.fmt) if job.output else None
            latencies: list[float] = []
            result = evaluate_range(source, backend, task.start, task.stop, batch_size=job.batch_size,
                                    labels=labels, writer=writer, loader_threads=worker.decode_threads,
                                    latencies=latencies, on_batch=ticker)
        except ShardStopped as e:
            ledger.commit_shard(task.run_id, task.shard_id, holder=holder, status=ShardStatus.STOPPED, summary={})
            log.warning("shard %s of run %s stopped on %s: %s", task.shard_id, task.run_id, worker.name,
                        _STOP_TEXT.get(e.why, e.why))
            return {**base, "status": ShardStatus.STOPPED, "reason": _STOP_TEXT.get(e.why, e.why)}
        except Exception as e:  # noqa: BLE001 - recorded, then reported by the task
            log.exception("shard %s of run %s failed", task.shard_id, task.run_id)
            return failed(f"{type(e).__name__}: {e}")
        out = {**base, "status": ShardStatus.OK, **result, "versions": backend.versions(), "model_info": backend.model_info,
               **backend.identity(), "latency_ms": latencies, "load_s": load_s, "environment": host_environment()}
        labelled = [(lab, ids) for lab, ids in zip(result["labels"], result["top5"]) if lab is not None]
        summary = {"status": ShardStatus.OK, "worker": worker.name, "host": host, "device": worker.device,
                   "images": len(result["indices"]),
                   "errors": len(result["errors"]), **result["timing"], "labelled": len(labelled),
                   "top1_correct": sum(1 for lab, ids in labelled if ids[:1] == [lab]),
                   "from_cache": result["data"]["images_from_cache"], "from_source": result["data"]["images_from_source"],
                   "batch_s": batch_buckets(latencies)}
        outcome, why = ledger.commit_shard(task.run_id, task.shard_id, holder=holder, status=ShardStatus.OK, summary=summary,
                                           result=out, worker=worker.name, reset_streak=streak > 0)
    out["kept"] = outcome == Outcome.ACCEPTED
    if out["kept"]:
        out["kept_of"] = why  # (results kept, shards of the run, shards finished)
    wall = summary["wall_s"]
    if out["kept"]:
        log.info("%s of run %s: %d images (%d unusable) in %.1f s, %.1f img/s on %s", task.shard_id, task.run_id,
                 summary["images"], summary["errors"], wall, summary["images"] / wall if wall else 0.0, worker.device)
    else:
        log.warning("%s of run %s: this copy's result was dropped (%s): the shard's result was already kept, or the "
                    "run had ended; counted in duplicate_shard_results_dropped", task.shard_id, task.run_id, why)
    return out


def _checked(task: ShardTask, worker: WorkerConfig):
    """The shard's job with its paths resolved within this worker's roots, for this worker's backend.

    Raises:
        NasqError: a path outside the roots, or a run of another backend.
    """
    job = task.job.within(worker.roots)
    if worker.backend != job.backend:
        raise NasqError(f"this worker runs backend {worker.backend!r} but the run asked for "
                        f"{job.backend!r}; start a worker with --backend {job.backend} on the run's queue")
    return job


def _others(ledger: ShardBookkeeper, task: ShardTask, me: str, queue: str) -> tuple[bool, bool]:
    """(whether a live worker of ``queue`` besides ``me`` may take the shard: not excluded from
    the run, has not failed the shard; whether there is another live worker at all). When none
    may, ``ledger.nobody_since`` starts counting; when one may again, it stops."""
    view = ledger.failure_view(task.run_id, task.shard_id, me)
    refused_by = set(failover.failed_on(view.failures, kind="device"))
    others = ledger.live_consumers(queue) - {me}
    ok = any(w not in view.excluded and w not in refused_by for w in others)
    if ok:
        ledger.nobody_since(task.run_id, task.shard_id, clear=True)
    return ok, bool(others)


class _Ticker:
    """``evaluate_range``'s ``on_batch``: progress to the ledger at most every ``TICK_S`` (and at
    once when the lease keeper saw the lease taken), raising ``ShardStopped`` when told to stop.
    A tick due less than half a ``TICK_S`` before the shard ends, at its pace so far, is left
    to the commit (a second of device work is a shard of 176 images on a 310P3)."""

    def __init__(self, ledger: ShardBookkeeper, task: ShardTask, holder: str, lease_s: float, lease: dict):
        self.ledger, self.task, self.holder, self.lease_s, self.lease = ledger, task, holder, lease_s, lease
        self.started = self.last = time.monotonic()

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if self.lease["lost"]:
            pass  # at once: the lease keeper saw it taken
        elif now - self.last < TICK_S:
            return
        elif done and (self.task.stop - self.task.start - done) * (now - self.started) / done < TICK_S / 2:
            return  # the commit comes sooner than the next tick would
        self.last = now
        verdict, why = self.ledger.shard_tick(self.task.run_id, self.task.shard_id, holder=self.holder, done=done,
                                              lease_s=self.lease_s)
        if verdict == Outcome.OK:
            self.lease["renewed"] = time.monotonic()  # the tick extended the lease
        if verdict == Outcome.STOP:
            raise ShardStopped(why or Outcome.SUPERSEDED.value)


@contextmanager
def _lease(ledger: ShardBookkeeper, task: ShardTask, holder: str, ttl_s: float):
    """Keep the shard's lease (taken by ``claim_shard``) while the body runs, renewed about every
    ttl_s / 3 by a thread (the device work keeps the main thread busy). A worker that dies stops
    renewing it; a renewal that finds the lease taken marks it lost, and the body's next
    progress tick stops the copy. ``commit_shard`` drops it. A progress tick extends the lease
    too, so the thread asks only when no tick came for ttl_s / 3 (a long batch)."""
    state = {"lost": False, "renewed": time.monotonic()}

    def renew():
        if time.monotonic() - state["renewed"] < ttl_s / 3 * 0.9:
            return
        state["renewed"] = time.monotonic()
        if not ledger.renew_lease(task.run_id, task.shard_id, holder, ttl_s):
            state["lost"] = True

    with every(ttl_s / 6, renew, what=f"the lease of {task.shard_id}"):  # a renewal at most ttl/2 apart
        yield state
