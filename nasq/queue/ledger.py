"""The shard ledger in Redis: each copy of a shard claims, reports progress and commits through
one atomic script (``scripts.py``), under a lease its worker renews; lost shards are claimed by
one re-dispatcher; the kept results, failures, drops and progress of every shard."""
from __future__ import annotations

import json
import time

import redis

from ..inference.failover import FailureView
from ..rundata import RunManifest
from ..runstate import ACCEPTS_RESULTS, ENDED, MAY_START, Outcome, Redispatch, RunState, ShardStatus
from .redis_store import EXPIRING, StorePart, run_keys, _rides_out_full, _states
from .scripts import KEPT


def lease_progress(value: bytes | None) -> int:
    """The images a running copy reported in its lease (``holder|done``; 0 before its first tick)."""
    if not value or value == KEPT.encode():
        return 0
    _, sep, done = value.rpartition(b"|")
    return int(done) if sep and done.isdigit() else 0


class ShardLedger(StorePart):
    """``nasq:run:<id>:{attempts,running,lease:<shard>,results,finished,dropped,redispatched,
    redispatched_at,merge_sent:<n>}``. A lease's value is its holder, with the images its copy
    has done once it reported progress (``holder|done``), or ``KEPT`` once the shard's result is
    kept. A shard's worker reads two things besides (``inference.shard.ShardBookkeeper``): the
    live workers of its queue and the run's digest list, from the store's other parts."""

    def __init__(self, conn, *, runs, registry):
        super().__init__(conn)
        self._runs, self._registry = runs, registry

    def live_consumers(self, queue: str) -> set[str]:
        return self._registry.live_consumers(queue)

    def digest_list(self, content: str) -> bytes | None:
        return self._runs.digest_list(content)

    @_rides_out_full
    def claim_shard(self, run_id: str, shard_id: str, *, holder: str, lease_s: float, info: dict,
                    max_attempts: int) -> tuple[str, object]:
        """A worker (``info["worker"]``) starts a shard (one round trip): counts the attempt,
        takes the lease, records it as running. Returns ("ok", (attempt, the worker's failures
        in a row in this run)), ("ended", state), ("has-result", None), ("exhausted", attempts),
        ("refused", "excluded" | "failed-here": the run holds it against this worker) or
        ("gone", None)."""
        k = run_keys(run_id)
        out = self._run("CLAIM", [k.state, k.attempts, k.running, k.lease(shard_id), k.barred],
                        [shard_id, holder, max(1, int(lease_s * 1000)), {**info, "holder": holder, "at": time.time()},
                         max_attempts, _states(MAY_START), KEPT, info["worker"]])
        if out[0] == Outcome.OK:
            return Outcome.OK, (int(out[1]), int(out[2]))
        return out[0], (out[1] if len(out) > 1 else None)

    def shard_tick(self, run_id: str, shard_id: str, *, holder: str, done: int, lease_s: float) -> tuple[str, str | None]:
        """Progress of a running shard (which extends the holder's lease), and whether it should
        stop: ("ok", None) or ("stop", why). Progress is advisory: on a full broker it is skipped,
        not waited for, and ("full", None) says that the lease was not extended either."""
        try:
            out = self._run("TICK", [run_keys(run_id).state, run_keys(run_id).lease(shard_id)],
                            [holder, int(done), max(1, int(lease_s * 1000)), _states(ACCEPTS_RESULTS), KEPT])
        except redis.exceptions.OutOfMemoryError:
            return Outcome.FULL, None
        return out[0], (out[1] if len(out) > 1 else None)

    @_rides_out_full
    def commit_shard(self, run_id: str, shard_id: str, *, holder: str, status: str, summary: dict,
                     result: dict | None = None, worker: str = "", reset_streak: bool = False) -> tuple[str, object]:
        """A copy of a shard ends (one round trip): "ok" (``result`` kept if it is the shard's
        first; ``reset_streak``: ``worker``'s run of failures in this run ends) or "stopped"
        (given up). A failure goes through ``record_failure``. Returns ("accepted", (results
        kept, shards of the run, shards finished: kept or failed for good)) or ("dropped", why)."""
        k = run_keys(run_id)
        out = self._run("COMMIT", [k.state, k.results, k.finished, k.running, k.dropped, k.lease(shard_id), k.attempts,
                                   k.barred],
                        [shard_id, holder, status, json.dumps(result) if result is not None else "", summary,
                         self.expires, _states(ACCEPTS_RESULTS), str(RunState.CANCELLED), _states(ENDED), KEPT,
                         worker, "1" if reset_streak else "0"])
        if out[0] == Outcome.ACCEPTED:
            return Outcome.ACCEPTED, (int(out[1]), int(out[2]), int(out[3]))
        return out[0], (out[1] if len(out) > 1 else None)

    def failure_view(self, run_id: str, shard_id: str, worker: str) -> FailureView:
        """What a decision about a failed shard reads (one round trip): the shard's failures so
        far (as stored, for the compare and set of ``record_failure``), the run's excluded
        workers and ``worker``'s failures in a row."""
        with self.r.pipeline(transaction=False) as p:
            p.hget(run_keys(run_id).failures, shard_id)
            p.hgetall(run_keys(run_id).excluded)
            p.hkeys(run_keys(run_id).barred)
            p.hget(run_keys(run_id).barred, f"{worker}#streak")
            raw, excluded, barred, streak = p.execute()
        raw = raw.decode() if raw else ""
        barred = {k.decode() for k in barred}
        return FailureView(raw=raw, failures=json.loads(raw) if raw else [],
                           excluded={k.decode(): json.loads(v) for k, v in excluded.items() if k.decode() in barred},
                           streak=int(streak or 0))

    @_rides_out_full
    def record_failure(self, run_id: str, shard_id: str, *, holder: str, worker: str, seen: str,
                       failures: list[dict], streak: int | None, exclusion: dict | None, final: bool,
                       summary: dict, why: str) -> tuple[str, object]:
        """Record a shard's failure as decided from ``failure_view`` (``seen``: the failure list
        it read; ``failures``: the list with this failure added; ``streak``: the worker's
        failures in a row now, None when the failure is not the worker's own; ``exclusion``: the
        record that excludes the worker from the run). ``final``: the shard fails for good with
        ``summary``; else it is taken for dispatching again elsewhere (``why``).
        Returns ("failed", (finished, shards, running)), ("retry", dispatch count now),
        ("changed", None): another failure came first (read again and decide again), or
        ("dropped", why)."""
        k = run_keys(run_id)
        out = self._run("FAIL", [k.state, k.results, k.finished, k.running, k.lease(shard_id), k.failures, k.barred,
                                 k.excluded, k.redispatched, k.redispatched_at, k.redispatched_why, k.dropped,
                                 k.attempts],
                        [shard_id, holder, worker, seen, json.dumps(failures), "" if streak is None else str(streak),
                         json.dumps(exclusion) if exclusion else "", "1" if final else "0", summary,
                         _states(ACCEPTS_RESULTS), time.time(), why, self.expires])
        if out[0] == Outcome.FAILED:
            return Outcome.FAILED, (int(out[1]), int(out[2]), int(out[3]))
        if out[0] == Outcome.RETRY:
            return Outcome.RETRY, int(out[1])
        return out[0], (out[1] if len(out) > 1 else None)

    def keep_run(self, run_id: str) -> None:
        """Give the run's shard records their expiry again (healing does, while the run goes)."""
        with self.r.pipeline(transaction=False) as p:
            for key in run_keys(run_id).parts(*EXPIRING):
                p.expire(key, self.expires)
            p.execute()

    def renew_lease(self, run_id: str, shard_id: str, holder: str, ttl_s: float) -> bool:
        """Extend the lease if ``holder`` still has it (allowed while the broker is full)."""
        return bool(self._run("RENEW", [run_keys(run_id).lease(shard_id)], [holder, max(1, int(ttl_s * 1000))]))

    def lost_shards(self, run_id: str) -> list[str]:
        """Shards recorded as running whose lease expired: their worker is gone."""
        running = [k.decode() for k in self.r.hkeys(run_keys(run_id).running)]
        if not running:
            return []
        holders = self.r.mget([run_keys(run_id).lease(sid) for sid in running])  # one command
        return [sid for sid, h in zip(running, holders) if h is None]

    @_rides_out_full
    def claim_lost(self, run_id: str, shard_id: str, *, running: bool = True, why: str | None = None) -> int:
        """Take a lost shard off the running list: its dispatch count now (truthy) for the one
        caller that gets to re-dispatch it, else 0. ``running=False``: a shard lost before it
        was recorded as running (revoked in the queue): always taken. The dispatch is counted
        in the same atomic step."""
        return self._redispatch(run_id, shard_id, Redispatch.LOST if running else Redispatch.REVOKED,
                                why=why or ("its worker went away (the lease expired)" if running
                                            else "revoked in flight (a broker restart)"))

    def _redispatch(self, run_id: str, shard_id: str, how: str, seen: int = 0, *, why: str) -> int:
        k = run_keys(run_id)
        return int(self._run("REDISPATCH", [k.running, k.redispatched, k.redispatched_at, k.redispatched_why,
                                            k.failures, k.missing],
                             [shard_id, how, time.time(), self.expires, seen, why]))

    def redispatched_at(self, run_id: str) -> dict[str, float]:
        """When each re-dispatched shard was last sent again."""
        return {k.decode(): float(v) for k, v in self.r.hgetall(run_keys(run_id).redispatched_at).items()}

    def redispatched_why(self, run_id: str) -> dict[str, str]:
        """Why each re-dispatched shard was last sent again (healing, a failure, ``nasq resume``)."""
        return {k.decode(): v.decode() for k, v in self.r.hgetall(run_keys(run_id).redispatched_why).items()}

    @_rides_out_full
    def claim_stranded(self, run_id: str, shard_id: str, seen: int | None = None, *, why: str,
                       resume: bool = False) -> int:
        """The shard's dispatch count now (truthy) for the one caller that re-dispatches a shard
        whose message is stranded (not queued, not running, not finished): the one whose
        ``seen`` dispatch count of the shard (read now when None) is still the count; the count
        goes up in the same step (and, unless ``resume`` sends it, its count of missing
        messages: ``missing``). 0 for every other caller."""
        if seen is None:
            seen = int(self.r.hget(run_keys(run_id).redispatched, shard_id) or 0)
        return self._redispatch(run_id, shard_id, Redispatch.RESUME if resume else Redispatch.STRANDED, seen, why=why)

    def redispatched(self, run_id: str) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.r.hgetall(run_keys(run_id).redispatched).items()}

    @_rides_out_full
    def claim_merge(self, run_id: str, generation: int) -> bool:
        """True once per run and resume: for the component that sends the merge of a run whose
        chord cannot fire."""
        return bool(self.r.set(run_keys(run_id).merge_sent(generation), 1, nx=True, ex=self.expires))

    def shard_results(self, run_id: str) -> dict[str, dict]:
        """The kept result of each finished shard (the first copy's)."""
        return self._hash(run_keys(run_id).results)

    def result_ids(self, run_id: str) -> set[str]:
        """The shards that have their result (without reading the results)."""
        return {k.decode() for k in self.r.hkeys(run_keys(run_id).results)}

    def running(self, run_id: str) -> dict[str, dict]:
        return self._hash(run_keys(run_id).running)

    def finished(self, run_id: str) -> dict[str, dict]:
        return self._hash(run_keys(run_id).finished)

    def dropped(self, run_id: str) -> dict[str, int]:
        """Shard id -> copies dropped: late or duplicate results, and copies that gave up because
        another copy took over."""
        return {k.decode(): int(v) for k, v in self.r.hgetall(run_keys(run_id).dropped).items()}

    def last_accepted_at(self, run_id: str) -> float | None:
        """When the latest kept shard finished (its worker's clock), from the finished records."""
        return max((s["finished_at"] for s in self.finished(run_id).values()
                    if s.get("status") == ShardStatus.OK and isinstance(s.get("finished_at"), (int, float))), default=None)

    def shard_counts(self, run_id: str) -> tuple[int, int]:
        """(finished, running) shard counts, without reading the records."""
        with self.r.pipeline(transaction=False) as p:  # reads: no MULTI (refused while Redis is full)
            p.hlen(run_keys(run_id).finished)
            p.hlen(run_keys(run_id).running)
            finished, running = p.execute()
        return int(finished), int(running)

    def results_count(self, run_id: str) -> int:
        return int(self.r.hlen(run_keys(run_id).results))

    @_rides_out_full
    def heal_turn(self, every_s: float) -> bool:
        """True for one caller per ``every_s`` across the deployment: the live workers take
        turns at healing instead of all of them doing it on every heartbeat."""
        return bool(self.r.set("nasq:heal:turn", 1, nx=True, px=max(1, int(every_s * 1000))))

    def images_done(self, run_id: str, manifest: RunManifest | None = None, *, accepted_only: bool = False) -> int:
        """Images of the shards whose result was kept (their size in the run's manifest, read when
        not given), plus (unless ``accepted_only``) the progress the copies running now reported
        in their leases; never a failed or lost copy's."""
        manifest = manifest or self._runs.manifest(run_id)
        sizes = manifest.shard_sizes() if manifest else {}
        with self.r.pipeline(transaction=False) as p:  # reads: no MULTI (refused while Redis is full)
            p.hkeys(run_keys(run_id).results)
            p.hkeys(run_keys(run_id).running)
            kept, running = ({k.decode() for k in keys} for keys in p.execute())
        total = sum(sizes.get(sid, 0) for sid in kept)
        running = sorted(running - kept)
        if accepted_only or not running:
            return total
        return total + sum(lease_progress(v) for v in self.r.mget([run_keys(run_id).lease(sid) for sid in running]))

    def failures(self, run_id: str) -> dict[str, list[dict]]:
        """Shard id -> the failures of its copies (each: worker, host, device, error, at, kind),
        for the shards that failed somewhere, whether they then ran elsewhere or not."""
        return self._hash(run_keys(run_id).failures)

    def nobody_since(self, run_id: str, shard_id: str, *, clear: bool = False) -> float:
        """Since when no live worker but excluded ones (or ones that failed it) may take the
        shard: the first call's time, kept until ``clear``."""
        key, field = run_keys(run_id).barred, f"nobody|{shard_id}"
        if clear:
            self.r.hdel(key, field)
            return 0.0
        self.r.hsetnx(key, field, time.time())
        return float(self.r.hget(key, field) or time.time())

    def lift_exclusions(self, run_id: str) -> None:
        """What ``nasq resume`` does to a run's exclusions: the workers take its shards again (the
        record of each exclusion stays, marked lifted)."""
        self.r.delete(run_keys(run_id).barred)

    def missing(self, run_id: str) -> dict[str, int]:
        """Shard id -> how often its message was found missing and sent again by healing."""
        return {k.decode(): int(v) for k, v in self.r.hgetall(run_keys(run_id).missing).items()}

    def exclusions(self, run_id: str) -> dict[str, dict]:
        """Worker -> the record of its exclusion from the run (when, why, the shards it failed),
        with ``lifted``: True once a ``nasq resume`` lifted it (the worker takes the run's shards
        again)."""
        with self.r.pipeline(transaction=False) as p:
            p.hgetall(run_keys(run_id).excluded)
            p.hkeys(run_keys(run_id).barred)
            records, barred = p.execute()
        barred = {k.decode() for k in barred}
        return {k.decode(): {**json.loads(v), "lifted": k.decode() not in barred} for k, v in records.items()}

    def attempts(self, run_id: str) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.r.hgetall(run_keys(run_id).attempts).items()}
