"""Everything nasq keeps in Redis, and the only place its key names are spelled: run records
(manifest, state, per-shard progress and attempts, report, predictions), the worker
registry, and the build lock, status and export counter.

Everything a watcher needs lives under ``nasq:run:<id>:*`` so any machine with the broker
URL can follow a run; keys expire with the results (``result_expires``). Whatever changes a
run's state or a shard's outcome is one atomic script (``scripts.py``) checked against the
run's state machine (``nasq.runstate``).

A full broker (Redis at ``maxmemory`` with ``noeviction``) refuses writes: a store made to ride
it out (workers) waits, saying so once a minute; a client's store raises ``BrokerFull``, which
names the limit.
"""
from __future__ import annotations

import functools
import json
import logging
import time

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import LockError
from redis.lock import Lock
from redis.retry import Retry

from ..errors import NasqError
from ..keepalive import every
from ..runstate import ACCEPTS_RESULTS, ENDED, MAY_START, TRANSITIONS, RunState, names
from . import scripts

log = logging.getLogger("nasq.store")

PREFIX = "nasq:run:"
RUNS = "nasq:runs"
ACTIVE = "nasq:runs:active"
WORKERS = "nasq:workers"
BUILD = "nasq:build:"
BUILD_LOCK_TTL_S = 300


class BrokerFull(NasqError):
    """The broker refused a write: Redis reached ``maxmemory`` (policy ``noeviction``)."""


def full_message(r) -> str:
    """What to tell a user about a full broker, with its numbers when INFO is allowed."""
    try:
        info = r.info("memory")
        used, limit = info.get("used_memory", 0), info.get("maxmemory", 0)
        numbers = f" ({used / 2**20:.1f} MiB used, maxmemory {limit / 2**20:.1f} MiB, " \
                  f"policy {info.get('maxmemory_policy', '?')})"
    except redis.exceptions.RedisError:
        numbers = ""
    return (f"the broker is full: Redis reached maxmemory{numbers} and refuses writes. Free memory (expired runs, "
            "`redis-cli --bigkeys`) or raise maxmemory (CONFIG SET maxmemory ...); running shards wait and the run "
            "goes on by itself (or `nasq resume RUN`)")


def is_full(r) -> bool:
    """Redis is at its maxmemory, as INFO tells: within 1 % of it, where the next writes are
    refused (Redis hovers just below the limit once it refuses them)."""
    try:
        info = r.info("memory")
    except redis.exceptions.RedisError:
        return False
    limit = info.get("maxmemory", 0)
    return bool(limit) and info.get("used_memory", 0) >= 0.99 * limit and info.get("maxmemory_policy") == "noeviction"


