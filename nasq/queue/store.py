"""Everything nasq keeps in Redis, and the only place its key names are spelled, one concern
per module: run records (``records.py``), the shard ledger (``ledger.py``), the worker registry
(``registry.py``) and build bookkeeping (``builds.py``), on one connection (``redis_store.py``).

Everything a watcher needs lives under ``nasq:run:<id>:*`` so any machine with the broker
URL can follow a run; keys expire with the results (``result_expires``). Whatever changes a
run's state or a shard's outcome is one atomic script (``scripts.py``) checked against the
run's state machine (``nasq.runstate``).
"""
from __future__ import annotations

from .builds import BuildBook, BuildLock
from .ledger import ShardLedger
from .redis_store import BrokerFull, full_message, is_full
from .registry import WorkerRegistry
from .records import RunRecords

__all__ = ["BrokerFull", "BuildLock", "RunStore", "full_message", "is_full"]


class RunStore(RunRecords, ShardLedger, WorkerRegistry, BuildBook):
    """The run store: each part's keys on one connection (``RedisStore``)."""
