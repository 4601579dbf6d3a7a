"""The worker registry in Redis: what each worker runs (``nasq:workers``), and whether it is
alive (``nasq:worker:<name>:alive``, a key its heartbeat keeps from expiring).

A worker is alive while its key lives: two heartbeats (``worker_heartbeat_s``) and half a
second after its last beat. The beat extends the key with PEXPIRE, which Redis allows while it
is full (``maxmemory`` with ``noeviction``), so a worker blocked by a full broker is still
alive, and one that died is gone within two heartbeats.
"""
from __future__ import annotations

import json
import time

from .redis_store import WORKERS, StorePart, _rides_out_full

ALIVE = "nasq:worker:{}:alive"


def alive_ms(heartbeat_s: float) -> int:
    """How long a worker stays alive after its last beat: two beats and half a second."""
    return max(1, int((2 * heartbeat_s + 0.5) * 1000))


class WorkerRegistry(StorePart):
    @_rides_out_full
    def register_worker(self, name: str, info: dict) -> None:
        """``info`` holds ``heartbeat_s``: the worker beats that often (``touch_worker``)."""
        beat = float(info.get("heartbeat_s") or 10.0)
        with self.r.pipeline(transaction=False) as p:
            p.hset(WORKERS, name, json.dumps({**info, "last_seen": time.time(), "liveness": "key"}))
            p.set(ALIVE.format(name), 1, px=alive_ms(beat))
            p.execute()

    def touch_worker(self, name: str, heartbeat_s: float) -> bool:
        """A heartbeat: the worker stays alive for two more beats. False when it is not
        registered (a broker that lost its data): register it again. One PEXPIRE, allowed
        while the broker is full."""
        return bool(self.r.pexpire(ALIVE.format(name), alive_ms(heartbeat_s)))

    def unregister_worker(self, name: str) -> None:
        with self.r.pipeline(transaction=False) as p:
            p.hdel(WORKERS, name)
            p.delete(ALIVE.format(name))
            p.execute()

    def workers(self) -> dict[str, dict]:
        """Registered workers; ``alive``: its heartbeat came within two beats; ``last_seen``: when
        it last beat (while alive; else when it registered)."""
        now = time.time()
        infos = {k.decode(): json.loads(v) for k, v in self.r.hgetall(WORKERS).items()}
        if not infos:
            return {}
        with self.r.pipeline(transaction=False) as p:
            for name in infos:
                p.pttl(ALIVE.format(name))
            left = p.execute()
        for (name, info), ms in zip(infos.items(), left):
            if info.get("liveness") != "key":  # registered by an earlier nasq: its last_seen, three beats
                beat = info.get("heartbeat_s")
                info["alive"] = now - info.get("last_seen", 0) < max(30.0, 3 * beat if beat else 0)
                continue
            info["alive"] = ms is not None and ms > 0
            if info["alive"]:
                info["last_seen"] = now - (alive_ms(float(info.get("heartbeat_s") or 10.0)) - ms) / 1000
        return infos

    def live_consumers(self, queue: str) -> set[str]:
        """The names of the live workers that consume ``queue``."""
        return {n for n, w in self.workers().items() if w["alive"] and queue in w.get("queues", [])}
