"""Shared fixtures: a real Redis, generated images and a tiny calibrated checkpoint, and
real worker processes (``python -m workers``), each on a queue of its own."""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import threading
import uuid

import pytest

# Triton kernels (nasq/model/triton_sep.py) run in Triton's CPU interpreter where there is no NVIDIA
# GPU. Triton reads this when a kernel is decorated, and its own standard-library kernels are
# decorated when Triton is first imported (torchvision imports it): so it is set here, before any
# test module imports anything. Worker processes the tests start inherit it (harmless on a CPU).
if not __import__("glob").glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The user's own cache (run history, reports, artifacts, host cache) is never the tests': the
# session runs with HOME and the XDG folders in a temporary folder of its own, made by the first
# process (pytest's, before pytest-xdist starts its processes, which inherit it). The real folder
# is remembered so that the session can prove it untouched (pytest_sessionfinish).
REAL_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nasq")
if "NASQ_TEST_HOME" not in os.environ:
    import atexit
    import tempfile

    _home = tempfile.mkdtemp(prefix="nasq-test-home-")
    atexit.register(shutil.rmtree, _home, ignore_errors=True)
    os.environ["NASQ_TEST_REAL_CACHE"] = REAL_CACHE
    os.environ["NASQ_TEST_HOME"] = os.environ["HOME"] = _home
    for _var, _sub in (("XDG_CACHE_HOME", ".cache"), ("XDG_CONFIG_HOME", ".config"), ("XDG_DATA_HOME", ".local/share"),
                       ("XDG_STATE_HOME", ".local/state")):
        os.environ[_var] = os.path.join(_home, _sub)
REAL_CACHE = os.environ["NASQ_TEST_REAL_CACHE"]
_ASSETS = os.environ.get("NASQ_TEST_CACHE") or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                           ".pytest_cache", "nasq-test-assets")
os.environ.setdefault("MPLCONFIGDIR", os.path.join(_ASSETS, "matplotlib"))  # its font list, built once
# Test processes share the cores (pytest-xdist, the workers they start): one compute thread each,
# set before torch starts, instead of thread pools spinning against each other.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")


def _tree(folder: str) -> dict:
    """Every file and folder under ``folder`` with its size and modification time."""
    seen = {}
    for top, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(top, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            seen[os.path.relpath(path, folder)] = (st.st_size, st.st_mtime_ns)
    return seen


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):  # pytest's own process, not an xdist worker
        session.config._nasq_real_cache = _tree(REAL_CACHE)


def pytest_sessionfinish(session, exitstatus):
    """The whole session fails if it changed the user's ~/.cache/nasq (or $XDG_CACHE_HOME/nasq)."""
    before = getattr(session.config, "_nasq_real_cache", None)
    if before is None:
        return
    after = _tree(REAL_CACHE)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if changed:
        session.config._nasq_home_changed = changed
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    changed = getattr(config, "_nasq_home_changed", None)
    if changed:
        terminalreporter.write_line(f"FAILED: the tests changed the user's {REAL_CACHE}: "
                                    + ", ".join(changed[:10]) + (" ..." if len(changed) > 10 else ""), red=True)


def pytest_collection_modifyitems(config, items):
    """Tiers: ``integration`` for what needs a real Redis, worker processes or a model (every test
    under tests/integration, and those under tests/unit that use the generated images and
    checkpoint); ``slow`` is set by the modules that need minutes. The rest is the unit tier:
    ``pytest -m "not integration and not slow"``."""
    for item in items:
        if "integration" in item.path.parts or "assets" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
    # pytest-xdist hands out whole modules (--dist loadfile) in this order (--no-loadscope-reorder):
    # the modules that take minutes first, the unit modules last, so that no process starts a long
    # module when the others are done
    rank: dict = {}
    for item in items:
        r = 0 if item.get_closest_marker("slow") else 1 if item.get_closest_marker("integration") else 2
        rank[item.path] = min(rank.get(item.path, 2), r)
    items.sort(key=lambda item: rank[item.path])  # stable: each module's tests keep their order


