"""A fleet with broken parts still finishes: a device that fails every shard is excluded and its
shards run on the others (simulated devices, and real torch workers); a shard whose data makes
every device fail fails after ``shard_max_devices`` devices, naming each; a run nobody serves
says so within heartbeats; a client whose messages the workers refuse for their signature says
why and exits 2; ``--require-workers`` refuses to submit. Real Redis, real worker processes,
each fault done for real."""
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid

import pytest

from nasq.api import evaluate, evaluate_local, submit_evaluation
from nasq.config import Settings
from nasq.errors import RunError
from nasq.queue.store import RunStore
from nasq.results.status import render_status, run_status
from waiting import Waiter, sim_reference, sim_weights, until


def test_a_simulated_device_failing_every_shard_is_excluded_and_the_run_completes_exactly(
        redis_url, start_workers, tmp_path):
    """Three healthy simulated devices and one that fails every shard at once, 60 shards: each
    shard the bad one takes runs on another device; after its second failure in a row it is
    excluded (it takes no shard of the run after that) and named with its reason in the status,
    the report (JSON, Markdown, HTML), the run history and the metrics. The predictions are
    those of an undisturbed run."""
    from prometheus_client import generate_latest
    from prometheus_client.core import CollectorRegistry

    from nasq.queue.metrics import RunCollector

    queue = f"eval.failover-{uuid.uuid4().hex[:6]}"
    settings = Settings(broker_url=redis_url, report_dir=str(tmp_path / "rep"), lease_s=5, merge_wait_s=30)
    healthy = start_workers(redis_url, queue, backend="sim", devices=["npu:0", "npu:1", "npu:2"], settings=settings)
    bad = start_workers(redis_url, queue, backend="sim", devices=["npu:3"], sim="fail_after=0", settings=settings)
    weights = sim_weights(tmp_path)
    t0, said = time.time(), []
    res = evaluate(weights=weights, data="index:2400", backend="sim", batch_size=8, shard_size=40, queue=queue,
                   settings=settings, progress=False, log=said.append)
    took = time.time() - t0
    report, run_id, name = res.report, res.run_id, bad.names[0]
    assert report.images == 2400 and report.shards == 60 and not report.partial
    ref = sim_reference(weights, 2400, 8)
    assert res.predictions["top5"] == ref["top5"] and res.predictions["indices"] == ref["indices"]
    # excluded at its second failure in a row, and it failed no shard after that
    (excluded,) = report.excluded_devices
    assert excluded["worker"] == name and excluded["shards_failed"] == 2 and excluded["device"] == "npu:3"
    assert "simulated device failure" in excluded["reason"]
    failed_there = [(sid, f) for sid, fs in report.shard_failures.items() for f in fs if f["worker"] == name]
    assert len(failed_there) == 2 and all(sid not in [s["shard_id"] for s in report.shards_failed]
                                          for sid, _ in failed_there)
    assert all(d["worker"] != name for d in report.per_device)  # it kept no result
    assert any(f"{name} (" in line and "is EXCLUDED from the run" in line for line in said), said  # the client said so
    store = RunStore(redis_url)
    text = render_status(run_status(store, run_id))
    assert re.search(rf"{re.escape(name)} .*EXCLUDED \(2 failed shards in a row\)", text), text
    assert "EXCLUDED devices" in text and "simulated device failure" in text
    folder = os.path.dirname(report.files["json"])
    assert json.load(open(report.files["json"]))["excluded_devices"][0]["worker"] == name
    md = open(os.path.join(folder, "report.md")).read()
    assert "## Excluded devices" in md and name in md
    html = open(os.path.join(folder, "report.html")).read()
    assert "Excluded devices" in html and name in html
    from nasq.api import list_runs

    row = next(r for r in list_runs(settings=settings) if r["run_id"] == run_id)
    assert row["excluded_devices"] == [f"{excluded['host']}/npu:3"]
    registry = CollectorRegistry()
    registry.register(RunCollector(store))
    metrics = generate_latest(registry).decode()
    assert re.search(rf'nasq_run_device_excluded{{[^}}]*run_id="{run_id}"[^}}]*worker="{re.escape(name)}"', metrics), \
        metrics
    assert re.search(rf'nasq_run_devices_excluded{{[^}}]*run_id="{run_id}"[^}}]*}} 1\.0', metrics), metrics
    print(f"60 shards, one of 4 devices failing every shard: {took:.1f} s")
    healthy.stop()
    bad.stop()


