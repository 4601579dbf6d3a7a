"""Run records in Redis: manifest, per-shard progress, attempts, report, predictions.

Everything a watcher needs lives under ``nasq:run:<id>:*`` so any machine with the broker
URL can follow a run; keys expire with the results (``result_expires``).
"""
from __future__ import annotations

import json
import time

import redis

PREFIX = "nasq:run:"
RUNS = "nasq:runs"
WORKERS = "nasq:workers"


class RunStore:
    def __init__(self, url: str, *, expires: int = 7 * 24 * 3600):
        self.r = redis.Redis.from_url(url)
        self.expires = expires

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

    def set_state(self, run_id: str, state: str, **fields) -> None:
        self._set(self._k(run_id, "state"), {"state": state, "at": time.time(), **fields})

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

    def running(self, run_id: str) -> dict[str, dict]:
        return {k.decode(): json.loads(v) for k, v in self.r.hgetall(self._k(run_id, "running")).items()}

    def finished(self, run_id: str) -> dict[str, dict]:
        return {k.decode(): json.loads(v) for k, v in self.r.hgetall(self._k(run_id, "finished")).items()}

    def images_done(self, run_id: str) -> int:
        return sum(int(v) for v in self.r.hvals(self._k(run_id, "shard_done")))

    # workers ------------------------------------------------------------------------
    def register_worker(self, name: str, info: dict) -> None:
        self.r.hset(WORKERS, name, json.dumps({**info, "last_seen": time.time()}))

    def touch_worker(self, name: str, **fields) -> None:
        raw = self.r.hget(WORKERS, name)
        if raw is not None:
            info = json.loads(raw)
            info.update(fields, last_seen=time.time())
            self.r.hset(WORKERS, name, json.dumps(info))

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