@pytest.fixture(scope="session", autouse=True)
def _fork_workers():
    """Worker processes that ``LocalCluster`` starts in a test process are forked from a zygote
    that has imported torch, Celery and nasq once (``tests/zygote.py``: what each worker is, and
    which ones are still started with ``Popen``). The zygote starts with the first worker. Set
    NASQ_TEST_EXEC_WORKERS=1 to start every worker with ``Popen``. ``nasq`` commands that the
    tests run as subprocesses start theirs as users' do."""
    if os.environ.get("NASQ_TEST_EXEC_WORKERS"):
        yield
        return
    from nasq.queue.local import LocalCluster

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        import zygote
    finally:
        sys.path.pop(0)
    popen, started, lock = LocalCluster.spawn, [], threading.Lock()
    env_now = dict(os.environ, PYTHONUNBUFFERED="1")  # the session's, before a test changes it

    def spawn(argv, logpath, env):
        with lock:
            if not started:
                try:
                    started.append(zygote.Zygote(env_now))
                except (OSError, RuntimeError) as e:  # every worker of this session starts with Popen
                    started.append(None)
                    print(f"conftest: workers start with Popen: {e}", file=sys.stderr)
        z = started[0]
        if z is not None and z.can_fork(argv, env):
            try:
                return z.spawn(argv, logpath, env)
            except (OSError, RuntimeError) as e:
                print(f"conftest: this worker starts with Popen: {e}", file=sys.stderr)
        return popen(argv, logpath, env)

    LocalCluster.spawn = staticmethod(spawn)
    yield
    LocalCluster.spawn = staticmethod(popen)
    for z in started:
        if z is not None:
            z.close()


@pytest.fixture(scope="session")
def repo() -> str:
    """The repository root (commands run there, as a user would)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """NASQ_TEST_REDIS, else (one test process) the local Redis on 6379, db 15, else a Redis of this
    test process's own: under pytest-xdist each process has its own server, so that queues, the
    worker registry and healing turns of one never meet another's."""
    import redis

    from nasq.queue.redis_server import spawn_redis, stop_process

    url = os.environ.get("NASQ_TEST_REDIS")
    if url is None and "PYTEST_XDIST_WORKER" not in os.environ:
        try:
            redis.Redis.from_url("redis://127.0.0.1:6379/15", socket_connect_timeout=1).ping()
            url = "redis://127.0.0.1:6379/15"
        except redis.exceptions.ConnectionError:
            pass
    if url is not None:
        yield url
        return
    proc, url = spawn_redis(["--save", "", "--appendonly", "no", "--dir", str(tmp_path_factory.mktemp("redis"))],
                            db=15)
    yield url
    stop_process(proc)


def _recipe_key(*parts) -> str:
    """What generated test assets depend on: the code that makes them and the arguments."""
    import hashlib

    import nasq

    h = hashlib.sha256(repr(parts).encode())
    pkg = os.path.dirname(nasq.__file__)
    for rel in ("demo.py", "model/checkpoint.py", "model/spec.py", "data/transforms.py", "data/preprocess.py",
                "backends/torch_backend.py"):
        with open(os.path.join(pkg, rel), "rb") as f:
            h.update(f.read())
    h.update(__import__("torch").__version__.encode())
    return h.hexdigest()[:16]