def test_a_real_worker_that_cannot_load_the_model_is_excluded_beside_healthy_ones(assets, redis_url, start_workers,
                                                                                   tmp_path):
    """Three torch workers, one on a host whose models share is not mounted (its read roots do
    not hold the weights): every shard it takes fails for that reason, runs on another worker,
    and the worker is excluded after its second failure; the run completes exactly."""
    models = tmp_path / "models"
    models.mkdir()
    weights = str(models / "tiny.pth")
    shutil.copy(assets["weights"], weights)
    queue = f"eval.unmounted-{uuid.uuid4().hex[:6]}"
    settings = Settings(broker_url=redis_url, report_dir=str(tmp_path / "rep"), merge_wait_s=30)
    good = start_workers(redis_url, queue, n=2, settings=settings)
    bad = start_workers(redis_url, queue, settings=Settings(read_roots=str(assets["root"]),
                                                            write_roots=str(tmp_path / "out"),
                                                            report_dir=str(tmp_path / "rep"), merge_wait_s=30))
    h = submit_evaluation(weights=weights, data=assets["data"], labels=assets["labels"], batch_size=2, shard_size=2,
                          queue=queue, settings=settings, log=lambda *_: None)
    client = Waiter(h)
    client.join(300)
    assert client.error is None, client.error
    report = client.result.report
    ref = evaluate_local(weights=weights, data=assets["data"], labels=assets["labels"], batch_size=2)
    assert report.images == 20 and report.top1 == 100.0 and client.result.predictions["top5"] == ref["top5"]
    # it fails in milliseconds while the healthy ones load the model: it takes at least two shards
    excluded = {e["worker"]: e for e in report.excluded_devices}
    assert set(excluded) == {bad.names[0]} and "outside this worker's read roots" in excluded[bad.names[0]]["reason"]
    assert excluded[bad.names[0]]["shards_failed"] == 2
    failed_there = [f for fs in report.shard_failures.values() for f in fs]
    assert failed_there and {f["worker"] for f in failed_there} == {bad.names[0]}
    assert all("weights" in f["error"] and "read roots" in f["error"] for f in failed_there)
    assert all(d["worker"] in good.names for d in report.per_device)
    h.close()
    good.stop()
    bad.stop()


def test_a_shard_whose_data_fails_on_every_device_fails_after_shard_max_devices(assets, redis_url, start_workers,
                                                                                tmp_path):
    """An image file that changes size once every worker has listed the folder makes its shard
    fail on every device that takes it (the data's fault, but no image exclusion): after three
    distinct devices it fails for good, naming each device and its error; the run fails with
    the rest of its images evaluated."""
    from nasq.data import open_source

    data = tmp_path / "val"
    shutil.copytree(assets["data"], data)
    victim = open_source(str(data)).names[19]  # in the last shard
    queue = f"eval.baddata-{uuid.uuid4().hex[:6]}"
    settings = Settings(broker_url=redis_url, report_dir=str(tmp_path / "rep"), merge_wait_s=30)
    w = start_workers(redis_url, queue, backend="sim", sim="rate=4", devices=["npu:0", "npu:1", "npu:2", "npu:3"],
                      settings=settings)
    store = RunStore(redis_url)
    h = submit_evaluation(weights=assets["weights"], data=str(data), labels=assets["labels"], backend="sim",
                          batch_size=4, shard_size=4, queue=queue, settings=settings, log=lambda *_: None)
    # each worker lists the folder before it claims its first shard; the four first shards take 1 s
    until(lambda: len(store.ledger.running(h.run_id)) == 4, 60, "every worker runs a shard", every=0.01)
    with open(data / victim, "ab") as f:
        f.write(b"\0" * 100)
    with pytest.raises(RunError) as e:
        h.wait(progress=False, timeout=240, log=lambda *_: None)
    report = store.runs.report(h.run_id)
    (failed,) = report.shards_failed
    fails = report.shard_failures[failed["shard_id"]]
    assert len({f["worker"] for f in fails}) == 3 == len(fails)
    assert all(f"{victim} changed since the dataset was listed" in f["error"] for f in fails)
    assert "failed on 3 workers (shard_max_devices=3)" in failed["reason"]
    assert all(f["worker"] in failed["reason"] for f in fails)
    assert "failed on 3 workers" in str(e.value)
    assert report.images == 16 and report.excluded_devices == ()  # one failure each: nobody excluded
    h.close()
    w.stop()


