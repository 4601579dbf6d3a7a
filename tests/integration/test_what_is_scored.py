"""What is scored is what was listed, byte for byte; a finished report is written once and never
changes. Each change is done for real: images rewritten mid-run (JPEG, .bin and u8 shards), a
finished signed run's records rewritten in Redis, the merging worker SIGKILLed at moments spread
over the merge, a decompression bomb in the data. Real Redis, real worker processes."""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid

import numpy as np
import pytest

from nasq.api import submit_evaluation
from nasq.config import Settings
from nasq.errors import RunError
from nasq.queue.store import RunStore
from waiting import Waiter, sim_weights, until


def _same_size_valid(victim: str, donor: str) -> None:
    """``victim`` rewritten as another valid image of exactly its size (the donor's bytes, padded)."""
    size = os.path.getsize(victim)
    data = open(donor, "rb").read()
    assert len(data) < size, "the donor must be the smaller file"
    with open(victim, "wb") as f:
        f.write(data + b"\0" * (size - len(data)))  # decoders stop at the image's end marker


def _same_size_random(victim: str) -> None:
    size = os.path.getsize(victim)
    with open(victim, "wb") as f:
        f.write(os.urandom(size))


def _data(kind: str, assets, tmp_path) -> str:
    from nasq.data.preprocess import preprocess

    if kind == "jpeg":
        shutil.copytree(assets["data"], tmp_path / "val")
        return str(tmp_path / "val")
    preprocess(assets["data"], str(tmp_path / kind), fmt=kind, workers=1, shard_size=8, progress=False)
    return str(tmp_path / kind)


def _change(kind: str, data: str) -> dict[int, str]:
    """Images 15 (another valid image of the same size) and 19 (random bytes of the same size)
    rewritten in place; returns index -> the words a refusal names it by."""
    from nasq.data import open_source

    src = open_source(data)
    if kind == "u8":
        path = os.path.join(data, "shard-00001.npy")  # images 8-15; 16-23 are in shard-00002
        arr = np.load(path)
        arr[15 - 8] = arr[9 - 8]
        np.save(path, arr)
        path = os.path.join(data, "shard-00002.npy")
        arr = np.load(path)
        arr[19 - 16] = np.frombuffer(os.urandom(arr[0].nbytes), dtype=np.uint8).reshape(arr[0].shape)
        np.save(path, arr)
        return {15: f"image 15 ({src.names[15]}) of {os.path.join(data, 'shard-00001.npy')}",
                19: f"image 19 ({src.names[19]}) of {os.path.join(data, 'shard-00002.npy')}"}
    paths = [os.path.join(data, n) for n in src.names]
    donor = min(paths[:15], key=os.path.getsize) if kind == "jpeg" else paths[3]
    if kind == "jpeg":
        _same_size_valid(paths[15], donor)
    else:
        shutil.copy(donor, paths[15])  # every .bin has the size of every other: another valid image
    _same_size_random(paths[19])
    return {15: paths[15], 19: paths[19]}


@pytest.mark.parametrize("kind", ["jpeg", "bin", "u8"])
def test_an_image_rewritten_mid_run_with_the_same_size_is_never_scored(kind, assets, redis_url, start_workers,
                                                                      tmp_path):
    """Image 15 overwritten by another valid image of the same size and image 19 by random bytes
    of the same size, after the run was submitted: the shards holding them fail, naming each
    file as changed since the run was submitted; neither is scored, the rest are."""
    data = _data(kind, assets, tmp_path)
    # no host cache: a cached copy of the listed bytes would be scored instead of the changed file
    # (which is right too: what is scored is what was listed), and the change would not be seen
    settings = Settings(broker_url=redis_url, report_dir=str(tmp_path / "rep"), artifact_dir=str(tmp_path / "art"),
                        merge_wait_s=30, host_cache_gb=0)
    w = start_workers(redis_url, backend="sim", sim="rate=8", settings=settings)
    h = submit_evaluation(weights=assets["weights"], data=data, backend="sim", batch_size=4, shard_size=4,
                          queue=w.queue, settings=settings, log=lambda *_: None)
    dataset = h.manifest.job.dataset
    assert dataset.content and dataset.fingerprint == dataset.content[:16]  # the fingerprint covers the bytes
    store = RunStore(redis_url)
    until(lambda: store.ledger.running(h.run_id) or store.ledger.shard_counts(h.run_id)[0], 60, "the worker has listed the data")
    named = _change(kind, data)  # while the worker is at the first shards (4 images at 8 img/s each)
    with pytest.raises(RunError) as e:
        h.wait(progress=False, timeout=180, log=lambda *_: None)
    report = store.runs.report(h.run_id)
    failed = {f["shard_id"]: f["reason"] for f in report.shards_failed}
    assert set(failed) == {"shard-00003", "shard-00004"}, json.dumps(failed, indent=1)  # images [12, 16), [16, 20)
    for sid, i in (("shard-00003", 15), ("shard-00004", 19)):
        assert f"{named[i]} changed since the run was submitted" in failed[sid], failed[sid]
    assert "changed since the run was submitted" in str(e.value)
    pred = store.runs.predictions(h.run_id)
    assert not set(range(12, 20)) & set(pred["indices"]) and set(range(12)) <= set(pred["indices"])
    h.close()
    w.stop()