def _cached(name: str, key: str, make) -> str:
    """A folder made once by ``make(folder)`` and kept in the checkout's .pytest_cache/nasq-test-assets/
    <name>-<key> (under NASQ_TEST_CACHE if set) for later test sessions; built aside, then renamed
    into place."""
    import shutil
    import tempfile

    base = _ASSETS
    final = os.path.join(base, f"{name}-{key}")
    if not os.path.isdir(final):
        os.makedirs(base, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=base)
        try:
            make(tmp)
            os.replace(tmp, final)
        except OSError:  # another test process made it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """20 generated JPEGs (+ a truncated one, a text file named .JPEG and an empty one), a tiny
    Cadene-format checkpoint calibrated on them, and val_label.txt from the fp32 reference; made
    once per recipe (``_cached``) and copied into this session's temporary folder."""
    import json
    import shutil

    from nasq.demo import make_checkpoint, make_images

    def make(folder: str) -> None:
        names = make_images(os.path.join(folder, "val"), 20, seed=3)
        top1 = make_checkpoint(os.path.join(folder, "tiny.pth"), os.path.join(folder, "val"), names, arch="tiny",
                               seed=3, batch_size=4, log=lambda *_: None)
        with open(os.path.join(folder, "made.json"), "w") as f:
            json.dump({"names": names, "top1": [int(c) for c in top1]}, f)

    root = tmp_path_factory.mktemp("assets")
    shutil.copytree(_cached("tiny-20", _recipe_key("tiny", 20, 3, 4), make), root, dirs_exist_ok=True)
    made = json.loads((root / "made.json").read_text())
    names, top1 = made["names"], made["top1"]
    val, ckpt = root / "val", root / "tiny.pth"
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
def start_workers(tmp_path_factory, redis_url):  # redis_url: stopped after the workers
    """Start real worker processes (``python -m workers``) on a broker, each CPU worker on one
    thread, through the library's own ``LocalCluster``: ``start_workers(url, n=2, backend=...)``
    (``devices=["npu:0", ...]``: one worker per device, for the sim backend).
    Every cluster started is stopped at the end of the session (tests may stop theirs sooner)."""
    from nasq.config import BackendOptions, Settings
    from nasq.queue.local import PRIVATE_POLL_S, LocalCluster, WorkerSpec

    started = []

    def start(url: str, queue: str | None = None, *, n: int = 1, backend: str = "torch", settings=None,
              env: dict | None = None, sim: str | None = None, devices: list[str] | None = None) -> LocalCluster:
        queue = queue or f"eval.test-{uuid.uuid4().hex[:8]}"
        tag = uuid.uuid4().hex[:4]
        devices = devices or ["cpu"] * n
        specs = [WorkerSpec(device=d, backend=backend, queues=(queue,), options=BackendOptions(threads=1, sim=sim),
                            name=f"test{i}-{queue}-{tag}@localhost") for i, d in enumerate(devices)]
        # the test workers may read and write the session's temporary folders (assets, outputs);
        # they poll the broker every 0.5 s, as a private cluster's do (a stop waits for the poll)
        base = str(tmp_path_factory.getbasetemp())
        settings = settings or Settings(merge_wait_s=20)
        settings = dataclasses.replace(settings, read_roots=settings.read_roots or base,
                                       write_roots=settings.write_roots or base,
                                       worker_poll_s=min(settings.worker_poll_s, PRIVATE_POLL_S))
        cluster = LocalCluster(specs, workdir=str(tmp_path_factory.mktemp("workers")), broker_url=url,
                               settings=settings, env=env, ready_timeout=120,
                               log=lambda *_: None)
        started.append(cluster)
        cluster.start()
        return cluster

    yield start
    import time

    for cluster in started:  # all at once, with one short grace period: the tests are over, so a
        cluster.terminate()  # task still running (a test's long shard) is not waited for
    deadline = time.time() + 3
    for cluster in started:
        cluster.stop(deadline)


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
def cli(nasq_cli, repo):
    """``cli(args, broker=..., report_dir=...)``: the nasq command in a subprocess, with only the
    settings given (no NASQ_ variable of the test process)."""
    def run(args, *, broker=None, report_dir=None, timeout=180):
        env = {k: v for k, v in os.environ.items() if not k.startswith("NASQ_")}
        if broker:
            env["NASQ_BROKER_URL"] = broker
        if report_dir:
            env["NASQ_REPORT_DIR"] = str(report_dir)
        return subprocess.run(nasq_cli + args, capture_output=True, text=True, cwd=repo, env=env, timeout=timeout)
    return run


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


@pytest.fixture(scope="session")
def signing_settings():
    """``signing_settings(folder)``: message-signing settings (``signing_key``, ``signing_cert``,
    ``signing_cert_store``) with a fresh worker key whose certificate is the only one trusted;
    the files go under ``folder``."""
    def make(folder) -> dict:
        import shutil

        trusted, keys = folder / "trusted", folder / "keys"
        trusted.mkdir()
        keys.mkdir()
        key, cert = _keypair(keys, "worker")
        shutil.copy(cert, trusted)
        return dict(signing_key=key, signing_cert=cert, signing_cert_store=str(trusted))
    return make


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
