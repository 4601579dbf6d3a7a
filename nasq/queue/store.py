"""Everything nasq keeps in Redis, one concern per part: run records (``store.runs``,
``records.py``), the shard ledger (``store.ledger``, ``ledger.py``), the worker registry
(``store.registry``, ``registry.py``) and build bookkeeping (``store.builds``, ``builds.py``), on
one connection (``redis_store.py``, where ``RunKeys`` names every key of a run).

Everything a watcher needs lives under ``nasq:run:<id>:*`` so any machine with the broker
URL can follow a run; keys expire with the results (``result_expires``). Whatever changes a
run's state or a shard's outcome is one atomic script (``scripts.py``) checked against the
run's state machine (``nasq.runstate``).
"""
from __future__ import annotations

from .builds import BuildBook, BuildLock
from .ledger import ShardLedger
from .redis_store import BrokerFull, RedisStore, RunKeys, full_message, is_full
from .registry import WorkerRegistry
from .records import RunRecords

__all__ = ["BrokerFull", "BuildLock", "RunKeys", "RunStore", "full_message", "is_full"]


class RunStore(RedisStore):
    """The run store: its parts on one connection. Each consumer uses the part it needs:
    ``runs`` (a run's manifest, state and transitions, report, notes), ``ledger`` (the shards'
    leases, results and failures), ``registry`` (the live workers), ``builds`` (build locks)."""

    def __init__(self, url: str, **kwargs):
        super().__init__(url, **kwargs)
        self.runs = RunRecords(self)
        self.registry = WorkerRegistry(self)
        self.ledger = ShardLedger(self, runs=self.runs, registry=self.registry)
        self.builds = BuildBook(self)
