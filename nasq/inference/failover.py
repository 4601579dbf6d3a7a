"""A shard that fails on a device runs elsewhere; a device that keeps failing is excluded from
the run. The model is Spark's ``spark.excludeOnFailure.*`` with ``spark.task.maxFailures``: a
task is retried on other executors, and an executor that keeps failing is excluded and shown.

The rules (settings ``shard_max_devices`` and ``device_max_failures``; a device is a worker,
one process pinned to one device):

* a copy of a shard that fails on a worker (a backend or device error, its input refused there,
  anything but an unreadable image, which is an excluded image of the run) is sent again for
  another worker, unless it has now failed on ``shard_max_devices`` distinct workers, or no
  other live worker of the run's queue may take it (one that is not excluded from the run and
  has not failed that shard): then it fails for good, naming each worker it failed on and why;
* a worker that fails ``device_max_failures`` shards of a run in a row (no success between
  them) is excluded from the run, unless no other live worker of the queue is: it takes none of
  the run's shards any more, they go back to the queue untouched. ``nasq resume`` lifts a run's
  exclusions. The last live worker is never excluded: the shards it fails fail for good, the
  rest are evaluated;
* a worker that may not take a shard (excluded, or it failed that shard) puts it back; when no
  other live worker may take it for longer than ``grace`` (workers restarting), the shard fails
  for good with that sentence, so exclusion never leaves a run waiting silently on a queue
  nobody may serve. A worker that a shard was lost on (its lease expired) may take it again.

``decide`` is the decision, from what the run store holds (``FailureView``) and the live
workers of the queue; the store writes it atomically, only if nothing changed meanwhile.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

#: how long a worker holds a shard it may not take before putting it back: a worker excluded
#: from a run would otherwise take the run's shards off the queue and put them back as fast as
#: the broker answers while the other workers are busy
REFUSE_PAUSE_S = 1.0


@dataclass(frozen=True)
class FailureView:
    """What the run store holds about a shard's failures and its run's exclusions."""

    #: the shard's failure list as stored ("" for none): the compare and set of the write
    raw: str
    #: each failed copy: worker, host, device, error, at, kind ("device" or "lost")
    failures: list[dict]
    #: worker -> exclusion record, for the workers excluded from the run now
    excluded: dict[str, dict]
    #: the worker's failures in a row in this run
    streak: int


@dataclass(frozen=True)
class Decision:
    """What happens to a shard after a failure, and to the worker it failed on."""

    failures: list[dict]
    #: the worker's failures in a row now (None: the decision is not about a failure of its own)
    streak: int | None
    #: the worker's exclusion record, when this failure excludes it
    exclusion: dict | None
    #: the shard fails for good (else it is sent again for another worker)
    final: bool
    #: the sentence: this copy's failure and what follows from it
    error: str
    #: why the shard is sent again (``nasq status``'s "dispatched again" line)
    why: str


def who(entry: dict) -> str:
    """A worker as the sentences name it: ``name (host/device)``."""
    where = f"{entry.get('host')}/{entry.get('device')}" if entry.get("host") else entry.get("device")
    return f"{entry.get('worker')} ({where})" if where else str(entry.get("worker"))


def failed_on(failures: list[dict], *, kind: str | None = None) -> list[str]:
    """The distinct workers a shard failed on (``kind``: only failures of that kind: "device",
    or "lost" when the worker went away), in order."""
    return list(dict.fromkeys(f.get("worker") for f in failures
                              if f.get("worker") and (kind is None or f.get("kind", "device") == kind)))


def decide(view: FailureView, *, worker: dict, error: str | None, live: set[str], queue: str | None,
           shard_max_devices: int, device_max_failures: int, final: str | None = None) -> Decision:
    """The decision after ``worker`` (its name, host and device) failed a shard with ``error``,
    or (``error`` None) found that it may not take the shard (excluded, or it failed the shard
    before) and no other may either: ``live`` are the names of the live workers of the run's
    queue. ``final``: the shard fails for good with this sentence, and the worker is not blamed
    (the shard killed the workers that started it ``max_attempts`` times).

    A worker is excluded only while another live worker of the queue is not: the last one keeps
    taking the run's shards (those it fails then fail for good, the rest are evaluated). A
    worker that a shard was lost on (it went away) may take it again."""
    me = worker["name"]
    if final is not None:
        return Decision(view.failures, None, None, True, final, "")
    entry = None if error is None else {"worker": me, "host": worker.get("host"), "device": worker.get("device"),
                                        "error": error, "at": time.time(), "kind": "device"}
    failures = view.failures + ([entry] if entry else [])
    streak = view.streak + 1 if entry else None
    others = sorted(live - {me})
    serving = [w for w in others if w not in view.excluded]
    excluded_now = bool(entry) and me not in view.excluded and streak >= device_max_failures and bool(serving)
    barred = set(view.excluded) | ({me} if excluded_now or me in view.excluded else set())
    refused_by = set(failed_on(failures, kind="device"))
    candidates = [w for w in others if w not in barred and w not in refused_by]
    tried = failed_on(failures)
    exclusion = None
    tail = ""
    if excluded_now:
        exclusion = {"worker": me, "host": worker.get("host"), "device": worker.get("device"), "at": time.time(),
                     "reason": error, "shards_failed": streak, "queue": queue}
        tail = f"; {who(entry)} is now EXCLUDED from the run ({streak} failed shards in a row)"
    elif entry and streak >= device_max_failures and me not in view.excluded:
        tail = (f" ({streak} failed shards in a row; not excluded: it is the last live worker of "
                f"{'queue ' + queue if queue else 'the queue'} that is not)")
    if entry and len(tried) >= shard_max_devices:
        text = f"failed on {len(tried)} workers (shard_max_devices={shard_max_devices}): " + "; ".join(
            f"{who(f)}: {f.get('error')}" for f in _last_per_worker(failures))
        return Decision(failures, streak, exclusion, True, text + tail, "")
    if not candidates:
        where = f"queue {queue}" if queue else "the run's queue"
        if not others:
            nobody = f"no other live worker consumes {where}"
        else:
            held = [f"{w} ({'excluded from the run' if w in barred else 'failed it already'})"
                    for w in others if w in barred or w in refused_by]
            nobody = f"no other live worker of {where} may take it: {', '.join(held)}"
        if entry:
            text = f"{who(entry)}: {error}{tail}; {nobody}"
        else:
            held_me = "is excluded from the run" if me in view.excluded else "failed it already"
            text = f"{who(worker | {'worker': me})} {held_me} and {nobody}"
            if view.failures:
                text += " (it failed on " + "; ".join(f"{who(f)}: {f.get('error')}"
                                                      for f in _last_per_worker(view.failures)) + ")"
            text += ("; `nasq resume` lifts the run's exclusions" if me in view.excluded else "")
        return Decision(failures, streak, exclusion, True, text, "")
    text = (f"{who(entry)}: {error}; sent again for another worker (failed on {len(tried)} of at most "
            f"{shard_max_devices})" + tail)
    return Decision(failures, streak, exclusion, False, text, f"it failed on {who(entry)}: {error}"[:300])


def _last_per_worker(failures: list[dict]) -> list[dict]:
    """Each worker's last failure of the shard, in the order the workers first failed it."""
    last = {f.get("worker"): f for f in failures}
    return [last[w] for w in failed_on(failures)]