def test_a_run_nobody_serves_says_so_within_heartbeats_and_a_later_worker_finishes_it(redis_url, start_workers,
                                                                                      tmp_path):
    """The only worker of the queue SIGKILLed mid-run: the waiting client says that no live
    worker consumes the queue (naming it and how to start one) within three heartbeats, and
    `nasq status` says it too; a worker started later finishes the run exactly. A run sent to a
    queue nobody consumes is said at once, and its --timeout says that nothing is running."""
    beat = 2.0
    queue = f"eval.alone-{uuid.uuid4().hex[:6]}"
    settings = Settings(broker_url=redis_url, report_dir=str(tmp_path / "rep"), lease_s=3, merge_wait_s=60,
                        worker_heartbeat_s=beat)
    w = start_workers(redis_url, queue, backend="sim", sim="rate=40", settings=settings)
    store = RunStore(redis_url)
    weights = sim_weights(tmp_path)
    h = submit_evaluation(weights=weights, data="index:480", backend="sim", batch_size=8, shard_size=40, queue=queue,
                          settings=settings, log=lambda *_: None)
    client = Waiter(h)
    until(lambda: store.ledger.images_done(h.run_id) >= 80, 60, "the run is under way")
    for _, proc, _ in w.procs:
        os.killpg(proc.pid, signal.SIGKILL)
    killed = time.time()
    said = until(lambda: client.first(f"no live worker consumes queue {queue}"), 30, "the client says no live worker")
    print(f"'no live worker' said {said - killed:.1f} s after the kill (heartbeat {beat:g} s)")
    assert said - killed <= 3 * beat, said - killed
    line = next(line for line in client.said if "no live worker" in line)
    assert f"nasq worker --backend sim --queues {queue}" in line
    text = render_status(run_status(store, h.run_id))
    assert f"queue {queue}: NO live worker consumes it" in text, text
    later = start_workers(redis_url, queue, backend="sim", sim="rate=200", settings=settings)
    client.join(120)
    assert client.error is None, client.error
    assert client.first(f"a live worker consumes queue {queue} again") is not None, client.said
    ref = sim_reference(weights, 480, 8)
    assert client.result.report.images == 480 and client.result.predictions["top5"] == ref["top5"]
    h.close()
    later.stop()
    # a queue no worker has ever consumed
    nobody = f"eval.nobody-{uuid.uuid4().hex[:6]}"
    h = submit_evaluation(weights=weights, data="index:40", backend="sim", batch_size=8, queue=nobody,
                          settings=settings, log=lambda *_: None)
    t0 = time.time()
    said = []
    with pytest.raises(RunError) as e:
        h.wait(progress=False, timeout=3 * beat, log=said.append)
    assert any(f"no live worker consumes queue {nobody}" in s for s in said), said
    assert "nothing is running" in str(e.value) and "goes on on the workers" not in str(e.value), e.value
    assert time.time() - t0 < 3 * beat + 5
    h.close()


def test_an_unsigned_client_against_signing_workers_is_told_at_once(assets, start_workers, tmp_path, signing_settings,
                                                                    nasq_cli, repo):
    """Workers that require signed messages refuse an unsigned client's: the client says so in
    one line naming the signing settings, within seconds, and exits 2; with --timeout it says
    nothing false either. The refusal record cannot end a signed client's run."""
    from nasq.queue.redis_server import RedisServer

    with RedisServer(str(tmp_path / "redis")) as url:
        signing = signing_settings(tmp_path)
        signed = Settings(**signing, lease_s=3, merge_wait_s=20, report_dir=str(tmp_path / "rep"))
        w = start_workers(url, n=1, settings=signed)
        env = {k: v for k, v in os.environ.items() if not k.startswith("NASQ_")}
        for extra in ([], ["--timeout", "60"]):
            t0 = time.time()
            p = subprocess.run(nasq_cli + ["eval", "--broker", url, "--queue", w.queue, "--weights", assets["weights"],
                                           "--data", assets["data"], "--labels", assets["labels"], "-b", "4",
                                           "--no-progress", *extra], capture_output=True, text=True, cwd=repo,
                               env=env, timeout=120)
            took = time.time() - t0
            last = p.stderr.strip().splitlines()[-1]
            print(f"unsigned client {extra}: exit {p.returncode} after {took:.1f} s: {last}")
            assert p.returncode == 2, p.stderr
            assert "require signed messages" in last and "signing_key" in last, p.stderr
            assert "goes on on the workers" not in p.stderr
            assert took < 10 + 15, took  # the refusal is said within seconds (15 s: the CLI's own start)
            run_id = re.search(r"run (\S+): 23 images", p.stderr).group(1)
            assert RunStore(url).runs.state(run_id)["state"] == "failed"  # not left "running" for ever
        # a signed client's run is not ended by a refusal record (anyone who can write Redis can write one)
        store = RunStore(url)
        h = submit_evaluation(weights=assets["weights"], data=assets["data"], labels=assets["labels"], batch_size=4,
                              queue=w.queue, settings=Settings(broker_url=url, **signing,
                                                               report_dir=str(tmp_path / "rep")),
                              log=lambda *_: None)
        store.runs.record_refusal(h.run_id, "forged", signed=False, text="ContentDisallowed: forged")
        res = h.wait(progress=False, timeout=120, log=lambda *_: None)
        assert res.report.images == 20
        h.close()
        w.stop()


def test_require_workers_refuses_to_submit_to_a_thin_queue(assets, workers, redis_url, cli):
    p = cli(["eval", "--weights", assets["weights"], "--data", assets["data"], "--queue", workers.queue,
             "--require-workers", "3", "--no-progress"], broker=redis_url)
    assert p.returncode == 2, p.stderr
    assert f"2 live worker(s) consume queue {workers.queue}" in p.stderr and "nothing was submitted" in p.stderr
    assert "fewer than --require-workers 3" in p.stderr
