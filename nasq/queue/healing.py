"""Runs heal themselves: a shard whose lease expired (its machine is gone) is dispatched again
(each copy under a task id of its own, ``wire.shard_task_id``), a shard whose message is
nowhere is sent again (naming why it is missing), and a run whose chord can no longer fire (a
re-dispatched shard is not part of it, or a full broker refused its bookkeeping) is merged anyway.

No daemon does this: whichever healthy component looks first does it, and the run store makes
sure only one of them does (``claim_lost``, ``claim_stranded``, ``claim_merge``): the waiting
client (every poll), every live worker (on its heartbeat, taking turns) and the worker that
finishes a shard. With message signing on, only runs whose manifest is signed are touched
(``trust.py``).
"""
from __future__ import annotations

import logging
import time

from ..runstate import ENDED, RESENT, RunState, ShardStatus, Transition, Unfinished, may
from ..rundata import RunManifest
from ..wire import ShardTask, merge_task_id, shard_of_task
from . import messages
from ..results.ending import refuse_if_final
from .store import BrokerFull, RunStore
from .transport import BrokerView
from .trust import ManifestTrust, UntrustedRecord

log = logging.getLogger("nasq.heal")


#: how long a run whose client has not said "all shards sent" (state submitted) is left to its
#: client before its missing messages count as lost (a client killed mid-submission)
SUBMIT_GRACE_S = 60.0


#: how often one healer gives a running run's records their expiry again (shard scripts do not)
KEEP_EVERY_S = 60.0