def test_a_listing_is_hashed_once_and_preprocess_writes_the_digests(assets, tmp_path):
    """The second listing of a folder reads no file (the digest cache, by path, size, mtime and
    inode); `nasq preprocess` writes the digests beside its output, so its folder is listed
    without reading the shards or .bin files; a file rewritten since is hashed again."""
    from nasq.data import digests, open_source

    data = tmp_path / "val"
    shutil.copytree(assets["data"], data)
    cache = str(tmp_path / "art")
    reads = []
    real = digests._file_sha256
    digests._file_sha256 = lambda path: reads.append(path) or real(path)
    try:
        first = open_source(str(data))
        first.with_digests(digests.file_digests(first, digests.cache_for(first.root, cache)))
        assert len(reads) == len(first.names)
        reads.clear()
        second = open_source(str(data))
        second.with_digests(digests.file_digests(second, digests.cache_for(second.root, cache)))
        assert reads == [] and second.content == first.content
        victim = data / second.names[4]
        victim.write_bytes(victim.read_bytes()[::-1])
        third = open_source(str(data))
        third.with_digests(digests.file_digests(third, digests.cache_for(third.root, cache)))
        assert reads == [str(victim)] and third.content != first.content
        from nasq.data.preprocess import preprocess

        for fmt in ("u8", "bin"):
            out = str(tmp_path / fmt)
            preprocess(str(data), out, fmt=fmt, workers=1, shard_size=8, progress=False)
            reads.clear()
            src = open_source(out)
            listed = digests.file_digests(src, digests.cache_for(out, None))
            assert reads == [], fmt  # the digests preprocess wrote
            expected = [hashlib.sha256(src.load(i).tobytes()).digest() if fmt == "u8" else
                        hashlib.sha256(open(os.path.join(out, n), "rb").read()).digest()
                        for i, n in enumerate(src.names) if i not in src.known_errors]
            assert [d for i, d in enumerate(listed) if i not in src.known_errors] == expected, fmt
    finally:
        digests._file_sha256 = real


def test_a_finished_signed_run_replayed_through_redis_changes_nothing(assets, start_workers, tmp_path,
                                                                     signing_settings):
    """With signing on, a merged run's records rewritten by someone without the key (state back
    to running, results, published and rendered records deleted, the run active again): the
    workers' healing runs nothing of it again, a merge sent again merges nothing, the report
    files stay byte for byte, its records are restored from the report, and each worker logs
    the attempt once. A new run id whose record copies the signed manifest is refused."""
    from nasq.queue.app import make_app
    from nasq.queue.redis_server import RedisServer
    from nasq.wire import TASK_MERGE

    with RedisServer(str(tmp_path / "redis")) as url:
        signing = signing_settings(tmp_path)
        rep = tmp_path / "rep"
        settings = Settings(**signing, lease_s=2, merge_wait_s=20, report_dir=str(rep), worker_heartbeat_s=1)
        w = start_workers(url, n=2, backend="sim", sim="rate=200", settings=settings)
        client = Settings(broker_url=url, report_dir=str(rep), artifact_dir=str(tmp_path / "art"), **signing)
        h = submit_evaluation(weights=sim_weights(tmp_path), data="index:64", backend="sim", batch_size=8,
                              shard_size=16, queue=w.queue, settings=client, log=lambda *_: None)
        res = h.wait(progress=False, timeout=120, log=lambda *_: None)
        folder = rep / h.run_id
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        store = RunStore(url)
        attempts, ran = store.ledger.attempts(h.run_id), w.log_text().count(f"of run {h.run_id}: ")
        # the replay: someone who can write to Redis, without the key
        key = f"nasq:run:{h.run_id}:"
        store.r.set(key + "state", json.dumps({"state": "running", "at": time.time(), "shards": 4}))
        store.r.delete(key + "results", key + "published", key + "rendered", key + "finished", key + "report")
        store.r.sadd("nasq:runs:active", h.run_id)
        # and a new run id whose record copies the signed manifest
        copy = f"{h.run_id[:-6]}{uuid.uuid4().hex[:6]}"
        for part in ("manifest", "sealed"):
            store.r.set(f"nasq:run:{copy}:{part}", store.r.get(key + part))
        store.r.set(f"nasq:run:{copy}:state", json.dumps({"state": "running", "at": time.time(), "shards": 4}))
        store.r.sadd("nasq:runs:active", copy)
        app = make_app(Settings(broker_url=url, **signing))
        app.signature(TASK_MERGE, args=([],), kwargs={"run_id": h.run_id}, queue=w.queue).apply_async()
        until(lambda: (store.runs.state(h.run_id) or {}).get("state") == "done", 30, "the records are restored")
        until(lambda: f"run {copy}: refused to act on its record" in w.log_text(), 30, "the copy is refused")
        time.sleep(4 * settings.lease_s)  # rounds of healing on both workers' heartbeats
        assert store.ledger.attempts(h.run_id) == attempts and w.log_text().count(f"of run {h.run_id}: ") == ran
        assert store.ledger.attempts(copy) == {} and store.ledger.shard_results(copy) == {}
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # byte for byte
        assert store.runs.report(h.run_id) == res.report and store.runs.published(h.run_id)
        assert h.run_id not in store.runs.active_runs()
        logged = w.log_text().count(f"run {h.run_id}: its report in")
        assert 1 <= logged <= 2, logged  # once per worker process at most
        h.close()
        app.close()
        w.stop()


