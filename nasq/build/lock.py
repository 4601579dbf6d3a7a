"""The build lock: one build per key at a time, across machines, with an expiry so that a
build whose worker died frees the key again."""
from __future__ import annotations

import threading

LOCK_TTL_S = 300

_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
_EXTEND = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('expire', KEYS[1], ARGV[2]) else return 0 end"


class BuildLock:
    def __init__(self, r, key: str, token: str, ttl: int = LOCK_TTL_S):
        self.r, self.name, self.token, self.ttl = r, f"nasq:build:lock:{key}", token, ttl

    def acquire(self) -> bool:
        """Take the lock, or keep it if this request already holds it (a redelivered step)."""
        if self.r.set(self.name, self.token, nx=True, ex=self.ttl):
            return True
        return self.extend()

    def extend(self) -> bool:
        return bool(self.r.eval(_EXTEND, 1, self.name, self.token, self.ttl))

    def owner(self) -> str | None:
        v = self.r.get(self.name)
        return v.decode() if v else None

    def release(self) -> None:
        self.r.eval(_RELEASE, 1, self.name, self.token)

    def kept(self):
        """Context manager: extend the lock every ttl/3 while a long step runs."""
        lock = self

        class _Keeper:
            def __enter__(self):
                self.stop = threading.Event()
                self.t = threading.Thread(target=self.run, daemon=True)
                self.t.start()

            def run(self):
                while not self.stop.wait(lock.ttl / 3):
                    lock.extend()

            def __exit__(self, *exc):
                self.stop.set()
                self.t.join()

        return _Keeper()