class Healer:
    """Healing for one process: its Celery app (to send), the run store, a view of the broker's
    queues and the trust rule. ``lease_s``: a shard silent this long is lost; ``max_attempts``:
    how often a shard's message may go missing before the shard fails."""

    def __init__(self, app, store: RunStore, broker: BrokerView, *, lease_s: float, max_attempts: int,
                 trust: ManifestTrust | None = None, report_dir: str | None = None):
        self.app, self.store, self.broker = app, store, broker
        self.lease_s, self.max_attempts, self.report_dir = lease_s, max_attempts, report_dir
        self.trust = trust or ManifestTrust(app)
        self._kept: dict[str, float] = {}  # run -> when its records were last given their expiry

    @classmethod
    def for_settings(cls, app, store: RunStore, settings) -> Healer:
        return cls(app, store, BrokerView.for_app(app, settings, share=store), lease_s=settings.lease_s,
                   max_attempts=settings.max_attempts, report_dir=settings.report_dir)

    def manifest(self, run_id: str) -> RunManifest | None:
        """The run's manifest if it may be acted on (None: no such run, or refused)."""
        try:
            return self.trust.manifest(self.store, run_id)
        except UntrustedRecord:
            return None

    def heal(self, run_id: str) -> list[str]:
        """Dispatch again the shards of ``run_id`` that are lost; returns their ids. Cheap when
        nothing is lost (no manifest is read): every live worker calls it on its heartbeat.

        Raises:
            BrokerFull: the broker is at maxmemory: nothing can be sent (or judged lost) now.
        """
        self._not_full()
        return self._heal(run_id)

    def _not_full(self) -> None:
        if self.store.is_full():
            raise BrokerFull(self.store.full_message())

    def _heal(self, run_id: str) -> list[str]:
        st = self.store.runs.state(run_id) or {}
        if st.get("state") in (None, *ENDED):
            self._kept.pop(run_id, None)
            return []
        if self.report_dir and refuse_if_final(self.store, run_id, self.report_dir) is not None:
            return []  # write once: its report is published; its records in Redis were changed (restored now)
        lost = self.store.ledger.lost_shards(run_id)
        manifest = None
        if lost or self.store.ledger.redispatched(run_id):
            manifest = self.manifest(run_id)
            if manifest is None:
                return []
            taken = {sid: n for sid in lost if (n := self.store.ledger.claim_lost(run_id, sid))}
            self.redispatch(manifest, taken, why="lease expired: its worker stopped renewing it")
            lost = list(taken)
        out = lost + self._stranded(run_id, st, manifest)
        self.merge_if_stranded(run_id, manifest)
        if time.time() - self._kept.get(run_id, 0.0) >= KEEP_EVERY_S:
            self._kept[run_id] = time.time()
            self.store.ledger.keep_run(run_id)
        return out

    def _stranded(self, run_id: str, st: dict, manifest: RunManifest | None) -> list[str]:
        """Shards neither finished nor running whose message is nowhere to be taken: the queue is
        empty, and the message is missing (lost with the broker, or discarded by a worker) or was
        delivered to a worker that never started it more than a lease ago. Checked only once the
        queue has drained, so it costs nothing while the fleet is busy. A run whose every shard
        ended, some of them failed for good, is failed (``settle``)."""
        n = st.get("shards")
        if not n:
            return []
        finished, running = self.store.ledger.shard_counts(run_id)
        if finished + running >= n:
            if finished >= n and not running and self.store.ledger.results_count(run_id) < n:
                self.settle(run_id, manifest)
            return []
        if st.get("state") == RunState.SUBMITTED and time.time() - st.get("at", 0) < max(SUBMIT_GRACE_S, self.lease_s):
            return []  # its client may still be sending the shards: one not sent yet is not lost
        manifest = manifest or self.manifest(run_id)
        if manifest is None or self.broker.queued(manifest.queue):
            return []
        counts = self.store.ledger.redispatched(run_id)  # first: a shard another healer sends after this read is
        # either in `recent` below or refused by the count's compare-and-set
        finished, running, unacked = (self.store.ledger.finished(run_id), self.store.ledger.running(run_id),
                                      self.unacked_shards(run_id))
        recent = {sid for sid, t in self.store.ledger.redispatched_at(run_id).items() if time.time() - t < self.lease_s}
        busy = set(finished) | set(running) | recent
        stuck = [s.shard_id for s in manifest.shards if s.shard_id not in busy
                 and unacked.get(s.shard_id, self.lease_s + 1) > self.lease_s]
        if not stuck:
            return []
        restarted = manifest.broker_id and self.broker.server_id() not in (None, manifest.broker_id)
        why = ("the broker restarted since the run was submitted and lost its message" if restarted else
               "its message is in no queue although the broker did not restart: a worker discarded it (its log says "
               "why: e.g. an unsigned or malformed message) or a full broker could not keep it")
        missing = self.store.ledger.missing(run_id)
        given_up = [sid for sid in stuck if missing.get(sid, 0) >= self.max_attempts]
        if given_up:
            self._give_up(run_id, given_up, why)
        taken = {sid: c for sid in stuck if sid not in given_up
                 and (c := self.store.ledger.claim_stranded(run_id, sid, counts.get(sid, 0), why=why))}
        self.redispatch(manifest, taken, why=why)
        return list(taken)

    def unacked_shards(self, run_id: str) -> dict[str, float]:
        """Shard id -> seconds since the latest delivery of any copy of it that a worker holds
        and has not acknowledged."""
        out: dict[str, float] = {}
        for tid, age in self.broker.unacked_ages().items():
            of = shard_of_task(tid)
            if of and of[0] == run_id:
                out[of[1]] = min(age, out.get(of[1], age))
        return out

    def _give_up(self, run_id: str, shard_ids: list[str], why: str) -> None:
        """Shards whose message went missing ``max_attempts`` times fail (a worker keeps
        discarding them), so the run fails naming them instead of sending them forever."""
        for sid in shard_ids:
            self.store.ledger.record_failure(run_id, sid, holder="healing", worker="healing",
                                      seen=self.store.ledger.failure_view(run_id, sid, "healing").raw,
                                      failures=self.store.ledger.failures(run_id).get(sid, []), streak=None, exclusion=None,
                                      final=True, why="", summary={
                                          "status": ShardStatus.ERROR, "worker": "healing",
                                          "error": f"its message went missing {self.max_attempts} times ({why})"})
        log.warning("run %s: %s failed: %s, %d times", run_id, ", ".join(shard_ids), why, self.max_attempts)
        self.settle(run_id)

    def settle(self, run_id: str, manifest: RunManifest | None = None) -> bool:
        """A run whose every shard ended, some for good without a result: have a worker fail it
        (``nasq.run_failed``; once per run and resume). The chord's errback does it too, but a
        shard sent again (after a failure, a lost worker or message) is no part of the chord."""
        st = self.store.runs.state(run_id) or {}
        if not may(Transition.FAIL, st.get("state")):
            return False
        manifest = manifest or self.manifest(run_id)
        if manifest is None or not self.store.ledger.claim_merge(run_id, f"fail-{self.store.runs.resumes(run_id)}"):
            return False
        messages.run_failed(self.app, run_id, manifest.queue).apply_async()
        log.info("run %s: every shard has ended, some without a result; the run is failed", run_id)
        return True

    def redispatch(self, manifest: RunManifest, dispatches: dict[str, int], *, why: str) -> None:
        """Send the shards again, each under the task id of its dispatch count (``dispatches``:
        shard id -> the count its claim returned; claimed first by the caller)."""
        if not dispatches:
            return
        tasks = {t.shard_id: t for t in manifest.tasks()}
        for sid, n in dispatches.items():
            self.resend(tasks[sid], manifest.queue, n, why=why)
        log.warning("run %s: %d shard(s) dispatched again (%s): %s", manifest.run_id, len(dispatches), why,
                    ", ".join(dispatches))

    def resend(self, task: ShardTask, queue: str, dispatch: int, *, why: str) -> None:
        """Send one shard again on ``queue``, as its ``dispatch``-th copy sent again."""
        messages.shard(self.app, task, queue, dispatch, why=why).apply_async()

    def merge_if_stranded(self, run_id: str, manifest: RunManifest | None = None, *,
                          kept_of: tuple[int, int] | None = None) -> bool:
        """Send the merge of a run whose every shard has its result while its chord cannot fire:
        a re-dispatched shard is not part of the chord, and a full broker may have refused the
        chord's own count (then a lease after the last result). The merge keeps the chord body's
        task id; a merge that runs twice changes nothing (the run is done after the first).
        ``kept_of``: (results kept, shards) as the commit of a shard just said (nothing is read
        while results are missing)."""
        if kept_of and kept_of[0] < kept_of[1]:
            return False
        st = self.store.runs.state(run_id) or {}
        if not may(Transition.MERGE, st.get("state")):
            return False
        shards = st.get("shards") or (len(manifest.shards) if manifest else None)
        if not shards or self.store.ledger.results_count(run_id) < shards:
            return False  # cheap: the manifest is read (and its signature checked) only when all is in
        manifest = manifest or self.manifest(run_id)
        if manifest is None or self.store.ledger.results_count(run_id) < len(manifest.shards):
            return False
        last = self.store.ledger.last_accepted_at(run_id) or time.time()
        if not self.store.ledger.redispatched(run_id) and time.time() - last < self.lease_s:
            return False  # the chord fires by itself
        generation = self.store.runs.resumes(run_id)  # one merge per resume of the run
        if not self.store.ledger.claim_merge(run_id, generation):
            return False
        messages.merge(self.app, run_id, manifest.queue, task_id=merge_task_id(run_id, generation),
                       about="(every shard has its result; its chord cannot fire)").apply_async()
        log.info("run %s: every shard has its result but the chord cannot fire; merge sent", run_id)
        return True

    def resumable(self, manifest: RunManifest, seen: dict[str, int] | None = None) -> dict[str, Unfinished]:
        """What each unfinished shard of a run is doing, as ``nasq resume`` sees it: "failed" (its
        last copy failed), "lost" (recorded as running, its lease expired), "running" (on a live
        worker), "queued" (a message of it waits in the queue, was delivered less than a lease ago,
        or was just sent again) or "missing" (its message is nowhere: lost with a broker, or
        discarded). Shards that have their result are not listed. ``seen``, when given, receives
        the shards' dispatch counts as read first (``claim_for_resume`` claims against them)."""
        run_id = manifest.run_id
        if seen is not None:
            seen.update(self.store.ledger.redispatched(run_id))  # first: see _stranded
        results, finished, running = self.store.ledger.result_ids(run_id), self.store.ledger.finished(run_id), self.store.ledger.running(run_id)
        lost = set(self.store.ledger.lost_shards(run_id))
        queued = {of[1] for tid in self.broker.queued_task_ids(manifest.queue)
                  if (of := shard_of_task(tid)) and of[0] == run_id}
        unacked = self.unacked_shards(run_id)
        recent = {sid for sid, t in self.store.ledger.redispatched_at(run_id).items() if time.time() - t < self.lease_s}
        out = {}
        for sid in manifest.shard_ids:
            if sid in results:
                continue
            if sid in running:
                out[sid] = Unfinished.LOST if sid in lost else Unfinished.RUNNING
            elif sid in queued or unacked.get(sid, self.lease_s + 1) <= self.lease_s or sid in recent:
                out[sid] = Unfinished.QUEUED
            elif finished.get(sid, {}).get("status") == ShardStatus.ERROR:
                out[sid] = Unfinished.FAILED
            else:
                out[sid] = Unfinished.MISSING
        return out

    def claim_for_resume(self, run_id: str, plan: dict[str, Unfinished], seen: dict[str, int] | None = None) -> dict[str, int]:
        """The shards of ``plan`` (``resumable``) that ``nasq resume`` sends again: the failed, lost
        and missing ones, each claimed first so that a concurrent resume, or healing, sends it once:
        against the dispatch counts ``resumable`` read first (``seen``), or read now. Returns shard
        id -> its dispatch count now."""
        def claim(sid: str, why: Unfinished) -> int:
            if why == Unfinished.LOST:
                return self.store.ledger.claim_lost(run_id, sid, why="nasq resume (its worker went away)")
            return self.store.ledger.claim_stranded(run_id, sid, None if seen is None else seen.get(sid, 0),
                                             why=f"nasq resume (it was {why})", resume=True)

        return {sid: n for sid, why in plan.items() if why in RESENT and (n := claim(sid, why))}

    def heal_active(self) -> None:
        """``heal`` every active run (a worker's heartbeat)."""
        self._not_full()
        for run_id in self.store.runs.active_runs():
            self._heal(run_id)
