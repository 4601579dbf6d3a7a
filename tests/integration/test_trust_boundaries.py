"""Hostile messages sent straight to Redis, message signing, and device pinning under an
inherited CUDA_VISIBLE_DEVICES: real Redis, real worker processes."""
import os
import shutil
import time
import uuid

import pytest
import redis

from nasq.config import Settings
from nasq.queue.app import make_app
from nasq.wire import TASK_EVAL_SHARD, TASK_SWEEP_POINT, worker_queue

SECRET = "TOPSECRET-5f1c"


@pytest.fixture
def fenced(assets, tmp_path):
    """A data folder with 8 images, labels and weights (the worker's only read root), an output
    folder (its only write root), a secret outside both, and a label file inside the data folder
    that is a link to the secret."""
    data, out, secret = tmp_path / "data", tmp_path / "out", tmp_path / "secret"
    for d in (data / "val", out, secret):
        d.mkdir(parents=True)
    names = assets["names"][:8]
    for n in names:
        shutil.copy(os.path.join(assets["data"], n), data / "val" / n)
    labels = {line.split()[0]: line for line in open(assets["labels"])}
    (data / "val_label.txt").write_text("".join(labels[n] for n in names))
    shutil.copy(assets["weights"], data / "w.pth")
    (secret / "shadow").write_text(f"admin:{SECRET}:19000:0:99999:7:::\n")
    (data / "labels_link.txt").symlink_to(secret / "shadow")
    return {"data": data, "out": out, "secret": secret, "names": names}


def _job(fenced, **change):
    from nasq.data.sources import open_source
    from nasq.model.spec import ModelRef
    from nasq.wire import DatasetRef, EvalJob

    src = open_source(str(fenced["data"] / "val"))
    job = EvalJob(dataset=DatasetRef(**src.describe()), labels=str(fenced["data"] / "val_label.txt"),
                  model=ModelRef(str(fenced["data"] / "w.pth")), backend="torch", batch_size=4).to_payload()
    for k, v in change.items():
        if k.startswith("dataset."):
            job["dataset"][k.split(".", 1)[1]] = v
        elif k == "weights":
            job["model"]["weights"] = v
        else:
            job[k] = v
    return job


def _values(r: redis.Redis, pattern: str) -> str:
    """Everything Redis holds under keys matching ``pattern``, as text."""
    text = []
    for key in r.scan_iter(pattern, count=1000):
        kind = r.type(key).decode()
        value = {"string": lambda: r.get(key), "hash": lambda: r.hgetall(key), "list": lambda: r.lrange(key, 0, -1),
                 "set": lambda: r.smembers(key), "zset": lambda: r.zrange(key, 0, -1)}.get(kind, lambda: b"")()
        text.append(repr(value))
    return "\n".join(text)


