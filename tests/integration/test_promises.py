"""The promises of "When things fail", each kept with the fault done for real: a worker hung past
its lease that comes back, a cancel with shards running, a resume of a live run and of a run
with a failed shard, a broker at maxmemory, a report dir on a full disk, inputs rewritten under
a run, and (with message signing on) runs the workers must not act on. Real Redis, real worker
processes; the SIMULATED backend where only the queue matters (it sleeps instead of computing)."""
import json
import os
import re
import signal
import subprocess
import time
import uuid
from urllib.parse import urlsplit

import pytest

from nasq.api import evaluate_local, submit_evaluation
from nasq.config import Settings
from nasq.errors import RunError
from nasq.queue.redis_server import spawn_redis, stop_process
from nasq.queue.store import RunStore
from nasq.queue.transport import BrokerView
from nasq.results.status import render_status, run_status
from waiting import Waiter, sim_reference, sim_weights, until


# ------------------------------------------------------------------------------ a hung worker comes back

def test_a_worker_hung_past_its_lease_that_comes_back_changes_nothing(assets, redis_url, start_workers, tmp_path):
    """SIGSTOP a worker (main process and pool child) while it runs a shard, past its lease: the
    shard runs again elsewhere and the client gets its report. SIGCONT: the hung copy stops or is
    dropped, and counted; the report the client got, the one in Redis and the files are the same."""
    rep = tmp_path / "rep"
    fast = Settings(broker_url=redis_url, lease_s=3, merge_wait_s=30, report_dir=str(rep))
    w = start_workers(redis_url, f"eval.hung-{uuid.uuid4().hex[:6]}", n=2, settings=fast)
    victim_name, victim = w.names[0], w.procs[0][1]
    store = RunStore(redis_url)
    h = submit_evaluation(weights=assets["weights"], data=assets["data"], labels=assets["labels"], batch_size=4,
                          shard_size=4, queue=w.queue, settings=fast, log=lambda *_: None)
    client = Waiter(h, timeout=180)
    held = until(lambda: [sid for sid, r in store.ledger.running(h.run_id).items() if r["worker"] == victim_name],
                  60, "the victim takes a shard", every=0.01)[0]
    os.killpg(victim.pid, signal.SIGSTOP)
    try:
        client.join(180)
        assert client.error is None, client.error
        report = client.result.report
        assert store.ledger.redispatched(h.run_id).get(held) == 1  # it ran again elsewhere
    finally:
        os.killpg(victim.pid, signal.SIGCONT)  # the machine comes back
    until(lambda: store.ledger.dropped(h.run_id), 60, "the hung copy is dropped and counted")
    # its task returned, so the chord fired its merge (the last part came in): that merge changes nothing
    until(lambda: f"run {h.run_id}: not merged again" in w.log_text(), 60, "the chord's late merge runs")
    assert store.ledger.dropped(h.run_id) == {held: 1}
    assert store.runs.report(h.run_id) == report  # Redis keeps the report the client got ...
    with open(report.files["json"]) as f:
        assert json.load(f) == report.to_payload()  # ... and so do the files
    assert report.images == 20 and report.top1 == 100.0 and report.redispatched_shards == {held: 1}
    assert run_status(store, h.run_id)["duplicate_shard_results_dropped"] == [held]
    assert victim.poll() is None  # the worker lives on
    log = w.log_text()
    assert re.search(rf"{held} of run {h.run_id} (stopped on {re.escape(victim_name)}|: this copy's result was dropped)",
                     log), log[-3000:]
    assert len(re.findall(rf"run {h.run_id} merged", log)) == 1, "merged more than once"
    h.close()


