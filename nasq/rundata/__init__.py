"""A run's data as typed, frozen objects: the manifest a client writes when it submits a run
(``RunManifest`` with its ``PlannedShard`` list), what a worker returns for one shard
(``ShardResult``) and the report the merge writes (``Report``).

Each is read from the JSON that travels through Redis and files with ``from_payload``, which
names the field that is wrong (a ``MessageError``), and written back with ``to_payload``: the
format is the one earlier releases wrote and read, so runs recorded by either are read by both.
No module outside this package and ``nasq.wire`` reads these records by string key.
"""
from .manifest import PlannedShard, RunManifest
from .report import BackendInfo, Report, RunEnvironment, Throughput
from .shard_result import ShardResult, ShardTiming

__all__ = ["BackendInfo", "PlannedShard", "Report", "RunEnvironment", "RunManifest", "ShardResult", "ShardTiming",
           "Throughput"]
