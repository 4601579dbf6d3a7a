"""Sweeps, run status, run listing, report files and Flower, with real workers."""
import os
import re
import signal
import subprocess
import time
import uuid

import pytest
import requests

from nasq.api import evaluate, submit_evaluation, submit_sweep
from nasq.config import Settings
from nasq.queue.app import make_app
from nasq.queue.store import RunStore

def test_six_point_sweep_with_local_workers_then_rerun_reuses(assets, tmp_path):
    from nasq.config import Settings

    s = Settings(report_dir=str(tmp_path / "reports"), work_dir=str(tmp_path / "runs"),
                 artifact_dir=str(tmp_path / "art"))
    sweep = submit_sweep(batch_sizes=[1, 2, 3, 4, 5, 6], weights=assets["weights"], data=assets["data"], workers=2,
                         min_time_s=0.1, settings=s, log=lambda *_: None)
    first = sweep.status()
    assert first["total"] == 12 and first["reused"] == 0
    sweep.wait(timeout=300)
    assert sweep.cluster is None  # the private workers stopped when the sweep finished
    rep = sweep.report()
    assert len(rep.rows) == 12 and not any(r.get("error") for r in rep.rows)
    for r in rep.rows:
        assert r["img_s"] == pytest.approx(r["batch_size"] * 1000 / r["mean_ms"], rel=1e-3)
        assert r["versions"]["torch"] and r["model_sha256"] and r["dataset_fingerprint"]
    assert {r["worker"].split("@")[0] for r in rep.rows} == {"cpu-0", "cpu-1"}
    for kind in ("json", "csv", "markdown", "throughput", "latency"):
        assert os.path.getsize(rep.files[kind]) > 0, kind
    assert rep.files["throughput"].endswith(".png") and open(rep.files["throughput"], "rb").read(4) == b"\x89PNG"
    assert re.search(r"\|\s*device\s*\|\s*worker\s*\|\s*batch\s*\|", open(rep.files["markdown"]).read())
    t0 = time.time()
    again = submit_sweep(batch_sizes=[1, 2, 3, 4, 5, 6], weights=assets["weights"], data=assets["data"], workers=2,
                         min_time_s=0.1, settings=s, log=lambda *_: None)
    assert again.status()["reused"] == 12 and again.cluster is None
    again.wait(timeout=5)
    assert time.time() - t0 < 5 and len(again.report(str(tmp_path / "again")).rows) == 12


def test_eval_sweep_on_named_workers_with_an_error_row(assets, workers, settings):
    names = workers.names
    ok = submit_sweep(batch_sizes=[2, 4], mode="eval", weights=assets["weights"], data=assets["data"],
                      labels=assets["labels"], devices=names[:1], settings=settings, log=lambda *_: None)
    ok.wait(timeout=120)
    rows = ok.report().rows
    assert sorted(r["batch_size"] for r in rows) == [2, 4]
    assert all(r["top1"] == 100.0 and r["images"] == 20 and r["errors"] == 3 for r in rows)
    # fp16 on a CPU worker cannot run: an error row, the sweep goes on
    bad = submit_sweep(batch_sizes=[1], precision="fp16", weights=assets["weights"], data=assets["data"],
                       devices=names[:1], settings=settings, log=lambda *_: None)
    bad.wait(timeout=60)
    (row,) = bad.report().rows
    assert "runs on CUDA only" in row["error"]
    # the failed load leaves that worker usable (it once kept a stale model key)
    after = submit_sweep(batch_sizes=[3], weights=assets["weights"], data=assets["data"], devices=names[:1],
                         min_time_s=0.1, settings=settings, log=lambda *_: None)
    after.wait(timeout=60)
    assert not after.report().rows[0].get("error")