def test_a_shard_longer_than_its_lease_stays_with_its_live_worker(redis_url, start_workers, tmp_path):
    """A shard of 8 s with batches of 2 s under a 2 s lease: its worker renews the lease while it
    runs, so nothing takes the shard from it."""
    settings = Settings(broker_url=redis_url, report_dir=str(tmp_path / "rep"), lease_s=2)
    w = start_workers(redis_url, n=2, backend="sim", sim="rate=2", settings=settings)
    store = RunStore(redis_url)
    h = submit_evaluation(weights=sim_weights(tmp_path), data="index:32", backend="sim", batch_size=4,
                          shard_size=16, queue=w.queue, settings=settings, log=lambda *_: None)
    res = h.wait(progress=False, timeout=120, log=lambda *_: None)
    assert res.report.images == 32 and res.report.redispatched_shards == {}
    assert store.ledger.attempts(h.run_id) == {"shard-00000": 1, "shard-00001": 1} and store.ledger.dropped(h.run_id) == {}
    assert "could not renew" not in w.log_text()
    h.close()


# ------------------------------------------------------------------------------ cancel

def test_cancel_stops_running_shards_and_nothing_merges_after(redis_url, start_workers, tmp_path, nasq_cli, repo):
    rep = tmp_path / "rep"
    settings = Settings(broker_url=redis_url, report_dir=str(rep), lease_s=5)
    w = start_workers(redis_url, n=2, backend="sim", sim="rate=4", settings=settings)  # 8 s per shard of 32
    store = RunStore(redis_url)
    h = submit_evaluation(weights=sim_weights(tmp_path), data="index:384", backend="sim", batch_size=4,
                          shard_size=32, queue=w.queue, settings=settings, log=lambda *_: None)
    client = Waiter(h)
    until(lambda: len(store.ledger.running(h.run_id)) == 2, 60, "both workers run a shard")
    until(lambda: store.ledger.images_done(h.run_id) >= 8, 60, "the shards are under way")
    running = set(store.ledger.running(h.run_id))
    env = {k: v for k, v in os.environ.items() if not k.startswith("NASQ_")}
    t0 = time.time()
    p = subprocess.run(nasq_cli + ["cancel", h.run_id, "--broker", redis_url], capture_output=True, text=True,
                       cwd=repo, env=dict(env, NASQ_REPORT_DIR=str(rep)), timeout=120)
    took = time.time() - t0
    assert p.returncode == 0, p.stderr
    st = run_status(store, h.run_id)  # at once: nothing of the run shows as running
    assert st["state"] == "cancelled" and not any(w_.get("current") for w_ in st["workers"].values()), st
    client.join(30)
    assert isinstance(client.error, RunError) and "cancelled" in str(client.error)
    # the running shards stop within seconds, saying so (revoked and terminated, or stopped at their next batch)
    log = until(lambda: w.log_text() if all(
        re.search(rf"(Terminating {h.run_id}:{sid}|{sid} of run {h.run_id} stopped on .*: the run was cancelled)",
                  w.log_text()) for sid in running) else None, 30, "both running shards stop")
    kept = store.ledger.shard_results(h.run_id)
    broker = BrokerView(redis_url)  # the revoked messages are taken and discarded: none is left to run
    until(lambda: not broker.queued(w.queue) and not any(t.startswith(h.run_id) for t in broker.unacked_ages()),
           60, "the queue is drained")
    assert store.ledger.shard_results(h.run_id) == kept  # nothing accepted after the cancel
    assert store.runs.state(h.run_id)["state"] == "cancelled"
    assert f"run {h.run_id} merged" not in w.log_text()
    assert all(proc.poll() is None for _, proc, _ in w.procs)
    print(f"cancel returned in {took:.1f} s; workers said:",
          [line for line in log.splitlines() if h.run_id in line and ("stopped" in line or "Terminating" in line)])
    h.close()


# ------------------------------------------------------------------------------ resume