_HOOKS = '''
import json, os, time

STEPS, PAUSE = os.environ["NASQ_TEST_STEPS"], float(os.environ["NASQ_TEST_PAUSE"])


def mark(step):
    with open(STEPS, "a") as f:
        f.write(json.dumps([os.getpid(), step]) + "\\n")
    time.sleep(PAUSE)


def around(owner, name, before, after, only=lambda *a, **k: True):
    real = getattr(owner, name)

    def call(*args, **kwargs):
        mine = only(*args, **kwargs)
        if mine:
            mark(before)
        out = real(*args, **kwargs)
        if mine:
            mark(after)
        return out
    setattr(owner, name, call)


import nasq.results.publish as pub
import nasq.results.ending as run
from nasq.queue.records import RunRecords

around(run, "write_staging", "before the numbers", "files written")
around(RunRecords, "transition", "storing the numbers", "done", only=lambda self, run_id, name, **k: name == "merge")
around(pub.os, "rename", "before the rename", "renamed",
       only=lambda *a, **k: "/.staging/" in str(a[0] if a else k.get("src")))
around(pub, "history", "before the history", "in the history")
around(RunRecords, "mark_published", "marking it published", "published")
around(pub, "write_later", "rendering", "rendered")
'''

MOMENTS = ["before the numbers", "files written", "storing the numbers", "done", "before the rename", "renamed",
           "before the history", "in the history", "marking it published", "published", "rendering"]


