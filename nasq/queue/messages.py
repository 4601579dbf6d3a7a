"""Every message nasq sends, made here: a run's shards, its merge and its run-failed errback, a
build's chain and a sweep's points. Task names, queues, task ids and the ``argsrepr`` Flower
shows are decided in this module; the session (first submission), the healer (shards sent
again, stranded merges, failed runs) and the waiting client (a merge whose worker went away)
say only what to send and when."""
from __future__ import annotations

from celery import chain, group

from ..rundata import RunManifest
from ..wire import (BUILD_QUEUE, TASK_BUILD_COMMIT, TASK_BUILD_DEVICE, TASK_BUILD_EXPORT, TASK_BUILD_FAILED,
                    TASK_BUILD_SIMPLIFY, TASK_EVAL_SHARD, TASK_MERGE, TASK_RUN_FAILED, TASK_SWEEP_POINT, ShardTask,
                    SweepPoint, merge_task_id, shard_task_id, sweep_point_task_id, worker_queue)


def shard(app, task: ShardTask, queue: str, dispatch: int = 0, *, why: str | None = None):
    """One shard's task: its ``dispatch``-th copy sent again has a task id of its own (Flower
    keeps every attempt); ``why`` says in Flower why it was sent again. ``ignore_result``: its
    result is in the run's ledger and its chord part in the chord's own set; Celery's copy of it
    would be read by nobody."""
    argsrepr = task.argsrepr if why is None else f"{task.argsrepr} (attempt {dispatch + 1}: {why})"[:1000]
    return app.signature(TASK_EVAL_SHARD, args=task.args(), queue=queue, argsrepr=argsrepr,
                         task_id=shard_task_id(task.run_id, task.shard_id, dispatch), ignore_result=True)


def merge(app, run_id: str, queue: str, *, about: str, task_id: str | None = None, alone: bool = True):
    """The merge of a run. ``alone``: sent by itself, it fetches every shard's stored result
    (the chord's body instead gets the results from the chord). ``task_id``: the chord body's
    or a resume's (``merge_task_id``); None for a new one. ``about`` completes its argsrepr."""
    return app.signature(TASK_MERGE, args=([],) if alone else (), kwargs={"run_id": run_id}, queue=queue,
                         task_id=task_id, argsrepr=f"run={run_id} {about}")


def run_failed(app, run_id: str, queue: str, *, errback: bool = False):
    """The task that fails a run with a partial report: the merge's errback (``errback``:
    Celery passes it the failed request, the exception and the traceback) or sent by itself
    when every shard has ended without a merge (then those three are None: workers of earlier
    releases take them by position)."""
    return app.signature(TASK_RUN_FAILED, args=() if errback else (None, None, None), kwargs={"run_id": run_id},
                         queue=queue)


def run_chord_parts(app, manifest: RunManifest, tasks: list[ShardTask], *, merge_id: str | None = None,
                    dispatches: dict[str, int] | None = None):
    """(header, body) of a run's chord: a group of ``tasks`` (``dispatches``: shard id -> its
    dispatch count, for shards sent again by a resume) and the merge, whose errback fails the
    run."""
    run_id, queue = manifest.run_id, manifest.queue
    body = merge(app, run_id, queue, about=f"shards={len(manifest.shards)}",
                 task_id=merge_id or merge_task_id(run_id), alone=False)
    body.link_error(run_failed(app, run_id, queue, errback=True))
    header = group(shard(app, t, queue, (dispatches or {}).get(t.shard_id, 0)) for t in tasks)
    return header, body


def build_chain(app, spec):
    """A build on the build queue: export -> simplify -> commit for ONNX, device -> commit for
    a device artifact; an errback cleans up after a failed step."""
    def step(name, *args):
        return app.signature(name, args=args, queue=BUILD_QUEUE)

    if spec.target == "onnx":
        c = chain(step(TASK_BUILD_EXPORT, spec.to_dict()), step(TASK_BUILD_SIMPLIFY), step(TASK_BUILD_COMMIT))
    else:
        c = chain(step(TASK_BUILD_DEVICE, spec.to_dict()), step(TASK_BUILD_COMMIT))
    c.link_error(app.signature(TASK_BUILD_FAILED, kwargs={"spec": spec.to_dict()}, queue=BUILD_QUEUE))
    return c


def sweep_group(app, points: list[SweepPoint]):
    """A sweep: each point on the queue of the one worker it measures; a point measured again (a
    resumed sweep) keeps its task id."""
    return group(app.signature(TASK_SWEEP_POINT, args=(p.to_payload(),), queue=worker_queue(p.worker),
                               task_id=sweep_point_task_id(p.sweep_id, p.point_id), argsrepr=p.argsrepr)
                 for p in points)