def _rides_out_full(method):
    """A write of the run store: on a full broker, wait (a worker's store) or raise ``BrokerFull``."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        waited, pause = 0.0, 0.5
        while True:
            try:
                return method(self, *args, **kwargs)
            except redis.exceptions.OutOfMemoryError:
                if not self.wait_when_full:
                    raise BrokerFull(full_message(self.r)) from None
                if waited == 0.0 or waited // 60 != (waited + pause) // 60:
                    log.warning("%s; waiting to %s", full_message(self.r), method.__name__.replace("_", " "))
                time.sleep(pause)
                waited += pause
                pause = min(5.0, pause * 2)
    return call


def _states(states) -> str:
    return ",".join(names(states))


class BuildLock(Lock):
    """redis-py's ``Lock`` owned by a build request's token instead of a thread (the steps of
    one build run as separate tasks, maybe in other processes), plus what it lacks: the same
    request taking it again (a redelivered step) and a keeper that extends it while a long
    step runs. Its expiry frees the key when the worker building it dies."""

    def __init__(self, r, key: str, token: str, ttl: int = BUILD_LOCK_TTL_S):
        super().__init__(r, f"{BUILD}lock:{key}", timeout=ttl, thread_local=False)
        self.token = token
        self.local.token = token.encode()

    def take(self) -> bool:
        """Take the lock, or keep it if this request already holds it."""
        return self.acquire(blocking=False, token=self.token) or self.renew()

    def renew(self) -> bool:
        try:
            return self.reacquire()
        except LockError:
            return False

    def holder(self) -> str | None:
        v = self.redis.get(self.name)
        return v.decode() if v else None

    def free(self) -> None:
        try:
            self.release()
        except LockError:  # expired or taken over: nothing of ours to free
            pass
        self.local.token = self.token.encode()

    def kept(self):
        """``with lock.kept():`` renews the lock every ttl/3 while the body runs."""
        return every(self.timeout / 3, self.renew, what=f"the build lock {self.name}")


class RunStore:
    """Run records, the shard ledger, the worker registry and build bookkeeping in Redis.

    ``outage_s``: how long a call rides out a broker that went away (a restart) before it
    raises; workers ride it out, a waiting client prefers to hear of it at once (0). A store
    that rides out outages also waits while the broker is full (``BrokerFull`` otherwise).
    """

    def __init__(self, url: str, *, expires: int = 7 * 24 * 3600, outage_s: float = 0.0, connect_timeout_s: float = 5.0,
                 socket_timeout_s: float | None = 30.0, health_check_s: float = 10.0, wait_when_full: bool | None = None):
        retry = Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=max(0, int(outage_s / 2.0) + 3)) \
            if outage_s else Retry(NoBackoff(), retries=1)
        self.r = redis.Redis.from_url(url, retry=retry, socket_connect_timeout=connect_timeout_s,
                                      socket_timeout=socket_timeout_s, health_check_interval=health_check_s,
                                      retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError])
        self.expires = expires
        self.wait_when_full = bool(outage_s) if wait_when_full is None else wait_when_full
        self._scripts = {name: self.r.register_script(getattr(scripts, name))
                         for name in ("CLAIM", "TICK", "COMMIT", "TRANSITION", "RENEW", "DROP")}

    @classmethod
    def for_settings(cls, settings, *, ride_out: bool = False, wait_when_full: bool | None = None) -> RunStore:
        """The store of ``settings``' result backend, with its timeouts; ``ride_out``: calls wait
        out a broker restart or a full broker (workers) instead of failing at once (clients)."""
        return cls(settings.backend_url, expires=settings.result_expires,
                   outage_s=settings.broker_outage_s if ride_out else 0.0,
                   connect_timeout_s=settings.broker_connect_timeout_s,
                   socket_timeout_s=settings.broker_socket_timeout_s, health_check_s=settings.broker_health_check_s,
                   wait_when_full=wait_when_full)

    def _k(self, run_id: str, part: str = "manifest") -> str:
        return f"{PREFIX}{run_id}:{part}"

    def _set(self, key: str, value) -> None:
        self.r.set(key, json.dumps(value), ex=self.expires)

    def _get(self, key: str):
        raw = self.r.get(key)
        return None if raw is None else json.loads(raw)

    def _hash(self, run_id: str, part: str) -> dict[str, dict]:
        return {k.decode(): json.loads(v) for k, v in self.r.hgetall(self._k(run_id, part)).items()}

    def _run(self, script: str, keys: list[str], args: list):
        """Run one of ``scripts``: a table reply comes back as a list of str/int, an integer as is."""
        out = self._scripts[script](keys=keys, args=[a if isinstance(a, (str, bytes)) else json.dumps(a)
                                                     if isinstance(a, (dict, list)) else str(a) for a in args])
        if not isinstance(out, list):
            return out
        return [x.decode() if isinstance(x, bytes) else x for x in out]

    def is_full(self) -> bool:
        return is_full(self.r)

    def full_message(self) -> str:
        return full_message(self.r)

    # manifest and state -----------------------------------------------------------
    @_rides_out_full
    def save_manifest(self, manifest: dict, sealed: str | None = None) -> None:
        """A new run: its manifest (and, with message signing on, the manifest signed by the
        submitting client), state ``submitted``."""
        run_id = manifest["run_id"]
        with self.r.pipeline() as p:
            p.set(self._k(run_id), json.dumps(manifest), ex=self.expires)
            if sealed is not None:
                p.set(self._k(run_id, "sealed"), sealed, ex=self.expires)
            p.zadd(RUNS, {run_id: manifest.get("created", time.time())})
            p.set(self._k(run_id, "state"), json.dumps({"state": str(RunState.SUBMITTED), "at": time.time(),
                                                        "shards": len(manifest["shards"])}), ex=self.expires)
            p.sadd(ACTIVE, run_id)
            p.execute()

    def manifest(self, run_id: str) -> dict | None:
        """The manifest as stored (see ``nasq.queue.trust`` for one that must be signed)."""
        return self._get(self._k(run_id))

    def sealed_manifest(self, run_id: str) -> str | None:
        v = self.r.get(self._k(run_id, "sealed"))
        return v.decode() if v else None

    def has_run(self, run_id: str) -> bool:
        return bool(self.r.exists(self._k(run_id)))

    def broker_warnings(self) -> list[str]:
        """What this Redis lacks for runs to survive it (read with CONFIG GET; managed Redis
        services that forbid it are not second-guessed)."""
        try:
            conf = {k: v for part in ("appendonly", "appendfsync", "maxmemory-policy")
                    for k, v in self.r.config_get(part).items()}
        except redis.exceptions.ResponseError:
            return []
        out = []
        if conf.get("appendonly") != "yes":
            out.append("the broker runs without appendonly: a Redis restart loses queued shards and run records "
                       "(redis-server --appendonly yes --appendfsync always)")
        elif conf.get("appendfsync") not in (None, "always"):
            out.append(f"the broker's appendfsync is {conf['appendfsync']}: a Redis crash can lose the last writes "
                       "(a finished shard, a queued message); such a run then needs `nasq resume` "
                       "(appendfsync always keeps them)")
        if conf.get("maxmemory-policy") not in (None, "noeviction"):
            out.append(f"the broker's maxmemory-policy is {conf['maxmemory-policy']}: Redis may evict run records "
                       "and results (set it to noeviction)")
        return out

    def state(self, run_id: str) -> dict | None:
        return self._get(self._k(run_id, "state"))

    def state_name(self, run_id: str) -> str | None:
        return (self.state(run_id) or {}).get("state")

    def active_runs(self) -> list[str]:
        """Runs submitted or running: the ones whose shards a healthy component watches."""
        return sorted(x.decode() for x in self.r.smembers(ACTIVE))

    def run_ids(self, limit: int = 50) -> list[str]:
        return [x.decode() for x in self.r.zrevrange(RUNS, 0, limit - 1)]

    # transitions ------------------------------------------------------------------
    @_rides_out_full
    def transition(self, run_id: str, name: str, *, report: dict | None = None, predictions: dict | None = None,
                   clear_running: bool = False, merge_id: str | None = None, forget: tuple[str, ...] = (),
                   **fields) -> tuple[bool, str | None]:
        """Move the run along ``nasq.runstate.TRANSITIONS[name]`` if its state allows it, writing
        ``report``/``predictions`` with it; returns (done, the state the run was in)."""
        sources, target = TRANSITIONS[name]
        record = {"state": str(target), "at": time.time(), **fields}
        out = self._run("TRANSITION",
                        [self._k(run_id, p) for p in ("state",)] + [ACTIVE] +
                        [self._k(run_id, p) for p in ("report", "predictions", "running", "attempts", "shard_done",
                                                      "finished", "merges")],
                        [_states(sources), record, str(target), run_id, self.expires,
                         json.dumps(report) if report is not None else "",
                         json.dumps(predictions) if predictions is not None else "",
                         "1" if clear_running else "0", merge_id or "", _states(ENDED), *forget])
        return out[0] == "ok", (str(target) if out[0] == "ok" else out[1] if len(out) > 1 else None)

    @_rides_out_full
    def next_resume(self, run_id: str) -> int:
        key = self._k(run_id, "resumes")
        n = int(self.r.incr(key))
        self.r.expire(key, self.expires)
        return n

    def resumes(self, run_id: str) -> int:
        return int(self.r.get(self._k(run_id, "resumes")) or 0)

    def merge_ids(self, run_id: str) -> list[str]:
        """The task ids of the run's merges: the chord's and one per resume."""
        return sorted(x.decode() for x in self.r.smembers(self._k(run_id, "merges")))

    @_rides_out_full
    def add_merge_id(self, run_id: str, task_id: str) -> None:
        self.r.sadd(self._k(run_id, "merges"), task_id)
        self.r.expire(self._k(run_id, "merges"), self.expires)

    # shards -----------------------------------------------------------------------
    @_rides_out_full
    def claim_shard(self, run_id: str, shard_id: str, *, holder: str, lease_s: float, info: dict,
                    max_attempts: int) -> tuple[str, object]:
        """A worker starts a shard (one round trip): counts the attempt, takes the lease, records
        it as running. Returns ("ok", attempt), ("ended", state), ("has-result", None),
        ("exhausted", attempts) or ("gone", None)."""
        out = self._run("CLAIM", [self._k(run_id, p) for p in ("state", "attempts", "running", f"lease:{shard_id}",
                                                               "results", "shard_done")],
                        [shard_id, holder, max(1, int(lease_s * 1000)), {**info, "holder": holder, "at": time.time()},
                         max_attempts, self.expires, _states(MAY_START)])
        return out[0], (out[1] if len(out) > 1 else None)

    def shard_tick(self, run_id: str, shard_id: str, *, holder: str, done: int, lease_s: float) -> tuple[str, str | None]:
        """Progress of a running shard, and whether it should stop: ("ok", None) or ("stop",
        why). Progress is advisory: on a full broker it is skipped, not waited for."""
        try:
            out = self._run("TICK", [self._k(run_id, p) for p in ("state", f"lease:{shard_id}", "shard_done", "results")],
                            [shard_id, holder, done, max(1, int(lease_s * 1000)), _states(ACCEPTS_RESULTS)])
        except redis.exceptions.OutOfMemoryError:
            return "ok", None
        return out[0], (out[1] if len(out) > 1 else None)

    @_rides_out_full
    def commit_shard(self, run_id: str, shard_id: str, *, holder: str, status: str, summary: dict,
                     result: dict | None = None, images: int = 0) -> tuple[str, object]:
        """A copy of a shard ends (one round trip): "ok" (``result`` kept if it is the shard's
        first), "error" (a failure) or "stopped" (given up). Returns ("accepted", results kept),
        ("failed", None) or ("dropped", why)."""
        out = self._run("COMMIT", [self._k(run_id, p) for p in ("state", "results", "finished", "running", "dropped",
                                                                f"lease:{shard_id}", "shard_done", "last_ok")],
                        [shard_id, holder, status, json.dumps(result) if result is not None else "", summary,
                         images, self.expires, _states(ACCEPTS_RESULTS), time.time(),
                         str(RunState.CANCELLED), _states(ENDED)])
        return out[0], (out[1] if len(out) > 1 else None)

    def renew_lease(self, run_id: str, shard_id: str, holder: str, ttl_s: float) -> bool:
        """Extend the lease if ``holder`` still has it (allowed while the broker is full)."""
        return bool(self._run("RENEW", [self._k(run_id, f"lease:{shard_id}")], [holder, max(1, int(ttl_s * 1000))]))

    def lost_shards(self, run_id: str) -> list[str]:
        """Shards recorded as running whose lease expired: their worker is gone."""
        running = list(self.running(run_id))
        if not running:
            return []
        with self.r.pipeline(transaction=False) as p:  # reads: no MULTI (refused while Redis is full)
            for sid in running:
                p.exists(self._k(run_id, f"lease:{sid}"))
            alive = p.execute()
        return [sid for sid, a in zip(running, alive) if not a]

    @_rides_out_full
    def claim_lost(self, run_id: str, shard_id: str, *, running: bool = True) -> bool:
        """Take a lost shard off the running list; True for the one caller that gets to re-dispatch
        it. ``running=False``: a shard lost before it was recorded as running (revoked in the queue)."""
        if not self.r.hdel(self._k(run_id, "running"), shard_id) and running:
            return False
        count, at = self._k(run_id, "redispatched"), self._k(run_id, "redispatched_at")
        with self.r.pipeline() as p:
            p.hincrby(count, shard_id, 1)
            p.hset(at, shard_id, time.time())
            p.hset(self._k(run_id, "shard_done"), shard_id, 0)  # the lost copy's images do not count
            p.expire(count, self.expires)
            p.expire(at, self.expires)
            p.execute()
        return True

    def redispatched_at(self, run_id: str) -> dict[str, float]:
        """When each re-dispatched shard was last sent again."""
        return {k.decode(): float(v) for k, v in self.r.hgetall(self._k(run_id, "redispatched_at")).items()}

    @_rides_out_full
    def claim_stranded(self, run_id: str, shard_id: str) -> bool:
        """True for the one caller that re-dispatches a shard whose message is stranded (not
        queued, not running, not finished): one claim per generation of the shard."""
        gen = int(self.r.hget(self._k(run_id, "redispatched"), shard_id) or 0)
        if not self.r.set(self._k(run_id, f"claim:{shard_id}:{gen}"), 1, nx=True, ex=self.expires):
            return False
        return self.claim_lost(run_id, shard_id, running=False)

    def redispatched(self, run_id: str) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.r.hgetall(self._k(run_id, "redispatched")).items()}

    @_rides_out_full
    def claim_merge(self, run_id: str) -> bool:
        """True once per run and resume: for the component that sends the merge of a run whose
        chord cannot fire."""
        return bool(self.r.set(self._k(run_id, f"merge_sent:{self.resumes(run_id)}"), 1, nx=True, ex=self.expires))

    def shard_results(self, run_id: str) -> dict[str, dict]:
        """The kept result of each finished shard (the first copy's)."""
        return self._hash(run_id, "results")

    def result_ids(self, run_id: str) -> set[str]:
        """The shards that have their result (without reading the results)."""
        return {k.decode() for k in self.r.hkeys(self._k(run_id, "results"))}

    def running(self, run_id: str) -> dict[str, dict]:
        return self._hash(run_id, "running")

    def finished(self, run_id: str) -> dict[str, dict]:
        return self._hash(run_id, "finished")

    def dropped(self, run_id: str) -> dict[str, int]:
        """Shard id -> copies dropped: late or duplicate results, and copies that gave up because
        another copy took over."""
        return {k.decode(): int(v) for k, v in self.r.hgetall(self._k(run_id, "dropped")).items()}

    def last_accepted_at(self, run_id: str) -> float | None:
        v = self.r.get(self._k(run_id, "last_ok"))
        return float(v) if v else None

    def shard_counts(self, run_id: str) -> tuple[int, int]:
        """(finished, running) shard counts, without reading the records."""
        with self.r.pipeline(transaction=False) as p:  # reads: no MULTI (refused while Redis is full)
            p.hlen(self._k(run_id, "finished"))
            p.hlen(self._k(run_id, "running"))
            finished, running = p.execute()
        return int(finished), int(running)

    def results_count(self, run_id: str) -> int:
        return int(self.r.hlen(self._k(run_id, "results")))

    @_rides_out_full
    def heal_turn(self, every_s: float) -> bool:
        """True for one caller per ``every_s`` across the deployment: the live workers take
        turns at healing instead of all of them doing it on every heartbeat."""
        return bool(self.r.set("nasq:heal:turn", 1, nx=True, px=max(1, int(every_s * 1000))))

    def images_done(self, run_id: str) -> int:
        return sum(int(v) for v in self.r.hvals(self._k(run_id, "shard_done")))

    def attempts(self, run_id: str) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.r.hgetall(self._k(run_id, "attempts")).items()}

    def mark_published(self, run_id: str) -> None:
        """The ended run's report files are in place and its history row written (or noted as not)."""
        try:
            self.r.set(self._k(run_id, "published"), 1, ex=self.expires)
        except redis.exceptions.OutOfMemoryError:
            log.warning("run %s: could not mark its report as published (the broker is full)", run_id)

    def published(self, run_id: str) -> bool:
        return bool(self.r.exists(self._k(run_id, "published")))

    # notes: what the merging worker could not do after the report was final --------------
    def add_note(self, run_id: str, what: str, text: str) -> None:
        try:
            self.r.hset(self._k(run_id, "notes"), what, text)
            self.r.expire(self._k(run_id, "notes"), self.expires)
        except redis.exceptions.OutOfMemoryError:
            log.warning("run %s: %s (could not record it: the broker is full)", run_id, text)

    def notes(self, run_id: str) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.r.hgetall(self._k(run_id, "notes")).items()}

    # workers ------------------------------------------------------------------------
    @_rides_out_full
    def register_worker(self, name: str, info: dict) -> None:
        self.r.hset(WORKERS, name, json.dumps({**info, "last_seen": time.time()}))

    @_rides_out_full
    def touch_worker(self, name: str, **fields) -> bool:
        """Update a registered worker; False when it is not registered (a broker that lost its data)."""
        raw = self.r.hget(WORKERS, name)
        if raw is None:
            return False
        info = json.loads(raw)
        info.update(fields, last_seen=time.time())
        self.r.hset(WORKERS, name, json.dumps(info))
        return True

    def unregister_worker(self, name: str) -> None:
        self.r.hdel(WORKERS, name)

    def workers(self, *, alive_within: float = 30.0) -> dict[str, dict]:
        """Registered workers; ``alive`` is False when no heartbeat came for ``alive_within`` s."""
        now = time.time()
        out = {}
        for k, v in self.r.hgetall(WORKERS).items():
            info = json.loads(v)
            info["alive"] = now - info.get("last_seen", 0) < alive_within
            out[k.decode()] = info
        return out

    # results ------------------------------------------------------------------------
    def report(self, run_id: str) -> dict | None:
        return self._get(self._k(run_id, "report"))

    def predictions(self, run_id: str) -> dict | None:
        return self._get(self._k(run_id, "predictions"))

    @_rides_out_full
    def save_report_of_ended(self, run_id: str, report: dict, predictions: dict | None) -> None:
        """The partial report of a run that already ended (a cancelled one, written after the
        cancel took effect)."""
        self._set(self._k(run_id, "report"), report)
        if predictions is not None:
            self._set(self._k(run_id, "predictions"), predictions)

    # builds -------------------------------------------------------------------------
    def build_lock(self, key: str, token: str) -> BuildLock:
        return BuildLock(self.r, key, token)

    def set_build_status(self, key: str, text: str) -> None:
        self.r.set(f"{BUILD}status:{key}", text, ex=3600)

    def build_status(self, key: str) -> str | None:
        v = self.r.get(f"{BUILD}status:{key}")
        return v.decode() if v else None

    def count_export(self, key: str) -> None:
        """Exports started for ``key``: concurrent requests for one artifact export it once."""
        name = f"{BUILD}exports:{key}"
        self.r.incr(name)
        self.r.expire(name, self.expires)

    def exports(self, key: str) -> int:
        return int(self.r.get(f"{BUILD}exports:{key}") or 0)
