"""Shared fixtures: a real Redis, generated images and a tiny calibrated checkpoint, and
real worker processes (``python -m workers``), each on a queue of its own."""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import uuid

import pytest

# Triton kernels (nasq/model/triton_sep.py) run in Triton's CPU interpreter where there is no NVIDIA
# GPU. Triton reads this when a kernel is decorated, and its own standard-library kernels are
# decorated when Triton is first imported (torchvision imports it): so it is set here, before any
# test module imports anything. Worker processes the tests start inherit it (harmless on a CPU).
if not __import__("glob").glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def repo() -> str:
    """The repository root (commands run there, as a user would)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    from nasq.queue.redis_server import RedisServer

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


@pytest.fixture(scope="session")
def start_workers(tmp_path_factory):
    """Start real worker processes (``python -m workers``) on a broker, each CPU worker on one
    thread, through the library's own ``LocalCluster``: ``start_workers(url, n=2, backend=...)``.
    Every cluster started is stopped at the end of the session (tests may stop theirs sooner)."""
    from nasq.config import BackendOptions, Settings
    from nasq.queue.local import LocalCluster, WorkerSpec

    started = []

    def start(url: str, queue: str | None = None, *, n: int = 1, backend: str = "torch", settings=None,
              env: dict | None = None, sim: str | None = None) -> LocalCluster:
        queue = queue or f"eval.test-{uuid.uuid4().hex[:8]}"
        tag = uuid.uuid4().hex[:4]
        specs = [WorkerSpec(device="cpu", backend=backend, queues=(queue,), options=BackendOptions(threads=1, sim=sim),
                            name=f"test{i}-{queue}-{tag}@localhost") for i in range(n)]
        # the test workers may read and write the session's temporary folders (assets, outputs)
        base = str(tmp_path_factory.getbasetemp())
        settings = settings or Settings(merge_wait_s=20)
        settings = dataclasses.replace(settings, read_roots=settings.read_roots or base,
                                       write_roots=settings.write_roots or base)
        cluster = LocalCluster(specs, workdir=str(tmp_path_factory.mktemp("workers")), broker_url=url,
                               settings=settings, env=env, ready_timeout=120,
                               log=lambda *_: None)
        started.append(cluster)
        cluster.start()
        return cluster

    yield start
    for cluster in started:
        cluster.stop()


@pytest.fixture(scope="session")
def workers(redis_url, start_workers):
    """Two real CPU worker processes (torch backend) on a queue of their own."""
    return start_workers(redis_url, n=2)


@pytest.fixture(scope="session")
def other_db(redis_url):
    """``other_db(n)``: the test Redis server, database n (isolates a queue such as `build`)."""
    import redis

    def url_of(db: int) -> str:
        head, _, tail = redis_url.rpartition("/")
        url = f"{head}/{db}" if tail.isdigit() else f"{redis_url.rstrip('/')}/{db}"
        redis.Redis.from_url(url).delete("build")  # stale build messages from an earlier session
        return url

    return url_of


@pytest.fixture(scope="session")
def build_env(other_db, start_workers, tmp_path_factory):
    """Two real build workers (`--queues build`) on database 14 with a shared artifact directory."""
    from nasq.config import Settings

    url = other_db(14)
    art = str(tmp_path_factory.mktemp("artifacts"))
    w = start_workers(url, "build", n=2, settings=Settings(artifact_dir=art, merge_wait_s=20))
    return {"url": url, "artifact_dir": art, "workers": w}


@pytest.fixture
def settings(redis_url, tmp_path):
    from nasq.config import Settings

    return Settings(broker_url=redis_url, artifact_dir=str(tmp_path / "artifacts"), work_dir=str(tmp_path / "runs"))


@pytest.fixture(scope="session")
def nasq_cli() -> list[str]:
    """The ``nasq`` command as a user runs it (the installed script)."""
    exe = shutil.which("nasq", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "nasq.cli"]


@pytest.fixture
def eval_through(assets, start_workers, tmp_path):
    """``eval_through(url)``: an evaluation of the test images through the broker at ``url``
    with one real worker; returns the report."""
    from nasq.api import evaluate
    from nasq.config import Settings

    def run(url: str) -> dict:
        w = start_workers(url)
        try:
            return evaluate(weights=assets["weights"], data=assets["data"], labels=assets["labels"], batch_size=4,
                            queue=w.queue, settings=Settings(broker_url=url, report_dir=str(tmp_path / "rep")),
                            progress=False, log=lambda *_: None).report
        finally:
            w.stop()

    return run


@pytest.fixture(scope="session")
def keypair():
    """``keypair(folder, name)``: an RSA key and a self-signed certificate (PEM files), as message
    signing takes them; returns (key path, certificate path)."""
    return _keypair


def _keypair(folder, name: str):
    """An RSA key and a self-signed certificate, as PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    kp, cp = folder / f"{name}.key", folder / f"{name}.pem"
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                     serialization.NoEncryption()))
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(kp), str(cp)
