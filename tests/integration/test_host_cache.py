"""The host cache: a second run of the same data reads the shared storage no more; an entry
changed on disk is read again from the source; workers that fill it at once, and a worker killed
while it writes, never leave an entry that is not whole. Real Redis, real worker processes,
real processes writing the cache."""
import hashlib
import multiprocessing
import os
import shutil
import signal
import time

from nasq.api import evaluate
from nasq.config import Settings
from nasq.data.hostcache import HostCache
from nasq.queue.store import RunStore
from nasq.results.status import render_status, run_status


def test_a_second_run_reads_from_the_host_cache_and_a_changed_entry_is_read_again(assets, redis_url, start_workers,
                                                                                  tmp_path):
    data = tmp_path / "val"
    shutil.copytree(assets["data"], data)
    cache = tmp_path / "host-cache"
    settings = Settings(broker_url=redis_url, report_dir=str(tmp_path / "rep"), artifact_dir=str(tmp_path / "art"),
                        host_cache_dir=str(cache), host_cache_gb=1, merge_wait_s=30)
    w = start_workers(redis_url, n=2, backend="sim", sim="rate=200", settings=settings)

    def run():
        return evaluate(weights=assets["weights"], data=str(data), labels=assets["labels"], backend="sim",
                        batch_size=4, shard_size=4, queue=w.queue, settings=settings, progress=False,
                        log=lambda *_: None)

    first = run()
    assert first.report.data_read["images_from_source"] == 23  # every file, the 3 unusable ones too
    second = run()
    read = second.report.data_read
    assert read["images_from_cache"] == 23 and read["images_from_source"] == 0 and read["bytes_from_source"] == 0
    assert second.predictions["top5"] == first.predictions["top5"]
    assert "23 from the host cache, 0 from the source" in second.table
    status = render_status(run_status(RunStore(redis_url), second.run_id))
    assert "images from the host cache: " in status and ": 23 of 23 read" in status, status
    # an entry changed on disk: dropped when it is read, the image read from the source again
    entry = next(p for p in cache.rglob("*") if p.is_file() and len(p.name) == 64)
    blob = bytearray(entry.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    entry.write_bytes(bytes(blob))
    third = run()
    assert third.report.data_read["images_from_source"] == 1 and third.report.data_read["images_from_cache"] == 22
    assert third.predictions["top5"] == first.predictions["top5"]
    assert hashlib.sha256(entry.read_bytes()).hexdigest() == entry.name  # whole again
    w.stop()


def _fill(root: str, blobs: list[bytes], rounds: int) -> None:
    """A worker filling the cache: every entry, again and again (its copy taken away every other
    round, so that the next put writes it again, racing the other worker)."""
    cache = HostCache(root, 10**9)
    for r in range(rounds):
        for b in blobs:
            digest = hashlib.sha256(b).digest()
            cache.put(digest, b)
            if r % 2 == 0:
                try:
                    os.unlink(cache.path(digest))
                except FileNotFoundError:
                    pass


def _slow_writer(root: str, blob: bytes) -> None:
    """Writes one big entry in small pieces (so that it is killed in the middle)."""
    import builtins

    real_open = builtins.open

    class Slow:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            for k in range(0, len(data), 1 << 16):
                self.f.write(data[k:k + (1 << 16)])
                self.f.flush()
                time.sleep(0.01)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    builtins.open = lambda path, mode="r", *a, **k: Slow(real_open(path, mode, *a, **k)) if "w" in mode \
        else real_open(path, mode, *a, **k)
    HostCache(root, 10**9).put(hashlib.sha256(blob).digest(), blob)


def test_workers_filling_the_cache_at_once_and_a_writer_killed_mid_entry_leave_no_broken_entry(tmp_path):
    root = str(tmp_path / "host-cache")
    blobs = [os.urandom(200_000 + k) for k in range(40)]
    ctx = multiprocessing.get_context("fork")
    fillers = [ctx.Process(target=_fill, args=(root, blobs, 12)) for _ in range(2)]
    for p in fillers:
        p.start()
    seen, broken = 0, []
    while any(p.is_alive() for p in fillers):  # read every entry's raw file while they write
        for b in blobs:
            path = HostCache(root, 10**9).path(hashlib.sha256(b).digest())
            try:
                data = open(path, "rb").read()
            except FileNotFoundError:
                continue
            seen += 1
            if data != b:
                broken.append(path)
    for p in fillers:
        p.join()
        assert p.exitcode == 0
    assert seen and not broken, broken
    cache = HostCache(root, 10**9)
    _fill(root, blobs, 1)
    for b in blobs:  # one whole copy each, once they are done
        cache.put(hashlib.sha256(b).digest(), b)
    assert all(cache.get(hashlib.sha256(b).digest()) == b for b in blobs)
    # a writer killed in the middle of an entry: no entry, only its temporary file, swept once stale
    big = os.urandom(8_000_000)
    digest = hashlib.sha256(big).digest()
    writer = ctx.Process(target=_slow_writer, args=(root, big))
    writer.start()
    folder = os.path.dirname(cache.path(digest))
    deadline = time.time() + 30
    while time.time() < deadline and not (os.path.isdir(folder) and [f for f in os.listdir(folder)
                                                                       if f.endswith(".tmp")]):
        time.sleep(0.01)
    time.sleep(0.1)  # it writes 8 MB in 64 kB pieces, 10 ms apart: a second in all
    os.kill(writer.pid, signal.SIGKILL)
    writer.join()
    assert not os.path.exists(cache.path(digest)) and cache.get(digest) is None
    tmps = [os.path.join(os.path.dirname(cache.path(digest)), f) for f in os.listdir(os.path.dirname(cache.path(digest)))
            if f.endswith(".tmp")]
    assert tmps and os.path.getsize(tmps[0]) < len(big)
    for t in tmps:
        os.utime(t, (time.time() - 3600, time.time() - 3600))
    cache.sweep()
    assert not [t for t in tmps if os.path.exists(t)]


def test_the_host_cache_keeps_the_most_recently_used_within_its_bound(tmp_path):
    cache = HostCache(str(tmp_path / "host-cache"), 10**8)
    blobs = [os.urandom(200_000) for _ in range(8)]
    for k, b in enumerate(blobs):
        cache.put(hashlib.sha256(b).digest(), b)
        os.utime(cache.path(hashlib.sha256(b).digest()), (1000 + k, 1000 + k))  # put in that order
    cache.max_bytes = 1_000_000  # 1.6 MB in it: above the bound
    assert cache.get(hashlib.sha256(blobs[0]).digest()) == blobs[0]  # used now: the most recent
    out = cache.sweep()
    kept = [k for k, b in enumerate(blobs) if os.path.exists(cache.path(hashlib.sha256(b).digest()))]
    assert out["bytes"] <= 900_000 and 0 in kept and kept == [0] + list(range(8 - len(kept) + 1, 8)), kept


def test_a_dataset_staged_with_cache_warm_is_not_read_from_storage_by_the_run(assets, redis_url, start_workers,
                                                                              tmp_path, nasq_cli, repo):
    """`nasq cache warm DATA` reads a dataset into this host's cache once: a run then reads none of
    its images from the data folder (u8 shards here, each crop an entry)."""
    import json
    import subprocess

    from nasq.data.preprocess import preprocess

    data = str(tmp_path / "u8")
    preprocess(assets["data"], data, fmt="u8", workers=1, shard_size=8, progress=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NASQ_")}
    env.update(NASQ_HOST_CACHE_DIR=str(tmp_path / "host-cache"), NASQ_ARTIFACT_DIR=str(tmp_path / "art"))
    p = subprocess.run(nasq_cli + ["cache", "warm", data, "--no-progress"], capture_output=True, text=True, cwd=repo,
                       env=env, timeout=120)
    assert p.returncode == 0 and "20 images read into" in p.stderr, p.stderr  # the 3 unusable ones have no crop
    info = subprocess.run(nasq_cli + ["cache", "info"], capture_output=True, text=True, cwd=repo, env=env, timeout=60)
    assert info.returncode == 0 and ": 20 images" in info.stdout, info.stdout + info.stderr
    settings = Settings(broker_url=redis_url, report_dir=str(tmp_path / "rep"), artifact_dir=str(tmp_path / "art"),
                        host_cache_dir=str(tmp_path / "host-cache"), host_cache_gb=1, merge_wait_s=30)
    w = start_workers(redis_url, backend="sim", sim="rate=400", settings=settings)
    res = evaluate(weights=assets["weights"], data=data, labels=assets["labels"], backend="sim", batch_size=4,
                   queue=w.queue, settings=settings, progress=False, log=lambda *_: None)
    assert res.report.data_read["images_from_source"] == 0 and res.report.data_read["images_from_cache"] == 20
    assert json.dumps(res.report.data_read["hosts"])
    w.stop()