def test_status_watch_follows_a_run_to_its_report(assets, start_workers, settings, nasq_cli, repo):
    import uuid

    store = RunStore(settings.broker_url)
    queue = f"eval.watch-{uuid.uuid4().hex[:6]}"  # no worker yet: the watcher sees the run running first
    manifest = submit_evaluation(weights=assets["weights"], data=assets["data"], labels=assets["labels"], batch_size=2,
                                 shard_size=2, queue=queue, settings=settings, log=lambda *_: None).manifest
    watcher = subprocess.Popen(nasq_cli + ["status", manifest.run_id, "--watch", "--interval", "0.2",
                                           "--broker", settings.broker_url], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=repo)
    first = watcher.stdout.readline()  # the watcher runs and has seen the run (running, no worker yet)
    w = start_workers(settings.broker_url, queue, n=2)
    try:
        out, err = watcher.communicate(timeout=120)
    finally:
        w.stop()
    out = first + out
    p = subprocess.CompletedProcess(watcher.args, watcher.returncode, out, err)
    assert p.returncode == 0, p.stderr
    lines = [l for l in p.stdout.splitlines() if l.startswith(f"run {manifest.run_id}")]
    assert any("running" in l for l in lines), p.stdout  # seen while it ran
    assert "done" in lines[-1] and "shards 12/12" in p.stdout and "images 23/23" in p.stdout
    assert lines.count(lines[-1]) == 1, p.stdout  # piped: each status line once
    assert "top-1 100.00%" in p.stdout and "report files:" in p.stdout
    report = store.runs.report(manifest.run_id)
    for path in report.files.values():
        assert os.path.getsize(path) > 0
    runs = subprocess.run(nasq_cli + ["runs", "--broker", settings.broker_url], capture_output=True, text=True,
                          cwd=repo, timeout=60)
    assert manifest.run_id in runs.stdout and "done" in runs.stdout


def test_flower_with_auth_shows_the_runs_workers_and_tasks(assets, workers, settings, nasq_cli, repo, tmp_path,
                                                          start_workers):
    from nasq.queue.redis_server import free_port

    refused = subprocess.run(nasq_cli + ["flower", "--broker", settings.broker_url], capture_output=True, text=True,
                             cwd=repo, timeout=60, env={k: v for k, v in os.environ.items() if "FLOWER" not in k})
    assert refused.returncode == 2 and "--basic-auth" in refused.stderr
    port = free_port()
    (tmp_path / "flower-users").write_text("# user:password, one per line\nops:s3cret\n")
    with open(tmp_path / "flower.log", "wb") as log:
        proc = subprocess.Popen(nasq_cli + ["flower", "--broker", settings.broker_url, "--port", str(port),
                                              "--basic-auth-file", str(tmp_path / "flower-users")], stdout=log,
                                stderr=subprocess.STDOUT, cwd=repo, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if requests.get(base + "/healthcheck", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.3)
        else:
            raise AssertionError((tmp_path / "flower.log").read_text())
        # the credentials are in no command line any local user can read (Flower is the exec'd process)
        cmdline = open(f"/proc/{proc.pid}/cmdline", "rb").read()
        assert b"flower" in cmdline and b"s3cret" not in cmdline
        assert requests.get(base + "/api/workers", timeout=5).status_code == 401
        assert requests.get(base + "/api/workers", auth=("ops", "wrong"), timeout=5).status_code == 401
        res = evaluate(weights=assets["weights"], data=assets["data"], labels=assets["labels"], batch_size=4,
                       shard_size=8, queue=workers.queue, settings=settings, progress=False, log=lambda *_: None)
        auth = ("ops", "s3cret")
        ws = requests.get(base + "/api/workers?refresh=1", auth=auth, timeout=30).json()
        assert set(workers.names) <= set(ws)
        conf = ws[workers.names[0]]["conf"]  # each worker's device, backend and precision, in Flower
        assert (conf["nasq_device"], conf["nasq_backend"], conf["nasq_precision"]) == ("cpu", "torch", "fp32")
        deadline, mine = time.time() + 30, {}
        while time.time() < deadline and len(mine) < 4:  # 3 shards + the merge, from task events
            tasks = requests.get(base + "/api/tasks?limit=1000", auth=auth, timeout=10).json()
            mine = {k: t for k, t in tasks.items() if k.startswith(res.run_id)}
            time.sleep(0.5)
        shards = [t for t in mine.values() if t["name"] == "nasq.eval_shard"]
        assert len(shards) == 3 and all(t["state"] == "SUCCESS" for t in shards)
        assert any(f"run={res.run_id} shard-00000 images=[0,8) batch=4" in t["args"] for t in shards)
        info = requests.get(base + f"/api/task/info/{shards[0]['uuid']}", auth=auth, timeout=10).json()
        assert info["worker"] in ws
        _failed_shards_are_failure_in_flower(base, auth, assets, workers, settings, start_workers)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)


