"""Embedded runs: a private Redis and one local worker process per device, stopped afterwards."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import fields

from .celery_app import BUILD_QUEUE, make_app
from .config import Settings
from .errors import NasqError, RunError
from .redis_server import RedisServer


def _tail(path: str, n: int = 25) -> str:
    try:
        with open(path, "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()
        return "\n".join("    " + line for line in lines[-n:])
    except OSError:
        return "    (no log)"


def worker_name(kind: str, index: int, host: str | None = None) -> str:
    """The Celery node name of local worker ``index`` (``kind``: a device such as "cuda:0", or "build")."""
    return f"{kind.replace(':', '')}-{index}@{host or socket.gethostname()}"


class LocalCluster:
    """``with LocalCluster(...) as url:`` starts Redis and the workers, waits until every worker
    answers a ping, and on exit stops everything it started."""

    def __init__(self, *, devices: list[str], backend: str, queue: str, workdir: str,
                 precision: str | None = None, threads: int | None = None, build_workers: int = 0,
                 settings: Settings | None = None, log=print):
        self.devices, self.backend, self.queue, self.workdir = devices, backend, queue, workdir
        self.build_workers = build_workers
        self.settings = settings
        self.precision, self.threads, self.log = precision, threads, log
        self.redis = RedisServer(os.path.join(workdir, "redis"))
        self.procs: list[tuple[str, subprocess.Popen, str]] = []
        self.url: str | None = None

    def start(self) -> str:
        os.makedirs(self.workdir, exist_ok=True)
        self.url = self.redis.start()
        host = socket.gethostname()
        env = dict(os.environ, NASQ_BROKER_URL=self.url, PYTHONUNBUFFERED="1")
        env.pop("NASQ_RESULT_BACKEND", None)
        if self.settings is not None:  # the workers see the settings this process resolved
            for f in fields(Settings):
                if f.name not in ("broker_url", "result_backend"):
                    env[f"NASQ_{f.name.upper()}"] = str(getattr(self.settings, f.name))
        # Build workers consume only the build queue; evaluation workers never do.
        roles = [(dev, self.queue) for dev in self.devices] + [("cpu", BUILD_QUEUE)] * self.build_workers
        for i, (dev, queue) in enumerate(roles):
            kind = "build" if queue == BUILD_QUEUE else dev.replace(":", "")
            name = worker_name(kind, i, host)
            logpath = os.path.join(self.workdir, f"worker-{i}-{kind}.log")
            cmd = [sys.executable, "-m", "workers", "--device", dev, "--backend", self.backend,
                   "--queues", queue, "--name", name, "--broker", self.url]
            if self.precision:
                cmd += ["--precision", self.precision]
            if self.threads and dev == "cpu" and queue != BUILD_QUEUE:
                cmd += ["--threads", str(self.threads)]
            with open(logpath, "wb") as logf:
                proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            self.procs.append((name, proc, logpath))
        what = [f"{len(self.devices)} worker(s) on {', '.join(self.devices)}"] if self.devices else []
        what += [f"{self.build_workers} build worker(s)"] if self.build_workers else []
        self.log(f"started a private Redis and {' and '.join(what)}; logs in {self.workdir}")
        self._wait_ready()
        return self.url

    def _wait_ready(self, timeout: float = 180) -> None:
        app = make_app(Settings(broker_url=self.url))
        names = {n for n, _, _ in self.procs}
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.check()
            replies = app.control.ping(destination=sorted(names), timeout=1.0) or []
            if names <= {k for r in replies for k in r}:
                return
        raise NasqError(f"workers did not come up within {timeout:.0f} s; logs in {self.workdir}")

    def check(self) -> None:
        """Raise if a worker process has exited, with the end of its log."""
        for name, proc, logpath in self.procs:
            if proc.poll() is not None:
                raise RunError(f"local worker {name} exited with status {proc.returncode}; "
                               f"the end of {logpath}:\n{_tail(logpath)}")

    def stop(self) -> None:
        for _, proc, _ in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 20
        for _, proc, _ in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs = []
        self.redis.stop()

    def __enter__(self) -> str:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
