"""Runs heal themselves: a shard whose lease expired (its machine is gone) is dispatched again
under the same task id, and a run whose chord can no longer fire (one of its original messages
died with its worker) is merged anyway.

No daemon does this: whichever healthy component looks first does it, and the run store makes
sure only one of them does (``claim_lost``, ``claim_merge``): the waiting client (every poll),
every live worker (on its heartbeat) and the worker that finishes a shard.
"""
from __future__ import annotations

import logging
import time

from .app import TASK_EVAL_SHARD, TASK_MERGE
from .messages import shard_tasks
from .store import ENDED, RunStore

log = logging.getLogger("nasq.heal")


def heal(app, store: RunStore, run_id: str, *, lease_s: float) -> list[str]:
    """Dispatch again the shards of ``run_id`` whose lease expired; returns their ids. Cheap when
    nothing is lost (no manifest is read): every live worker calls it on its heartbeat."""
    if (store.state(run_id) or {}).get("state") in (None, *ENDED):
        return []
    lost = [sid for sid in store.lost_shards(run_id) if store.claim_lost(run_id, sid)]
    manifest = None
    if lost or store.redispatched(run_id):
        manifest = store.manifest(run_id)
        if manifest is not None:
            redispatch(app, manifest, lost, why="lease expired")
            merge_if_stranded(app, store, run_id, manifest)
    return lost + _stranded(app, store, run_id, manifest, lease_s)


def _stranded(app, store: RunStore, run_id: str, manifest: dict | None, lease_s: float) -> list[str]:
    """Shards neither finished nor running whose message is nowhere to be taken: the queue is
    empty, and the message is missing (lost with the broker) or was delivered to a worker that
    never started it (its connection broke) more than a lease ago. Checked only once the
    queue has drained, so it costs nothing while the fleet is busy."""
    n = (store.state(run_id) or {}).get("shards")
    if not n or sum(store.shard_counts(run_id)) >= n:
        return []
    manifest = manifest or store.manifest(run_id)
    if manifest is None or store.queued(manifest["queue"]):
        return []
    finished, running, unacked = store.finished(run_id), store.running(run_id), store.unacked_ages()
    recent = {sid for sid, t in store.redispatched_at(run_id).items() if time.time() - t < lease_s}
    busy = set(finished) | set(running) | recent
    stuck = [s["shard_id"] for s in manifest["shards"] if s["shard_id"] not in busy
             and unacked.get(s["task_id"], lease_s + 1) > lease_s]
    stuck = [sid for sid in stuck if store.claim_stranded(run_id, sid)]
    redispatch(app, manifest, stuck, why="message stranded (broker restart)")
    return stuck


def redispatch(app, manifest: dict, shard_ids: list[str], *, why: str) -> None:
    """Send the shards again, under their own task ids (claimed first by the caller)."""
    if not shard_ids:
        return
    tasks = {t.shard_id: t for t in shard_tasks(manifest)}
    for sid in shard_ids:
        t = tasks[sid]
        app.signature(TASK_EVAL_SHARD, args=t.args(), queue=manifest["queue"], task_id=f"{manifest['run_id']}:{sid}",
                      argsrepr=f"{t.argsrepr} (dispatched again: {why})").apply_async()
    log.warning("run %s: %d shard(s) dispatched again (%s): %s", manifest["run_id"], len(shard_ids), why,
                ", ".join(shard_ids))


def merge_if_stranded(app, store: RunStore, run_id: str, manifest: dict | None = None) -> bool:
    """Send the merge of a run whose every shard finished while the chord cannot fire (a
    re-dispatched shard is not part of it). The merge keeps the chord body's task id; a merge
    that runs twice gives the same report."""
    if not store.redispatched(run_id):
        return False
    manifest = manifest or store.manifest(run_id)
    if manifest is None or store.shard_counts(run_id)[0] < len(manifest["shards"]):
        return False
    if not store.claim_merge(run_id):
        return False
    app.signature(TASK_MERGE, args=([],), kwargs={"run_id": run_id}, queue=manifest["queue"],
                  task_id=f"{run_id}:merge", argsrepr=f"run={run_id} (after re-dispatched shards)").apply_async()
    log.info("run %s: every shard finished after a re-dispatch; merge sent", run_id)
    return True


def heal_active(app, store: RunStore, *, lease_s: float) -> None:
    """``heal`` every active run (a worker's heartbeat)."""
    for run_id in store.active_runs():
        heal(app, store, run_id, lease_s=lease_s)