def test_resume_of_a_live_run_resubmits_nothing(redis_url, start_workers, tmp_path):
    settings = Settings(broker_url=redis_url, report_dir=str(tmp_path / "rep"), lease_s=5)
    w = start_workers(redis_url, n=1, backend="sim", sim="rate=40", settings=settings)
    store = RunStore(redis_url)
    weights = sim_weights(tmp_path)
    h = submit_evaluation(weights=weights, data="index:480", backend="sim", batch_size=4, shard_size=40,
                          queue=w.queue, settings=settings, log=lambda *_: None)
    until(lambda: store.ledger.running(h.run_id), 60, "a shard runs")
    from nasq.api import resume

    said = []
    done = resume(h.run_id, settings=settings, progress=False, timeout=120, log=said.append)
    assert any("nothing to resubmit" in s for s in said), said
    assert done.report.images == 480 and done.report.shards == 12
    assert set(store.ledger.attempts(h.run_id).values()) == {1}  # every shard ran once
    assert store.ledger.dropped(h.run_id) == {} and store.ledger.redispatched(h.run_id) == {}
    ref = sim_reference(weights, 480, 4)
    assert done.predictions["top5"] == ref["top5"]
    h.close()


def test_resume_of_a_run_with_failed_shards_reruns_exactly_those(assets, redis_url, start_workers, tmp_path):
    """Two workers on the run's queue, one of which may not read the data: every shard it takes
    fails (naming its roots; with shard_max_devices=1 a shard fails for good on its first device)
    and the run fails. With it gone, resume reruns exactly the failed shards; the rest are kept."""
    queue = f"eval.resume-{uuid.uuid4().hex[:6]}"
    settings = Settings(broker_url=redis_url, report_dir=str(tmp_path / "rep"), merge_wait_s=20, shard_max_devices=1)
    good = start_workers(redis_url, queue, settings=settings)
    bad = start_workers(redis_url, queue, settings=Settings(read_roots=str(tmp_path / "nothing-here"),
                                                             write_roots=str(tmp_path), merge_wait_s=20,
                                                             shard_max_devices=1))
    store = RunStore(redis_url)
    h = submit_evaluation(weights=assets["weights"], data=assets["data"], labels=assets["labels"], batch_size=4,
                          shard_size=4, queue=queue, settings=settings, log=lambda *_: None)
    with pytest.raises(RunError, match="outside"):
        h.wait(progress=False, timeout=120, log=lambda *_: None)
    bad.stop()
    failed = {sid for sid, f in store.ledger.finished(h.run_id).items() if f["status"] == "error"}
    kept = set(store.ledger.shard_results(h.run_id))
    assert failed and failed | kept == set(h.manifest.shard_ids), (failed, kept)
    from nasq.api import resume

    t = time.time()
    said = []
    done = resume(h.run_id, settings=settings, progress=False, timeout=120, log=said.append)
    rerun = {sid for sid, f in store.ledger.finished(h.run_id).items() if f.get("finished_at", 0) > t}
    assert rerun == failed, (rerun, failed, said)
    why = store.ledger.redispatched_why(h.run_id)  # status says who sent them again: the resume
    assert set(why) == failed and all(w.startswith("nasq resume") for w in why.values()), why
    assert "dispatched again: " in render_status(run_status(store, h.run_id))
    assert done.report.images == 20 and done.report.top1 == 100.0 and not done.report.partial
    ref = evaluate_local(weights=assets["weights"], data=assets["data"], labels=assets["labels"], batch_size=4)
    assert done.predictions["top5"] == ref["top5"]
    h.close()
    good.stop()


# ------------------------------------------------------------------------------ a full broker