def test_hostile_messages_are_refused_and_the_worker_then_serves_a_real_run(fenced, redis_url, start_workers, tmp_path):
    from nasq.api import evaluate, evaluate_local

    settings = Settings(read_roots=str(fenced["data"]), write_roots=str(fenced["out"]), merge_wait_s=20,
                        report_dir=str(tmp_path / "reports"))
    w = start_workers(redis_url, settings=settings)
    app = make_app(Settings(broker_url=redis_url))
    tag = f"hostile-{uuid.uuid4().hex[:8]}"
    elsewhere = tmp_path / "elsewhere"
    val = str(fenced["data"] / "val")
    cases = [  # (what, message, a word of the refusal)
        ("labels /etc/shadow", (0, 4, _job(fenced, labels="/etc/shadow")), "outside this worker's read roots"),
        ("labels: a link out of the root", (0, 4, _job(fenced, labels=str(fenced["data"] / "labels_link.txt"))),
         "resolves to"),
        ("labels: a path with ..", (0, 4, _job(fenced, labels=f"{val}/../../secret/shadow")), "read roots"),
        ("data /etc", (0, 4, _job(fenced, **{"dataset.root": "/etc"})), "data folder /etc is outside"),
        ("weights /etc/passwd", (0, 4, _job(fenced, weights="/etc/passwd")), "weights /etc/passwd is outside"),
        ("output /", (0, 4, _job(fenced, output={"dir": "/", "fmt": "NPY"})), "output folder / is outside"),
        ("output elsewhere", (0, 4, _job(fenced, output={"dir": str(elsewhere), "fmt": "NPY"})), "write roots"),
        ("negative start", (-4, 4, _job(fenced)), "start must be an integer in [0,"),
        ("stop past the data", (4, 12, _job(fenced)), "past the dataset"),
        ("a huge range", (0, 10**12, _job(fenced, **{"dataset.images": 10**12})), "must be an integer in"),
        ("a huge claimed dataset", (0, 100_000, _job(fenced, **{"dataset.images": 10_000_000})),
         "past the 8 images"),
        ("relative labels", (0, 4, _job(fenced, labels="val_label.txt")), "not an absolute path"),
    ]
    results = []
    for i, (what, (start, stop, job), word) in enumerate(cases):
        r = app.send_task(TASK_EVAL_SHARD, args=(f"{tag}-{i}", f"shard-{i}", start, stop, job), queue=w.queue,
                          task_id=f"{tag}-{i}:shard")
        results.append((what, r, word))
    # a sweep point writing outside every root, on the worker's own queue
    point = {"sweep_id": tag, "point_id": f"{w.names[0]}|bs4", "folder": str(elsewhere / "sweep"),
             "worker": w.names[0], "batch_size": 4, "mode": "bench", "backend": "torch", "precision": "fp32",
             "weights": str(fenced["data"] / "w.pth"), "data": val, "dataset_fingerprint": "x", "min_time_s": 0.1}
    results.append(("sweep folder elsewhere", app.send_task(TASK_SWEEP_POINT, args=(point,),
                                                              queue=worker_queue(w.names[0]), task_id=f"{tag}-sweep"),
                    "sweep folder"))
    results.append(("garbage arguments", app.send_task(TASK_EVAL_SHARD, args=("x",), queue=w.queue,
                                                       task_id=f"{tag}-garbage"), "missing"))
    for what, r, word in results:
        r.get(timeout=120, propagate=False)
        assert r.state == "FAILURE", what
        assert word in str(r.result), (what, str(r.result))
        assert SECRET not in str(r.result)
    # nothing read out, nothing written outside the roots
    store = redis.Redis.from_url(redis_url)
    assert SECRET not in _values(store, f"*{tag}*")
    assert SECRET not in w.log_text()
    assert not elsewhere.exists() and os.listdir(fenced["out"]) == []
    assert not [p for p in os.listdir("/") if p.endswith("_0.npy")]
    # the same worker, still up, serves a real run exactly
    res = evaluate(weights=str(fenced["data"] / "w.pth"), data=val, labels=str(fenced["data"] / "val_label.txt"),
                   batch_size=4, queue=w.queue, settings=Settings(broker_url=redis_url, report_dir=settings.report_dir),
                   output_dir=str(fenced["out"] / "logits"), progress=False, log=lambda *_: None)
    ref = evaluate_local(weights=str(fenced["data"] / "w.pth"), data=val, labels=str(fenced["data"] / "val_label.txt"),
                         batch_size=4)
    assert res.report.images == 8 and res.report.top1 == 100.0
    assert res.predictions["top5"] == ref["top5"] and res.predictions["names"] == ref["names"]
    assert len(os.listdir(fenced["out"] / "logits")) == 8
    # the worker log: one line per shard, never its full result
    import re

    log = w.log_text()
    assert re.search(rf"shard-\d+ of run {res.run_id}: \d+ images \(0 unusable\) in [\d.]+ s, [\d.]+ img/s on cpu", log)
    assert "'top5': [" not in log and "'scores'" not in log and "'indices'" not in log


def test_the_client_refuses_a_run_no_live_worker_may_read(fenced, redis_url, start_workers, assets):
    from nasq.api import submit_evaluation
    from nasq.errors import NasqError

    w = start_workers(redis_url, settings=Settings(read_roots=str(fenced["data"]), write_roots=str(fenced["out"])))
    with pytest.raises(NasqError, match="no live worker on .* may use this run's paths.*outside this worker's read"):
        submit_evaluation(weights=assets["weights"], data=assets["data"], labels=assets["labels"], queue=w.queue,
                          settings=Settings(broker_url=redis_url), log=lambda *_: None)


