"""The worker registry in Redis (``nasq:workers``): what each worker runs, and its heartbeat."""
from __future__ import annotations

import json
import time

from .redis_store import WORKERS, RedisStore, _rides_out_full


class WorkerRegistry(RedisStore):
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
        """Registered workers; ``alive`` is False when no heartbeat came for ``alive_within`` s
        (or three of the worker's own heartbeat intervals, if longer)."""
        now = time.time()
        out = {}
        for k, v in self.r.hgetall(WORKERS).items():
            info = json.loads(v)
            beat = info.get("heartbeat_s")
            within = max(alive_within, 3 * beat) if isinstance(beat, (int, float)) else alive_within
            info["alive"] = now - info.get("last_seen", 0) < within
            out[k.decode()] = info
        return out
