"""The connection every part of the run store shares (``store.py``), its key names, and what a
full broker means for it.

A full broker (Redis at ``maxmemory`` with ``noeviction``) refuses writes: a store made to ride
it out (workers) waits, saying so once a minute; a client's store raises ``BrokerFull``, which
names the limit.
"""
from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass, field, fields

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from ..errors import BrokerTrouble
from ..runstate import names
from . import scripts

log = logging.getLogger("nasq.store")

PREFIX = "nasq:run:"
RUNS = "nasq:runs"
ACTIVE = "nasq:runs:active"
WORKERS = "nasq:workers"
#: a dataset's digest list, by its content hash
DIGESTS = "nasq:digests:"
#: the parts of a run's records that its transitions and healing give the run's expiry again
#: (the shard scripts write none)
EXPIRING = ("running", "attempts", "finished", "merges", "results", "dropped", "redispatched", "redispatched_at",
            "redispatched_why", "failures", "barred", "excluded", "refused", "missing")
BUILD = "nasq:build:"
BUILD_LOCK_TTL_S = 300


@dataclass(frozen=True)
class RunKeys:
    """Every key of one run's records, ``nasq:run:<id>:<part>``: the one place they are named
    (the scripts take them as KEYS in the order their comments give)."""

    run_id: str
    manifest: str = field(init=False)
    #: the manifest signed by the submitting client (message signing on)
    sealed: str = field(init=False)
    state: str = field(init=False)
    #: the task ids of the run's merges (the chord's and one per resume) and the resume count
    merges: str = field(init=False)
    resumes: str = field(init=False)
    report: str = field(init=False)
    predictions: str = field(init=False)
    notes: str = field(init=False)
    #: the report's files are in place / rendered (what could not be) / the claims to do either
    published: str = field(init=False)
    rendered: str = field(init=False)
    publishing: str = field(init=False)
    rendering: str = field(init=False)
    #: the shard ledger: shard id -> its copy running now, starts, end, kept result, copies dropped
    running: str = field(init=False)
    attempts: str = field(init=False)
    finished: str = field(init=False)
    results: str = field(init=False)
    dropped: str = field(init=False)
    #: shard id -> times sent again, when and why
    redispatched: str = field(init=False)
    redispatched_at: str = field(init=False)
    redispatched_why: str = field(init=False)
    #: shard id -> its failed copies; the workers it is held against; those excluded from the run
    failures: str = field(init=False)
    barred: str = field(init=False)
    excluded: str = field(init=False)
    #: workers that refused the run's messages for their signature; shards whose message went missing
    refused: str = field(init=False)
    missing: str = field(init=False)

    def __post_init__(self):
        for f in fields(self)[1:]:
            object.__setattr__(self, f.name, f"{PREFIX}{self.run_id}:{f.name}")

    def lease(self, shard_id: str) -> str:
        """A shard's lease: its holder (and its progress)."""
        return f"{PREFIX}{self.run_id}:lease:{shard_id}"

    def merge_sent(self, generation) -> str:
        """The claim of the merge sent for a run whose chord cannot fire (one per resume)."""
        return f"{PREFIX}{self.run_id}:merge_sent:{generation}"

    def parts(self, *names: str) -> list[str]:
        return [getattr(self, n) for n in names]


#: ``RunKeys`` of a run, made once per run id (every call of the store names some of them)
run_keys = functools.lru_cache(maxsize=1024)(RunKeys)


class BrokerFull(BrokerTrouble):
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


class RedisStore:
    """A Redis connection with the settings' timeouts, and the run store's scripts.

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
                         for name in ("CLAIM", "TICK", "COMMIT", "FAIL", "TRANSITION", "RENEW", "REDISPATCH",
                                      "CLAIM_KEY", "UNCLAIM_KEY")}

    @classmethod
    def for_settings(cls, settings, *, ride_out: bool = False, wait_when_full: bool | None = None):
        """The store of ``settings``' result backend, with its timeouts; ``ride_out``: calls wait
        out a broker restart or a full broker (workers) instead of failing at once (clients)."""
        return cls(settings.backend_url, expires=settings.result_expires,
                   outage_s=settings.broker_outage_s if ride_out else 0.0,
                   connect_timeout_s=settings.broker_connect_timeout_s,
                   socket_timeout_s=settings.broker_socket_timeout_s, health_check_s=settings.broker_health_check_s,
                   wait_when_full=wait_when_full)

    def _set(self, key: str, value) -> None:
        self.r.set(key, json.dumps(value), ex=self.expires)

    def _get(self, key: str):
        raw = self.r.get(key)
        return None if raw is None else json.loads(raw)

    def _hash(self, key: str) -> dict[str, dict]:
        return {k.decode(): json.loads(v) for k, v in self.r.hgetall(key).items()}

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


class StorePart(RedisStore):
    """One part of the run store (``store.py``): its methods on the connection, the scripts and
    the settings of the store it is part of."""

    def __init__(self, conn: RedisStore):  # the connection is shared, not opened again
        self._conn = conn
        self.r, self.expires, self._scripts = conn.r, conn.expires, conn._scripts

    @property
    def wait_when_full(self) -> bool:
        return self._conn.wait_when_full
