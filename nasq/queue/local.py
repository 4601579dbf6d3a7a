"""Local clusters: worker processes (``python -m workers``) on this machine, on a private Redis
or on a given broker, stopped afterwards. Embedded runs, builds and sweeps use them, and so
do the tests."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace

from ..config import BackendOptions, Settings, settings_to_file
from ..flags import option_argv
from ..errors import NasqError, RunError
from ..wire import BUILD_QUEUE
from .app import make_app
from .redis_server import RedisServer


def worker_name(kind: str, index: int, host: str | None = None) -> str:
    """The Celery node name of local worker ``index`` (``kind``: a device such as "cuda:0", or "build")."""
    return f"{kind.replace(':', '')}-{index}@{host or socket.gethostname()}"


@dataclass(frozen=True)
class WorkerSpec:
    """One local worker process: its device, backend, queues and name, and its device options
    (``BackendOptions``, given to it as the flags generated from their declaration)."""

    device: str = "cpu"
    backend: str = "torch"
    queues: tuple[str, ...] = ()
    name: str | None = None
    options: BackendOptions = BackendOptions()

    @property
    def kind(self) -> str:
        return "build" if self.queues == (BUILD_QUEUE,) else self.device.replace(":", "")

    def argv(self, name: str, broker: str, settings_file: str | None = None) -> list[str]:
        # -P: the worker package is nasq's, never a `workers/` folder in the current directory
        cmd = [sys.executable, "-P", "-m", "workers", "--device", self.device, "--backend", self.backend,
               "--name", name, "--broker", broker, *option_argv(self.options)]
        if self.queues:
            cmd += ["--queues", ",".join(self.queues)]
        return cmd + (["--settings", settings_file] if settings_file else [])


def _tail(path: str, n: int = 25) -> str:
    try:
        with open(path, "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()
        return "\n".join("    " + line for line in lines[-n:])
    except OSError:
        return "    (no log)"


#: worker_poll_s of a private cluster's workers (the stop of the run waits up to this long)
PRIVATE_POLL_S = 0.5


class LocalCluster:
    """``with LocalCluster(workers, workdir=...) as url:`` starts a private Redis (unless
    ``broker_url`` is given) and the workers, waits until every worker answers a ping, and on
    exit stops everything it started. The workers take ``settings`` whole, from a file in
    ``workdir`` their command line names, with the broker (and, for a private Redis, the result
    backend) this cluster gives them; ``env`` is added to their environment."""

    def __init__(self, workers: list[WorkerSpec], *, workdir: str, broker_url: str | None = None,
                 settings: Settings | None = None, env: dict | None = None, ready_timeout: float = 180, log=print):
        self.specs, self.workdir, self.settings, self.log = list(workers), workdir, settings, log
        self.extra_env, self.ready_timeout = dict(env or {}), ready_timeout
        self.redis = None if broker_url else RedisServer(os.path.join(workdir, "redis"))
        self.url = broker_url
        self.procs: list[tuple[str, subprocess.Popen, str]] = []

    @property
    def names(self) -> list[str]:
        return [n for n, _, _ in self.procs]

    @property
    def queue(self) -> str:
        """The first queue of the first worker (the evaluation queue of a one-queue cluster)."""
        return self.specs[0].queues[0]

    def start(self) -> str:
        os.makedirs(self.workdir, exist_ok=True)
        if self.redis is not None:
            self.url = self.redis.start()
        host = socket.gethostname()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("NASQ_RESULT_BACKEND", None)  # without settings, the workers' results go to the broker they are given
        env.update(self.extra_env)
        settings_file = None
        if self.settings is not None:  # the workers take the settings this process resolved, whole
            settings_file = os.path.join(self.workdir, "settings.json")
            worker_settings = replace(self.settings, broker_url=self.url)
            if self.redis is not None:
                # a private Redis is broker and result backend at once (a given broker keeps the
                # settings' backend); its few workers poll it every 0.5 s, because a worker's warm
                # shutdown waits for the poll in flight (kombu restores what it delivers)
                worker_settings = replace(worker_settings, result_backend=None,
                                          worker_poll_s=min(PRIVATE_POLL_S, self.settings.worker_poll_s))
            settings_to_file(worker_settings, settings_file)
        for i, spec in enumerate(self.specs):
            name = spec.name or worker_name(spec.kind, i, host)
            logpath = os.path.join(self.workdir, f"worker-{i}-{spec.kind}.log")
            self.procs.append((name, self.spawn(spec.argv(name, self.url, settings_file), logpath, env), logpath))
        builds = sum(1 for s in self.specs if s.kind == "build")
        devices = [s.device for s in self.specs if s.kind != "build"]
        what = [f"{len(devices)} worker(s) on {', '.join(devices)}"] if devices else []
        what += [f"{builds} build worker(s)"] if builds else []
        self.log(f"started {'a private Redis and ' if self.redis else ''}{' and '.join(what)}; logs in {self.workdir}")
        self._wait_ready()
        return self.url

    @staticmethod
    def spawn(argv: list[str], logpath: str, env: dict):
        """One worker process in its own session, its output in ``logpath``: a ``Popen``, or what
        a test harness gives in its place (``poll``, ``wait``, ``pid``, ``returncode``)."""
        with open(logpath, "wb") as logf:
            return subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def _wait_ready(self) -> None:
        from kombu.exceptions import OperationalError
        from redis.exceptions import ConnectionError as RedisConnectionError

        settings = replace(self.settings or Settings(), broker_url=self.url, result_backend=None)
        app, names, trouble = make_app(settings), set(self.names), ""
        deadline = time.time() + self.ready_timeout
        while time.time() < deadline:
            self.check()
            try:
                replies = app.control.ping(destination=sorted(names), timeout=1.0) or []
            except (OperationalError, RedisConnectionError, OSError) as e:  # a dropped connection: a new one
                trouble = f" (the broker: {type(e).__name__}: {e})"
                app.close()
                app = make_app(settings)
                time.sleep(0.2)
                continue
            if names <= {k for r in replies for k in r}:
                app.close()
                return
        raise NasqError(f"workers did not come up within {self.ready_timeout:.0f} s{trouble}; logs in {self.workdir}")

    def check(self) -> None:
        """Raise if a worker process has exited, with the end of its log."""
        for name, proc, logpath in self.procs:
            if proc.poll() is not None:
                raise RunError(f"local worker {name} exited with status {proc.returncode}; "
                               f"the end of {logpath}:\n{_tail(logpath)}")

    def log_text(self) -> str:
        text = []
        for _, _, path in self.procs:
            with open(path, errors="replace") as f:
                text.append(f.read())
        return "".join(text)

    def terminate(self) -> None:
        """Ask every worker to stop (SIGTERM: a warm shutdown, a running task finishes first)."""
        for _, proc, _ in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def stop(self, deadline: float | None = None) -> None:
        """Stop the workers (SIGKILL for one still up after 20 s, or at ``deadline``) and a private
        Redis."""
        self.terminate()
        deadline = deadline or time.time() + 20
        for _, proc, _ in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs = []
        if self.redis is not None:
            self.redis.stop()
        try:
            os.unlink(os.path.join(self.workdir, "settings.json"))  # it may hold a password: not kept after
        except OSError:
            pass

    def __enter__(self) -> str:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------------------------ local devices

def cuda_device_count() -> int:
    """GPUs visible to a child process, read from nvidia-smi and CUDA_VISIBLE_DEVICES (a process
    that forks workers must never initialize CUDA itself)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # cuda:N below counts these, as in the workers' pinning
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    n = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    if visible:
        n = min(n, len([v for v in visible.split(",") if v.strip()]))
    return n


