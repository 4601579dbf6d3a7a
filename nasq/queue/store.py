"""Everything nasq keeps in Redis, and the only place its key names are spelled: run records
(manifest, state, per-shard progress and attempts, report, predictions), the worker
registry, and the build lock, status and export counter.

Everything a watcher needs lives under ``nasq:run:<id>:*`` so any machine with the broker
URL can follow a run; keys expire with the results (``result_expires``).
"""
from __future__ import annotations

import json
import time

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import LockError
from redis.lock import Lock
from redis.retry import Retry

from ..keepalive import every

PREFIX = "nasq:run:"
RUNS = "nasq:runs"
ACTIVE = "nasq:runs:active"
#: the states a run ends in
ENDED = ("done", "failed", "cancelled")
WORKERS = "nasq:workers"
BUILD = "nasq:build:"
BUILD_LOCK_TTL_S = 300


_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
_DROP = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


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
    """Run records, the worker registry and build bookkeeping in Redis.

    ``outage_s``: how long a call rides out a broker that went away (a restart) before it
    raises; workers ride it out, a waiting client prefers to hear of it at once (0).
    """

    def __init__(self, url: str, *, expires: int = 7 * 24 * 3600, outage_s: float = 0.0, connect_timeout_s: float = 5.0,
                 socket_timeout_s: float | None = 30.0, health_check_s: float = 10.0):
        retry = Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=max(0, int(outage_s / 2.0) + 3)) \
            if outage_s else Retry(NoBackoff(), retries=1)
        self.r = redis.Redis.from_url(url, retry=retry, socket_connect_timeout=connect_timeout_s,
                                      socket_timeout=socket_timeout_s, health_check_interval=health_check_s,
                                      retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError])
        self.expires = expires

    @classmethod
    def for_settings(cls, settings, *, ride_out: bool = False) -> RunStore:
        """The store of ``settings``' result backend, with its timeouts; ``ride_out``: calls wait
        out a broker restart (workers) instead of failing at once (clients)."""
        return cls(settings.backend_url, expires=settings.result_expires,
                   outage_s=settings.broker_outage_s if ride_out else 0.0,
                   connect_timeout_s=settings.broker_connect_timeout_s,
                   socket_timeout_s=settings.broker_socket_timeout_s, health_check_s=settings.broker_health_check_s)

    def _k(self, run_id: str, part: str = "manifest") -> str:
        return f"{PREFIX}{run_id}:{part}"

    def _set(self, key: str, value) -> None:
        self.r.set(key, json.dumps(value), ex=self.expires)

    def _get(self, key: str):
        raw = self.r.get(key)
        return None if raw is None else json.loads(raw)

    # manifest and state -----------------------------------------------------------
    def save_manifest(self, manifest: dict) -> None:
        run_id = manifest["run_id"]
        self._set(self._k(run_id), manifest)
        self.r.zadd(RUNS, {run_id: manifest.get("created", time.time())})
        self.set_state(run_id, "submitted")

    def manifest(self, run_id: str) -> dict | None:
        return self._get(self._k(run_id))

    def has_run(self, run_id: str) -> bool:
        return bool(self.r.exists(self._k(run_id)))

    def broker_warnings(self) -> list[str]:
        """What this Redis lacks for runs to survive it (read with CONFIG GET; managed Redis
        services that forbid it are not second-guessed)."""
        try:
            conf = {k: v for part in ("appendonly", "maxmemory-policy") for k, v in self.r.config_get(part).items()}
        except redis.exceptions.ResponseError:
            return []
        out = []
        if conf.get("appendonly") != "yes":
            out.append("the broker runs without appendonly: a Redis restart loses queued shards and run records "
                       "(redis-server --appendonly yes --appendfsync everysec)")
        if conf.get("maxmemory-policy") not in (None, "noeviction"):
            out.append(f"the broker's maxmemory-policy is {conf['maxmemory-policy']}: Redis may evict run records "
                       "and results (set it to noeviction)")
        return out

    def set_state(self, run_id: str, state: str, **fields) -> None:
        self._set(self._k(run_id, "state"), {"state": state, "at": time.time(), **fields})
        if state in ENDED:
            self.r.srem(ACTIVE, run_id)
        else:
            self.r.sadd(ACTIVE, run_id)

    def active_runs(self) -> list[str]:
        """Runs submitted or running: the ones whose shards a healthy component watches."""
        return sorted(x.decode() for x in self.r.smembers(ACTIVE))

    def state(self, run_id: str) -> dict | None:
        return self._get(self._k(run_id, "state"))

    def run_ids(self, limit: int = 50) -> list[str]:
        return [x.decode() for x in self.r.zrevrange(RUNS, 0, limit - 1)]

    # shards -----------------------------------------------------------------------
    def next_attempt(self, run_id: str, shard_id: str) -> int:
        key = self._k(run_id, "attempts")
        n = self.r.hincrby(key, shard_id, 1)
        self.r.expire(key, self.expires)
        return int(n)

    def shard_started(self, run_id: str, shard_id: str, info: dict) -> None:
        key = self._k(run_id, "running")
        self.r.hset(key, shard_id, json.dumps({**info, "at": time.time()}))
        self.r.expire(key, self.expires)

    def shard_progress(self, run_id: str, shard_id: str, done: int) -> None:
        key = self._k(run_id, "shard_done")
        self.r.hset(key, shard_id, done)
        self.r.expire(key, self.expires)

    def shard_finished(self, run_id: str, shard_id: str, summary: dict) -> None:
        with self.r.pipeline() as p:
            p.hdel(self._k(run_id, "running"), shard_id)
            p.hset(self._k(run_id, "finished"), shard_id, json.dumps(summary))
            p.expire(self._k(run_id, "finished"), self.expires)
            p.execute()

    # leases -------------------------------------------------------------------------
    def take_lease(self, run_id: str, shard_id: str, holder: str, ttl_s: float) -> None:
        """The shard runs under ``holder`` for ``ttl_s`` unless renewed (its worker's heartbeat)."""
        self.r.set(self._k(run_id, f"lease:{shard_id}"), holder, px=max(1, int(ttl_s * 1000)))

    def renew_lease(self, run_id: str, shard_id: str, holder: str, ttl_s: float) -> bool:
        """Extend the lease if ``holder`` still has it (a re-dispatched shard belongs to another)."""
        return bool(self.r.eval(_RENEW, 1, self._k(run_id, f"lease:{shard_id}"), holder, max(1, int(ttl_s * 1000))))

    def drop_lease(self, run_id: str, shard_id: str, holder: str) -> None:
        self.r.eval(_DROP, 1, self._k(run_id, f"lease:{shard_id}"), holder)

    def lost_shards(self, run_id: str) -> list[str]:
        """Shards recorded as running whose lease expired: their worker is gone."""
        running = list(self.running(run_id))
        if not running:
            return []
        with self.r.pipeline() as p:
            for sid in running:
                p.exists(self._k(run_id, f"lease:{sid}"))
            alive = p.execute()
        return [sid for sid, a in zip(running, alive) if not a]

    def claim_lost(self, run_id: str, shard_id: str, *, running: bool = True) -> bool:
        """Take a lost shard off the running list; True for the one caller that gets to re-dispatch
        it. ``running=False``: a shard lost before it was recorded as running (revoked in the queue)."""
        if not self.r.hdel(self._k(run_id, "running"), shard_id) and running:
            return False
        count, at = self._k(run_id, "redispatched"), self._k(run_id, "redispatched_at")
        with self.r.pipeline() as p:
            p.hincrby(count, shard_id, 1)
            p.hset(at, shard_id, time.time())
            p.expire(count, self.expires)
            p.expire(at, self.expires)
            p.execute()
        return True

    def redispatched_at(self, run_id: str) -> dict[str, float]:
        """When each re-dispatched shard was last sent again."""
        return {k.decode(): float(v) for k, v in self.r.hgetall(self._k(run_id, "redispatched_at")).items()}

    def claim_stranded(self, run_id: str, shard_id: str) -> bool:
        """True for the one caller that re-dispatches a shard whose message is stranded (see
        ``queued``/``unacked_ages``): one claim per generation of the shard."""
        gen = int(self.r.hget(self._k(run_id, "redispatched"), shard_id) or 0)
        if not self.r.set(self._k(run_id, f"claim:{shard_id}:{gen}"), 1, nx=True, ex=self.expires):
            return False
        return self.claim_lost(run_id, shard_id, running=False)

    # kombu's Redis transport: what is still queued, and what was delivered but never acked
    def queued(self, queue: str) -> int:
        """Messages waiting in ``queue`` (kombu keeps one list per priority step)."""
        with self.r.pipeline() as p:
            for name in (queue, *(f"{queue}\x06\x16{n}" for n in (3, 6, 9))):
                p.llen(name)
            return sum(p.execute())

    def unacked_ages(self) -> dict[str, float]:
        """Task id -> seconds since its latest delivery, for messages delivered to a worker and not
        acked (a lost worker's message stays there until the visibility timeout)."""
        now, out = time.time(), {}
        since = {k.decode(): t for k, t in self.r.zrange("unacked_index", 0, -1, withscores=True)}
        for tag, raw in self.r.hgetall("unacked").items():
            try:
                task_id = json.loads(raw)[0]["headers"]["id"]
            except (ValueError, KeyError, IndexError, TypeError):
                continue
            age = now - since.get(tag.decode(), now)
            out[task_id] = min(age, out.get(task_id, age))  # a re-dispatched shard shares its task id
        return out

    def redispatched(self, run_id: str) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.r.hgetall(self._k(run_id, "redispatched")).items()}

    def claim_merge(self, run_id: str) -> bool:
        """True once per run: for the component that sends the merge of a run the chord cannot finish."""
        return bool(self.r.set(self._k(run_id, "merge_sent"), 1, nx=True, ex=self.expires))

    def save_shard_result(self, run_id: str, shard_id: str, result: dict) -> None:
        """A finished shard's result (top-5 per image), kept by shard id: the merge reads it from
        here, whatever happened to the task that carried it (redelivered, re-dispatched, revoked)."""
        key = self._k(run_id, "results")
        self.r.hset(key, shard_id, json.dumps(result))
        self.r.expire(key, self.expires)

    def shard_results(self, run_id: str) -> dict[str, dict]:
        return {k.decode(): json.loads(v) for k, v in self.r.hgetall(self._k(run_id, "results")).items()}

    def running(self, run_id: str) -> dict[str, dict]:
        return {k.decode(): json.loads(v) for k, v in self.r.hgetall(self._k(run_id, "running")).items()}

    def finished(self, run_id: str) -> dict[str, dict]:
        return {k.decode(): json.loads(v) for k, v in self.r.hgetall(self._k(run_id, "finished")).items()}

    def shard_counts(self, run_id: str) -> tuple[int, int]:
        """(finished, running) shard counts, without reading the records."""
        with self.r.pipeline() as p:
            p.hlen(self._k(run_id, "finished"))
            p.hlen(self._k(run_id, "running"))
            finished, running = p.execute()
        return int(finished), int(running)

    def heal_turn(self, every_s: float) -> bool:
        """True for one caller per ``every_s`` across the deployment: the live workers take
        turns at healing instead of all of them doing it on every heartbeat."""
        return bool(self.r.set("nasq:heal:turn", 1, nx=True, px=max(1, int(every_s * 1000))))

    def images_done(self, run_id: str) -> int:
        return sum(int(v) for v in self.r.hvals(self._k(run_id, "shard_done")))

    def attempts(self, run_id: str) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.r.hgetall(self._k(run_id, "attempts")).items()}

    def reset_shards(self, run_id: str, shard_ids: list[str]) -> None:
        """Forget the attempts, progress and results of shards about to run again (``nasq resume``)."""
        if shard_ids:
            for part in ("attempts", "shard_done", "results"):
                self.r.hdel(self._k(run_id, part), *shard_ids)

    def next_resume(self, run_id: str) -> int:
        key = self._k(run_id, "resumes")
        n = int(self.r.incr(key))
        self.r.expire(key, self.expires)
        return n

    # workers ------------------------------------------------------------------------
    def register_worker(self, name: str, info: dict) -> None:
        self.r.hset(WORKERS, name, json.dumps({**info, "last_seen": time.time()}))

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
    def save_report(self, run_id: str, report: dict, predictions: dict | None = None) -> None:
        self._set(self._k(run_id, "report"), report)
        if predictions is not None:
            self._set(self._k(run_id, "predictions"), predictions)

    def report(self, run_id: str) -> dict | None:
        return self._get(self._k(run_id, "report"))

    def predictions(self, run_id: str) -> dict | None:
        return self._get(self._k(run_id, "predictions"))

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