def test_signed_messages_run_and_unsigned_or_foreign_ones_are_refused(assets, redis_url, start_workers, tmp_path,
                                                                      keypair):
    from nasq.api import evaluate, evaluate_local

    store, keys = tmp_path / "trusted", tmp_path / "keys"
    store.mkdir()
    keys.mkdir()
    wkey, wcert = keypair(keys, "worker")
    ckey, ccert = keypair(keys, "client")
    xkey, xcert = keypair(keys, "intruder")  # a valid key pair whose certificate is not trusted
    for c in (wcert, ccert):
        shutil.copy(c, store)
    signed = dict(signing_cert_store=str(store))
    w = start_workers(redis_url, settings=Settings(signing_key=wkey, signing_cert=wcert, merge_wait_s=20, **signed))
    client = Settings(broker_url=redis_url, signing_key=ckey, signing_cert=ccert, report_dir=str(tmp_path / "rep"),
                      **signed)
    res = evaluate(weights=assets["weights"], data=assets["data"], labels=assets["labels"], batch_size=4,
                   shard_size=8, queue=w.queue, settings=client, progress=False, log=lambda *_: None)
    ref = evaluate_local(weights=assets["weights"], data=assets["data"], labels=assets["labels"], batch_size=4)
    assert res.report.images == 20 and res.predictions["top5"] == ref["top5"]
    # unsigned (plain JSON) and signed by an untrusted key: neither runs
    marker = tmp_path / "ran"
    job = {"dataset": {"root": "/nowhere", "kind": "jpeg", "images": 1, "fingerprint": "x"}, "labels": str(marker),
           "model": {"weights": "/x.pth"}, "backend": "torch", "batch_size": 1}
    plain = make_app(Settings(broker_url=redis_url))
    foreign = make_app(Settings(broker_url=redis_url, signing_key=xkey, signing_cert=xcert,
                                signing_cert_store=str(keys / "intruder.pem")))
    sent = [a.send_task(TASK_EVAL_SHARD, args=("unsigned", "s", 0, 1, job), queue=w.queue, task_id=f"u-{uuid.uuid4()}")
            for a in (plain, foreign)]
    deadline = time.time() + 60
    while time.time() < deadline and not ("Refusing to deserialize" in w.log_text()
                                          and "Unknown certificate" in w.log_text()):
        time.sleep(0.5)
    log = w.log_text()
    assert "Refusing to deserialize untrusted content of type json" in log
    assert "Unknown certificate: b'intruder" in log
    for r in sent:  # refused when decoded: discarded, so never started
        assert r.state == "PENDING"  # never started: no result, no failure recorded by a task
    # the worker is still up and still serves signed runs
    assert make_app(client).control.ping(destination=w.names, timeout=5)


def test_inherited_cuda_visible_devices_pin_workers_to_the_physical_gpus(redis_url, tmp_path):
    """Embedded mode under CUDA_VISIBLE_DEVICES=2,3 (as SLURM sets it): the workers for cuda:0
    and cuda:1 are pinned to GPUs 2 and 3 (simulated devices: no GPU is needed to pin)."""
    from nasq.queue.local import LocalCluster, WorkerSpec
    from nasq.queue.store import RunStore

    q = f"eval.pin-{uuid.uuid4().hex[:6]}"
    specs = [WorkerSpec(device=d, backend="sim", queues=(q,), name=f"pin{i}-{q}@localhost")
             for i, d in enumerate(("cuda:0", "cuda:1"))]
    with LocalCluster(specs, workdir=str(tmp_path / "w"), broker_url=redis_url, settings=Settings(),
                      env={"CUDA_VISIBLE_DEVICES": "2,3"}, log=lambda *_: None) as url:
        workers = RunStore(url).registry.workers()
        assert {workers[s.name]["device"]: workers[s.name]["physical_device"] for s in specs} == {"cuda:0": "2",
                                                                                                  "cuda:1": "3"}