def local_devices(backend: str, device: str = "auto", workers: int | None = None) -> list[str]:
    """Devices for an embedded run: one worker per GPU, else ``workers`` CPU workers (default 1).

    ``device`` may be "auto", "cpu", "cuda" (all GPUs) or a comma-separated list such as
    "cuda:0,cuda:2".
    """
    if device not in ("auto", "cpu", "cuda"):
        return [d.strip() for d in device.split(",") if d.strip()]
    if backend == "ais_bench":
        raise NasqError("--backend ais_bench runs on Ascend NPUs: name them, e.g. --device npu:0,npu:1 "
                        "(one worker each, pinned with ASCEND_RT_VISIBLE_DEVICES)")
    gpus = cuda_device_count() if device != "cpu" and backend in ("torch", "onnxruntime") else 0
    if device == "cuda" and not gpus:
        raise NasqError("--device cuda: no NVIDIA GPU is visible (nvidia-smi found none)")
    if gpus and backend == "torch":
        devs = [f"cuda:{i}" for i in range(gpus)]
        return devs[: workers] if workers else devs
    return ["cpu"] * max(1, workers or 1)


def cpu_threads(devices: list[str]) -> int | None:
    """Threads per CPU worker so that local CPU workers share the cores instead of fighting."""
    return max(1, (os.cpu_count() or 1) // len(devices)) if devices and devices[0] == "cpu" else None
