"""Shared fixtures: a real Redis, generated images and a tiny calibrated checkpoint, and
real worker processes (``python -m workers``), each on a queue of its own."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """NASQ_TEST_REDIS, else the local Redis on 6379 (db 15), else a private one."""
    import redis

    url = os.environ.get("NASQ_TEST_REDIS", "redis://127.0.0.1:6379/15")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
        yield url
        return
    except redis.exceptions.ConnectionError:
        pass
    from nasq.redis_server import RedisServer

    with RedisServer(str(tmp_path_factory.mktemp("redis"))) as private:
        yield private


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """20 generated JPEGs (+ a truncated one, a text file named .JPEG and an empty one), a tiny
    Cadene-format checkpoint calibrated on them, and val_label.txt from the fp32 reference."""
    from nasq.demo import make_checkpoint, make_images

    root = tmp_path_factory.mktemp("assets")
    val = root / "val"
    names = make_images(str(val), 20, seed=3)
    ckpt = root / "tiny.pth"
    top1 = make_checkpoint(str(ckpt), str(val), names, arch="tiny", seed=3, batch_size=4, log=lambda *_: None)
    good = (val / names[5]).read_bytes()
    (val / "ILSVRC2012_val_00000021.JPEG").write_bytes(good[: len(good) // 2])  # truncated
    (val / "ILSVRC2012_val_00000022.JPEG").write_text("this is not an image\n")
    (val / "ILSVRC2012_val_00000023.JPEG").write_bytes(b"")
    labels = root / "val_label.txt"
    lines = [f"{n} {int(c)}\n" for n, c in zip(names, top1)]
    lines += [f"ILSVRC2012_val_000000{i}.JPEG 1\n" for i in (21, 22, 23)]
    labels.write_text("".join(lines))
    return {"root": root, "data": str(val), "weights": str(ckpt), "labels": str(labels), "names": names,
            "top1": top1, "bad": {"ILSVRC2012_val_00000021.JPEG", "ILSVRC2012_val_00000022.JPEG",
                                  "ILSVRC2012_val_00000023.JPEG"}}


class Workers:
    def __init__(self, redis_url: str, queue: str, logdir: str, backend: str = "torch", env: dict | None = None):
        self.redis_url, self.queue, self.logdir, self.backend = redis_url, queue, logdir, backend
        self.env = env or {}
        self.procs: list[tuple[str, subprocess.Popen, str]] = []

    def start(self, n: int) -> None:
        env = dict(os.environ, NASQ_BROKER_URL=self.redis_url, PYTHONUNBUFFERED="1", NASQ_MERGE_WAIT_S="20",
                   **self.env)
        for i in range(n):
            name = f"test{i}-{self.queue}-{uuid.uuid4().hex[:4]}@localhost"
            log = os.path.join(self.logdir, f"worker-{self.queue}-{i}.log")
            with open(log, "wb") as f:
                p = subprocess.Popen([sys.executable, "-m", "workers", "--device", "cpu", "--threads", "1",
                                      "--backend", self.backend, "--queues", self.queue, "--name", name],
                                     stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
            self.procs.append((name, p, log))
        from nasq.celery_app import make_app
        from nasq.config import Settings

        app = make_app(Settings(broker_url=self.redis_url))
        names = {n for n, _, _ in self.procs}
        deadline = time.time() + 120
        while time.time() < deadline:
            for name, p, log in self.procs:
                assert p.poll() is None, f"worker {name} died:\n{open(log).read()[-3000:]}"
            replies = app.control.ping(destination=sorted(names), timeout=1.0) or []
            if names <= {k for r in replies for k in r}:
                return
        raise AssertionError("workers did not answer ping within 120 s")

    def log_text(self) -> str:
        return "".join(open(log, errors="replace").read() for _, _, log in self.procs)

    def stop(self) -> None:
        for _, p, _ in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for _, p, _ in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def workers(redis_url, tmp_path_factory):
    """Two real CPU worker processes (torch backend) on a queue of their own."""
    w = Workers(redis_url, f"eval.test-{uuid.uuid4().hex[:8]}", str(tmp_path_factory.mktemp("logs")))
    w.start(2)
    yield w
    w.stop()


def other_db(url: str, db: int) -> str:
    """The same Redis server, another database (isolates a queue such as `build`)."""
    head, _, tail = url.rpartition("/")
    return f"{head}/{db}" if tail.isdigit() else f"{url.rstrip('/')}/{db}"


@pytest.fixture(scope="session")
def build_env(redis_url, tmp_path_factory):
    """Two real build workers (`--queues build`) on database 14 with a shared artifact directory."""
    import redis

    url = other_db(redis_url, 14)
    redis.Redis.from_url(url).delete("build")  # stale build messages from an earlier session
    art = str(tmp_path_factory.mktemp("artifacts"))
    w = Workers(url, "build", str(tmp_path_factory.mktemp("buildlogs")), env={"NASQ_ARTIFACT_DIR": art})
    w.start(2)
    yield {"url": url, "artifact_dir": art, "workers": w}
    w.stop()


@pytest.fixture
def settings(redis_url, tmp_path):
    from nasq.config import Settings

    return Settings(broker_url=redis_url, artifact_dir=str(tmp_path / "artifacts"), work_dir=str(tmp_path / "runs"))


def nasq_cli() -> list[str]:
    exe = shutil.which("nasq", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "nasq.cli"]


def eval_through(url: str, assets: dict, tmp_path) -> dict:
    """An evaluation of the test images through the broker at ``url`` with one real worker."""
    from nasq.api import evaluate
    from nasq.config import Settings

    w = Workers(url, f"eval.via-{uuid.uuid4().hex[:6]}", str(tmp_path))
    w.start(1)
    try:
        return evaluate(weights=assets["weights"], data=assets["data"], labels=assets["labels"], batch_size=4,
                        queue=w.queue, settings=Settings(broker_url=url, report_dir=str(tmp_path / "rep")),
                        progress=False, log=lambda *_: None).report
    finally:
        w.stop()