@pytest.mark.slow  # 20 merges killed: most of a minute
def test_the_merging_worker_killed_at_any_moment_publishes_one_whole_report(redis_url, start_workers, tmp_path):
    """The merging worker's process SIGKILLed at each of 11 moments of the merge (before the
    numbers, between the numbers and the files, after done, around the rename, the history, the
    published mark, the rendering), at 8 of them again, then once more with its whole worker (a
    machine lost right after done): every time the client prints only paths that exist, the
    report is published whole, once, as the client has it, and no staging folder is left."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_HOOKS)
    steps = tmp_path / "steps.jsonl"
    rep = tmp_path / "rep"
    settings = Settings(broker_url=redis_url, report_dir=str(rep), lease_s=2, merge_wait_s=60, worker_heartbeat_s=1)
    env = {"PYTHONPATH": str(hooks), "NASQ_TEST_STEPS": str(steps), "NASQ_TEST_PAUSE": "0.03"}
    queue = f"eval.kills-{uuid.uuid4().hex[:6]}"
    w = start_workers(redis_url, queue, n=2, backend="sim", sim="rate=2000", settings=settings, env=env)
    store, weights, kills = RunStore(redis_url), sim_weights(tmp_path), []

    def seen() -> list:
        return [json.loads(line) for line in steps.read_text().splitlines()] if steps.exists() else []

    def one_run(moment: str, whole: bool = False) -> None:
        start = len(seen())
        h = submit_evaluation(weights=weights, data="index:32", backend="sim", batch_size=8, shard_size=16,
                              queue=queue, settings=settings, log=lambda *_: None)
        client = Waiter(h, timeout=180)
        pid = until(lambda: next((p for p, s in seen()[start:] if s == moment), None), 60, f"the merge at {moment}",
                    every=0.005)
        if whole:  # the worker whose pool process merges, all of it: the other one is left
            parent = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
            os.killpg(next(proc.pid for _, proc, _ in w.procs if proc.pid in (parent, pid)), signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
        kills.append(moment)
        client.join(180)
        assert client.error is None, (moment, client.error)
        res = client.result
        assert res.unpublished is None, moment
        for kind, path in res.report.files.items():  # the client names only files that exist
            assert os.path.basename(path) in res.not_rendered or os.path.isfile(path), (moment, kind, path)
        folder = rep / h.run_id
        assert json.loads((folder / "report.json").read_text()) == res.report.to_payload(), moment
        assert res.report == store.runs.report(h.run_id), moment
        assert [p for p in os.listdir(rep) if p.startswith(h.run_id)] == [h.run_id], moment  # one report
        staging = rep / ".staging"
        assert not staging.exists() or not [p for p in os.listdir(staging) if p.startswith(h.run_id)], moment
        h.close()

    for moment in MOMENTS + MOMENTS[:8]:
        one_run(moment)
    one_run("done", whole=True)
    print(f"{len(kills)} kills: every report published whole, once")
    assert len(kills) >= 20


def _bomb(path) -> None:
    """A PNG of 20000 x 20000 pixels (a few hundred kB): Pillow refuses to decode it."""
    from PIL import Image

    Image.new("1", (20000, 20000)).save(path)


def test_a_decompression_bomb_is_an_excluded_image_or_one_line_and_json_covers_every_ending(
        assets, redis_url, workers, tmp_path, cli):
    data = tmp_path / "val"
    shutil.copytree(assets["data"], data)
    _bomb(data / "ILSVRC2012_val_00000000.png")  # the first file of the folder
    base = ["--queue", workers.queue, "--weights", assets["weights"], "-b", "4", "--no-progress"]
    p = cli(["eval", "--data", str(data), *base, "--json", "-"], broker=redis_url, report_dir=tmp_path / "rep")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)  # --json -: the report alone on stdout (the table went to stderr)
    assert report["state"] == "done" and report["images"] == 20 and report["error_count"] == 4
    bomb = [e for e in report["errors"] if e["name"].endswith(".png")]
    assert bomb and "exceeds limit" in bomb[0]["reason"], report["errors"]
    assert "nasq run" in p.stderr
    only = tmp_path / "only"
    only.mkdir()
    _bomb(only / "a.png")
    p = cli(["eval", "--data", str(only), "--weights", assets["weights"], "--queue", workers.queue], broker=redis_url)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "no usable image" in p.stderr and "too large to decode" in p.stderr
    # a timeout ends the wait, not the run: there is no report to write yet
    quiet = tmp_path / "waited.json"
    p = cli(["eval", "--data", assets["data"], "--weights", assets["weights"], "--no-progress", "--queue",
             f"eval.nobody-{uuid.uuid4().hex[:6]}", "--timeout", "2", "--json", str(quiet)], broker=redis_url,
            report_dir=tmp_path / "rep")
    assert p.returncode == 3 and not quiet.exists() and "nothing is running" in p.stderr, p.stderr


def test_json_is_written_for_failed_and_cancelled_runs(assets, redis_url, start_workers, tmp_path, cli, nasq_cli,
                                                       repo):
    settings = Settings(merge_wait_s=20, shard_max_devices=1, report_dir=str(tmp_path / "rep"))
    w = start_workers(redis_url, backend="sim", sim="fail_after=8", settings=settings)
    out = tmp_path / "failed.json"
    p = cli(["eval", "--data", "index:64", "--weights", sim_weights(tmp_path), "--backend", "sim", "-b", "8",
             "--shard-size", "8", "--queue", w.queue, "--no-progress", "--json", str(out)], broker=redis_url,
            report_dir=tmp_path / "rep")
    assert p.returncode == 3, p.stderr
    failed = json.loads(out.read_text())
    assert failed["state"] == "failed" and failed["images"] == 8 and failed["shards_failed"]
    w.stop()
    slow = start_workers(redis_url, backend="sim", sim="rate=4", settings=settings)
    out, t0 = tmp_path / "cancelled.json", time.time()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NASQ_")}
    env.update(NASQ_BROKER_URL=redis_url, NASQ_REPORT_DIR=str(tmp_path / "rep"))
    proc = subprocess.Popen(nasq_cli + ["eval", "--data", "index:64", "--weights", sim_weights(tmp_path), "--backend",
                                        "sim", "-b", "8", "--shard-size", "8", "--queue", slow.queue, "--no-progress",
                                        "--json", str(out)], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    store = RunStore(redis_url)
    run_id = until(lambda: next((r for r in store.runs.run_ids(5) if store.ledger.running(r)
                                 and ((m := store.runs.manifest(r)) and m.created or 0) >= t0 - 1), None), 60, "the run starts")
    c = cli(["cancel", run_id], broker=redis_url, report_dir=tmp_path / "rep")
    assert c.returncode == 0, c.stderr
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 4, err
    cancelled = json.loads(out.read_text())
    assert cancelled["state"] == "cancelled" and cancelled["run_id"] == run_id
    assert re.search(r"report written to", err)
    slow.stop()
