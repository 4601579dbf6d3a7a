"""The host cache: the images a worker read from shared storage, kept on the host's local disk
for the next run, sweep point or worker of the host that reads the same bytes.

Entries are named by their content: the sha256 the run's digest list gives each image
(``digests.py``), so runs of the same data share them whatever folder or run they come from,
and each entry is verified when it is read (the sha256 is computed anyway): an entry that
changed on disk is dropped and the image read from the source again. Every worker of the host
shares the folder: an entry is written under a temporary name and renamed into place, so a
reader sees it whole or not at all, two workers that fill it at once leave one copy, and a
worker killed while writing leaves only a temporary file that the next sweep removes. The
cache is bounded (``host_cache_gb``): a hit marks its entry used (its mtime), and a sweep, one
at a time per host (a lock file), removes the least recently used entries above the bound.

Settings: ``host_cache_dir`` (default ``~/.cache/nasq/host-cache``), ``host_cache_gb`` (20; 0:
no cache).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import time

from ..files import remove_quietly

#: a temporary entry older than this is a writer's that died
STALE_TMP_S = 600.0
#: an entry's last use is recorded (its mtime) at most this often: the sweep's order is to the minute
TOUCH_S = 60.0


class HostCache:
    def __init__(self, root: str, max_bytes: int):
        self.root, self.max_bytes = os.path.abspath(root), int(max_bytes)
        self.objects = os.path.join(self.root, "objects")
        self._written = 0
        self._lock = threading.Lock()

    @classmethod
    def for_settings(cls, settings) -> HostCache | None:
        gb = float(getattr(settings, "host_cache_gb", 0) or 0)
        return cls(settings.host_cache_dir, int(gb * 1e9)) if gb > 0 and settings.host_cache_dir else None

    def path(self, digest: bytes) -> str:
        h = digest.hex()
        return os.path.join(self.objects, h[:2], h)

    def get(self, digest: bytes) -> bytes | None:
        """The bytes of the entry named ``digest``, verified; None on a miss (or an entry that
        changed on disk: it is removed, and the caller reads the source)."""
        path = self.path(digest)
        try:
            with open(path, "rb") as f:
                data = f.read()
                used = os.fstat(f.fileno()).st_mtime
        except OSError:
            return None
        if hashlib.sha256(data).digest() != digest:
            remove_quietly(path)  # a damaged entry: read from the source, and kept again
            return None
        if time.time() - used > TOUCH_S:  # its last use, for the least-recently-used sweep (to the minute)
            try:
                os.utime(path)
            except OSError:
                pass
        return data

    def put(self, digest: bytes, data: bytes) -> None:
        """Keep ``data`` (whose sha256 is ``digest``, checked by the caller) unless it is there."""
        if len(data) > self.max_bytes:
            return
        path = self.path(digest)
        if os.path.exists(path):
            return
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError:  # a full or read-only disk: the run reads the source, as without a cache
            remove_quietly(tmp)
            return
        with self._lock:
            self._written += len(data)
            due = self._written > max(self.max_bytes // 20, 1)
            if due:
                self._written = 0
        if due:
            self.sweep()

    def sweep(self) -> dict:
        """Remove temporary files of writers that died and, above the bound, the least recently
        used entries down to 90 % of it; one sweeper at a time on the host (others skip).
        Returns what it found and removed."""
        os.makedirs(self.root, exist_ok=True)
        with open(os.path.join(self.root, ".sweep.lock"), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return {"skipped": True}
            entries, total, now, removed = [], 0, time.time(), 0
            for sub in _scandir(self.objects):
                if not sub.is_dir():
                    continue
                for e in _scandir(sub.path):
                    try:
                        st = e.stat()
                    except OSError:
                        continue
                    if e.name.endswith(".tmp"):
                        if now - st.st_mtime > STALE_TMP_S:
                            _unlink(e.path)
                        continue
                    entries.append((st.st_mtime, st.st_size, e.path))
                    total += st.st_size
            if total > self.max_bytes:
                entries.sort()
                for _, size, path in entries:
                    if total <= 0.9 * self.max_bytes:
                        break
                    if _unlink(path):
                        total -= size
                        removed += 1
            return {"entries": len(entries) - removed, "bytes": total, "removed": removed}


def _scandir(path: str):
    try:
        with os.scandir(path) as it:
            return [e for e in it if e.is_dir() or e.is_file()]
    except OSError:
        return []


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


class ReadThrottle:
    """A folder's read bandwidth (``mbps`` megabytes a second), shared by every process of the
    host that reads it: a stand-in for a shared file system's share per host, for SIMULATED
    devices (``--sim read_mbps=N``). Each read takes the next slot of a virtual pipe at that
    rate (a file under the temporary folder, locked) and waits until its slot ends."""

    def __init__(self, key: str, mbps: float):
        import tempfile

        self.rate = float(mbps) * 1e6
        self.path = os.path.join(tempfile.gettempdir(),
                                 f"nasq-read-{hashlib.sha256(key.encode()).hexdigest()[:16]}-{int(mbps)}")
        self._fd: int | None = None
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> None:
        import struct

        with self._lock:  # threads of one process share the file's lock: one at a time here first
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                raw = os.pread(self._fd, 8, 0)
                free = struct.unpack("d", raw)[0] if len(raw) == 8 else 0.0
                now = time.time()
                end = max(now, free) + nbytes / self.rate
                os.pwrite(self._fd, struct.pack("d", end), 0)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        if end > now:
            time.sleep(end - now)