@pytest.mark.slow
def test_a_broker_at_maxmemory_stops_no_worker_and_the_run_completes(start_workers, tmp_path, nasq_cli, repo):
    proc, url = spawn_redis(["--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction", "--dir",
                             str(tmp_path)])
    try:
        settings = Settings(broker_url=url, report_dir=str(tmp_path / "rep"), lease_s=4, merge_wait_s=60)
        w = start_workers(url, n=2, backend="sim", sim="rate=40", settings=settings)
        store = RunStore(url)
        weights = sim_weights(tmp_path)
        h = submit_evaluation(weights=weights, data="index:1200", backend="sim", batch_size=4, shard_size=40,
                              queue=w.queue, settings=settings, log=lambda *_: None)
        client = Waiter(h)
        until(lambda: store.ledger.images_done(h.run_id) >= 200, 60, "the run is under way")
        used = store.r.info("memory")["used_memory"]  # full, now, and by a margin that the clients'
        store.r.config_set("maxmemory", max(used // 2, used - 1_000_000))  # buffers coming and going do not undo
        until(lambda: any("the broker is full" in s for s in client.said), 30, "the client says the broker is full")
        env = {k: v for k, v in os.environ.items() if not k.startswith("NASQ_")}
        p = subprocess.run(nasq_cli + ["status", h.run_id, "--broker", url, "--debug"], capture_output=True, text=True,
                           cwd=repo, env=env, timeout=60)
        assert "BROKER FULL" in p.stdout and "maxmemory" in p.stdout, p.stdout + p.stderr
        assert "blocked: the broker is full" in p.stdout and "gone (no heartbeat)" not in p.stdout, p.stdout
        stuck = store.ledger.images_done(h.run_id)
        time.sleep(2 * settings.lease_s)  # full for longer than a lease: workers hit it, leases come due
        assert all(proc_.poll() is None for _, proc_, _ in w.procs), w.log_text()[-3000:]
        assert client.result is None and client.error is None  # the client waits
        store.r.config_set("maxmemory", 0)  # memory freed
        client.join(180)
        assert client.error is None, client.error
        report = client.result.report
        assert report.images == 1200 and stuck < 1200
        ref = sim_reference(weights, 1200, 4)
        assert client.result.predictions["top5"] == ref["top5"]
        assert all(proc_.poll() is None for _, proc_, _ in w.procs)
        assert "the broker is full" in w.log_text() and "Unrecoverable error" not in w.log_text()
        h.close()
        w.stop()
    finally:
        stop_process(proc)


def test_a_broker_that_fills_during_the_pipelined_submission_says_so_and_names_resume(tmp_path):
    """A run's shard messages go out in one pipelined write: a broker that reaches maxmemory while
    they go out (the write's own buffer counts) ends the submission saying the broker is full and
    naming `nasq resume`, not "the broker went away" or an internal error."""
    from nasq.queue.store import BrokerFull

    proc, url = spawn_redis(["--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction", "--dir",
                             str(tmp_path)])
    try:
        store = RunStore(url)
        settings = Settings(broker_url=url, report_dir=str(tmp_path / "rep"), work_dir=str(tmp_path / "runs"),
                            artifact_dir=str(tmp_path / "art"), read_roots=str(tmp_path))
        weights = sim_weights(tmp_path)
        # room for the run's record, not for its 600 shard messages (about 1 kB each)
        store.r.config_set("maxmemory", store.r.info("memory")["used_memory"] + 400_000)
        with pytest.raises(BrokerFull) as e:
            submit_evaluation(weights=weights, data="index:4800", backend="sim", batch_size=8, shard_size=8,
                              queue="eval.nobody", settings=settings, log=lambda *_: None)
        assert "could not be submitted whole" in str(e.value) and "nasq resume" in str(e.value), e.value
        assert "went away" not in str(e.value)
        assert BrokerView(url).queued("eval.nobody") < 600  # not every message was taken
    finally:
        stop_process(proc)


# ------------------------------------------------------------------------------ a full report dir

def test_a_report_dir_on_a_full_disk_is_named_and_every_sentence_is_true(assets, redis_url, start_workers, tmp_path,
                                                                        nasq_cli, repo):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.fail(f"a 64 KiB tmpfs is the full disk of this test; mount needs root: {mounted.stderr.decode()}")
    try:
        w = start_workers(redis_url, settings=Settings(report_dir=str(disk / "reports"), merge_wait_s=20))
        env = {k: v for k, v in os.environ.items() if not k.startswith("NASQ_")}
        p = subprocess.run(nasq_cli + ["eval", "--broker", redis_url, "--queue", w.queue, "--weights",
                                       assets["weights"], "--data", assets["data"], "--labels", assets["labels"], "-b",
                                       "4", "--no-progress"], capture_output=True, text=True, cwd=repo, env=env,
                           timeout=300)
        assert p.returncode == 0, p.stderr  # the numbers are complete
        run_id = re.search(r"run (\S+): 23 images", p.stderr).group(1)
        written = re.findall(r"run report \((\w+)\): (\S+)", p.stderr)
        for _, path in written:
            assert os.path.isfile(path), path
        missing = re.search(r"not written by the merging worker: (.+) \(", p.stderr)
        assert missing, p.stderr  # 64 KiB do not hold the plots and the page
        folder = disk / "reports" / run_id
        for name in missing.group(1).split(", "):
            assert not (folder / name).exists(), name
        store = RunStore(redis_url)
        kept = store.runs.report(run_id)
        # what was not written: the files of the report (in it) and the plots and page rendered after
        # the numbers (in the run's rendered record), as the client said
        said = set(missing.group(1).split(", "))
        assert kept.images == 20 and said == set(kept.files_not_written) | set(store.runs.not_rendered(run_id))
        assert "in Redis" in p.stderr and "no space left on device" in p.stderr.lower()
        if (folder / "report.json").exists():  # the report on disk is the one in Redis
            assert json.loads((folder / "report.json").read_text()) == kept.to_payload()
            assert f"the report is in {folder / 'report.json'}" in p.stderr
        # --json onto the full disk: one line that says where the report is, and is true
        p = subprocess.run(nasq_cli + ["eval", "--broker", redis_url, "--queue", w.queue, "--weights",
                                       assets["weights"], "--data", assets["data"], "--labels", assets["labels"], "-b",
                                       "4", "--no-progress", "--json", str(disk / "r.json")],
                           capture_output=True, text=True, cwd=repo, env=env, timeout=300)
        assert p.returncode == 2 and "No space left on device" in p.stderr.splitlines()[-1], p.stderr
        assert "report dir" not in p.stderr.splitlines()[-1]
        w.stop()
    finally:
        subprocess.run(["umount", "-l", str(disk)])


# ------------------------------------------------------------------------------ inputs changed under a run

def test_labels_rewritten_mid_run_fail_the_shards_that_would_mix_them(assets, redis_url, start_workers, tmp_path):
    labels = tmp_path / "val_label.txt"
    labels.write_text(open(assets["labels"]).read())
    w = start_workers(redis_url, backend="sim", sim="rate=8")  # the simulated device reads the real images
    store = RunStore(redis_url)
    settings = Settings(broker_url=redis_url, report_dir=str(tmp_path / "rep"))
    h = submit_evaluation(weights=assets["weights"], data=assets["data"], labels=str(labels), backend="sim",
                          batch_size=4, shard_size=4, queue=w.queue, settings=settings, log=lambda *_: None)
    until(lambda: store.ledger.shard_counts(h.run_id)[0] >= 1, 60, "a shard finishes")
    lines = labels.read_text().splitlines()
    labels.write_text("".join(f"{line.split()[0]} {(int(line.split()[1]) + 1) % 1000}\n" for line in lines))
    with pytest.raises(RunError, match="label file .* changed since the run was submitted"):
        h.wait(progress=False, timeout=120, log=lambda *_: None)
    st = store.runs.state(h.run_id)
    assert st["state"] == "failed" and "changed since the run was submitted" in st["error"]
    # a shard reads the labels once, when it starts: each one started before the rewrite (old labels
    # throughout) or failed
    for sid, f in store.ledger.finished(h.run_id).items():
        assert f["status"] == "error" or f["started_at"] < os.path.getmtime(labels), sid
    h.close()


# ------------------------------------------------------------------------------ signing: what workers act on

def test_with_signing_on_unsigned_and_forged_runs_are_never_executed(assets, start_workers, tmp_path, keypair):
    """A deployment with signing on (its own Redis): workers heal only runs whose record is signed."""
    from nasq.queue.redis_server import RedisServer

    with RedisServer(str(tmp_path / "redis")) as redis_url:
        _unsigned_and_forged_runs(assets, redis_url, start_workers, tmp_path, keypair)


def _unsigned_and_forged_runs(assets, redis_url, start_workers, tmp_path, keypair):
    trusted, keys = tmp_path / "trusted", tmp_path / "keys"
    trusted.mkdir()
    keys.mkdir()
    wkey, wcert = keypair(keys, "worker")
    import shutil

    shutil.copy(wcert, trusted)
    out = tmp_path / "out"
    out.mkdir()
    signed = Settings(signing_key=wkey, signing_cert=wcert, signing_cert_store=str(trusted), lease_s=2,
                      merge_wait_s=20, write_roots=str(tmp_path))
    w = start_workers(redis_url, n=2, settings=signed)
    store = RunStore(redis_url)
    # a client without the signing key: its messages are refused, and its record is not healed into execution
    h = submit_evaluation(weights=assets["weights"], data=assets["data"], labels=assets["labels"], batch_size=4,
                          shard_size=8, queue=w.queue, settings=Settings(broker_url=redis_url, lease_s=2),
                          output_dir=str(out), log=lambda *_: None)
    # a run record written into Redis by hand (no message at all), naming a folder in the workers' write roots
    forged = dict(h.manifest.to_payload(), run_id="forged-" + uuid.uuid4().hex[:6])
    forged["output"] = {"dir": str(out / "forged"), "fmt": "NPY"}
    store.r.set(f"nasq:run:{forged['run_id']}:manifest", json.dumps(forged))
    store.r.set(f"nasq:run:{forged['run_id']}:state", json.dumps({"state": "running", "at": time.time(),
                                                                 "shards": len(forged["shards"])}))
    store.r.sadd("nasq:runs:active", forged["run_id"])
    for run_id in (h.run_id, forged["run_id"]):
        until(lambda: f"run {run_id}: refused to act on its record" in w.log_text(), 60,
               f"a worker refuses {run_id}'s record")
    time.sleep(2 * signed.lease_s)  # more rounds of healing (each worker's turn comes every lease / 3)
    for run_id in (h.run_id, forged["run_id"]):
        assert store.ledger.attempts(run_id) == {} and store.ledger.shard_results(run_id) == {}, run_id
        assert store.ledger.redispatched(run_id) == {}, run_id
    assert list(out.rglob("*")) == []  # nothing written
    assert "Refusing to deserialize untrusted content" in w.log_text()
    h.close()
    w.stop()


# ------------------------------------------------------------------------------ the broker first

def test_a_wrong_password_or_a_silent_broker_is_one_line_before_the_inputs_are_read(nasq_cli, repo, tmp_path):
    """The client talks to the broker before it reads the (here missing, in real life 340 MB)
    weights: the error is about the broker."""
    import socket

    proc, url = spawn_redis(["--save", "", "--appendonly", "no", "--requirepass", "right", "--dir", str(tmp_path)],
                            password="right")
    port = urlsplit(url).port
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NASQ_")}
        for broker, expected in ((f"redis://:wrong@127.0.0.1:{port}/0", "refused the credentials"),
                                 (f"redis://127.0.0.1:{silent.getsockname()[1]}/0", "did not answer within 5 s")):
            t = time.time()
            p = subprocess.run(nasq_cli + ["eval", "--broker", broker, "--weights", str(tmp_path / "none.pth"),
                                           "--data", str(tmp_path)], capture_output=True, text=True, cwd=repo,
                               env=env, timeout=120)
            lines = p.stderr.strip().splitlines()
            assert p.returncode == 5 and len(lines) == 1 and expected in lines[0], p.stderr  # the broker's fault
            assert "wrong" not in p.stderr
            print(f"{expected}: {time.time() - t:.1f} s")
    finally:
        silent.close()
        stop_process(proc)
