"""Build bookkeeping in Redis: the lock one build request holds while its steps run (in any
worker), and the status a waiting client shows."""
from __future__ import annotations

from redis.exceptions import LockError
from redis.lock import Lock

from ..keepalive import every
from .redis_store import BUILD, BUILD_LOCK_TTL_S, StorePart


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


class BuildBook(StorePart):
    """``nasq:build:{lock,status}:<key>``."""

    def build_lock(self, key: str, token: str) -> BuildLock:
        return BuildLock(self.r, key, token)

    def set_build_status(self, key: str, text: str) -> None:
        self.r.set(f"{BUILD}status:{key}", text, ex=3600)

    def build_status(self, key: str) -> str | None:
        v = self.r.get(f"{BUILD}status:{key}")
        return v.decode() if v else None