def _failed_shards_are_failure_in_flower(base, auth, assets, workers, settings, start_workers):
    """A shard that fails is FAILURE in Flower (so an alert on failed tasks fires), while the
    partial report and `nasq resume` still work. The failing shards are the ones an
    onnxruntime worker on the torch run's queue takes: it refuses them, and with
    shard_max_devices=1 a shard fails for good on the first device it fails on."""
    from nasq.api import resume
    from nasq.errors import RunError

    once = Settings(shard_max_devices=1, merge_wait_s=20)
    queue = f"eval.flower-{uuid.uuid4().hex[:6]}"
    good = start_workers(settings.broker_url, queue, settings=once)
    wrong = start_workers(settings.broker_url, queue, backend="onnxruntime", settings=once)
    # a worker that joins while Flower runs sends task events once Flower asks (its enable_events
    # timer, every 5 s); asked here at once, as `nasq flower` asks the workers up when it starts
    app = make_app(settings)
    app.control.enable_events()
    app.close()
    try:
        with pytest.raises(RunError, match="shard.* failed") as e:
            evaluate(weights=assets["weights"], data=assets["data"], labels=assets["labels"], batch_size=2,
                     shard_size=2, queue=queue, settings=settings, progress=False, log=lambda *_: None)
    finally:
        wrong.stop()
    run_id = next(r for r in RunStore(settings.broker_url).runs.run_ids(5) if r in str(e.value))
    store = RunStore(settings.broker_url)
    partial = store.runs.report(run_id)
    bad = partial.shards_not_ok
    assert partial.partial and bad and partial.shards_ok == 12 - len(bad)
    deadline, states = time.time() + 30, {}
    while time.time() < deadline and len(states) < 12:
        tasks = requests.get(base + "/api/tasks?limit=2000", auth=auth, timeout=10).json()
        states = {t["args"].split()[1]: t["state"] for k, t in tasks.items()
                  if k.startswith(run_id) and t["name"] == "nasq.eval_shard" and t.get("args")}
        time.sleep(0.5)
    assert {sid for sid, st in states.items() if st == "FAILURE"} == set(bad), states
    assert all(states[sid] == "SUCCESS" for sid in states if sid not in bad)
    done = resume(run_id, settings=settings, progress=False, log=lambda *_: None)
    assert not done.report.partial and done.report.images == 20 and done.report.top1 == 100.0
    # each attempt is a task of its own: the failed one stays FAILURE, the resumed one is a new SUCCESS
    deadline, attempts = time.time() + 30, {}
    while time.time() < deadline and len(attempts) < 12 + len(bad):
        tasks = requests.get(base + "/api/tasks?limit=2000", auth=auth, timeout=10).json()
        attempts = {k: t["state"] for k, t in tasks.items() if k.startswith(run_id) and t["name"] == "nasq.eval_shard"}
        time.sleep(0.5)
    for sid in bad:
        assert attempts.get(f"{run_id}:{sid}") == "FAILURE" and attempts.get(f"{run_id}:{sid}:2") == "SUCCESS", attempts
    good.stop()
