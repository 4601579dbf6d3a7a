"""Results people compare: run history that outlives Redis (`nasq runs --json/--csv`), `nasq status
--json`, `nasq compare`, `nasq cancel` of a running run, sweeps resumed after a worker restart,
the report files (HTML, ais_bench block, timm row) and run metrics scraped by Prometheus' parser."""
import csv
import io
import json
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest
import redis
import requests

from nasq.config import Settings



def test_history_status_compare_and_report_files(assets, redis_url, start_workers, tmp_path, cli):
    from nasq.api import evaluate

    rep = tmp_path / "reports"
    w = start_workers(redis_url, settings=Settings(report_dir=str(rep), merge_wait_s=20))
    client = Settings(broker_url=redis_url, report_dir=str(rep))
    a = evaluate(weights=assets["weights"], data=assets["data"], labels=assets["labels"], batch_size=4, shard_size=8,
                 queue=w.queue, settings=client, progress=False, log=lambda *_: None)
    b = evaluate(weights=assets["weights"], data=assets["data"], labels=assets["labels"], batch_size=2, shard_size=8,
                 queue=w.queue, settings=client, progress=False, log=lambda *_: None)

    # the report: named throughputs, latency percentiles, model load time, text cells
    r = a.report
    assert set(r.throughput.to_payload()) >= {"shard_span_img_s", "end_to_end_img_s", "compute_img_s"}
    assert r.throughput.end_to_end_s >= r.wall_s > 0
    d = r.per_device[0]
    assert d["latency_ms"]["count"] == 5 and d["latency_ms"]["p50"] <= d["latency_ms"]["p99"] <= d["latency_ms"]["max"]
    assert d["model_load_s"] > 0 and d["img_s_ais_bench"] > 0
    host = socket.gethostname()
    assert d["device_name"] == "PyTorch CPU, 1 thread" and d["host"] == host
    assert f"{host}/cpu PyTorch CPU, 1 thread" in a.table
    files = r.files
    page = open(files["html"]).read()
    assert "data:image/png;base64," in page and "<table>" in page and "<script" not in page
    assert "http://" not in page and "https://" not in page and "src=\"/" not in page  # self-contained
    ais = open(files["ais_bench"]).read()
    assert "CPU_compute_time (ms): min = " in ais and "percentile(99%) = " in ais
    assert f"throughput 1000*batchsize.mean(4)/CPU_compute_time.mean({d['latency_ms']['mean']:.3f}): " in ais
    row = next(csv.DictReader(open(files["csv"])))
    assert row["top1"] == "100.0" and row["top1_err"] == "0.0" and row["img_size"] == "331" and \
        row["crop_pct"] == "0.875" and row["interpolation"] == "bilinear" and float(row["param_count"]) > 0
    md = open(files["markdown"]).read()
    assert "torch 2." in md and "{'" not in md  # versions as text, not a dict

    # nasq status --json
    p = cli(["status", a.run_id, "--json"], broker=redis_url)
    assert p.returncode == 0, p.stderr
    st = json.loads(p.stdout)
    assert st["state"] == "done" and st["images_done"] == 23 and st["report"]["images"] == 20
    # the status rate is the report's (both over the shards' span)
    assert st["rate_img_s"] == pytest.approx(r.throughput_img_s, rel=1e-9)

    # nasq runs --json / --csv, with filters
    p = cli(["runs", "--json", "--limit", "50"], broker=redis_url, report_dir=rep)
    rows = {x["run_id"]: x for x in json.loads(p.stdout)}
    assert rows[a.run_id]["state"] == "done" and rows[a.run_id]["top1"] == 100.0
    assert rows[a.run_id]["devices"] == f"{host}/cpu PyTorch CPU, 1 thread" and rows[a.run_id]["batch_size"] == 4
    assert rows[a.run_id]["created"].startswith(time.strftime("%Y-%m-%dT"))  # ISO-8601 with its offset
    assert rows[a.run_id]["top1_ci95_low"] < 100.0 == rows[a.run_id]["top1_ci95_high"]
    p = cli(["runs", "--csv", "--state", "done", "--backend", "torch"], broker=redis_url, report_dir=rep)
    got = list(csv.DictReader(io.StringIO(p.stdout)))
    assert {a.run_id, b.run_id} <= {x["run_id"] for x in got} and all(x["state"] == "done" for x in got)
    p = cli(["runs", "--state", "failed", "--json"], broker=redis_url, report_dir=rep)
    assert a.run_id not in p.stdout

    # nasq compare: the same model on the same images at another batch size
    p = cli(["compare", a.run_id, b.run_id, "--json"], broker=redis_url, report_dir=rep)
    assert p.returncode == 0, p.stderr
    c = json.loads(p.stdout)
    assert c["images_both"] == 20 and c["top1_changed"] == 0 and c["delta_points"] == 0.0
    assert c["mcnemar"] == {"a_right_b_wrong": 0, "b_right_a_wrong": 0, "p_value": 1.0}
    assert c["differences"]["batch_size"] == [4, 2] and "model" not in c["differences"]
    p = cli(["compare", a.run_id, b.run_id], broker=redis_url, report_dir=rep)
    assert "McNemar" in p.stdout and "batch_size" in p.stdout

    # the history outlives Redis: the run's records gone, it is still listed and comparable
    r_ = redis.Redis.from_url(redis_url)
    for key in r_.scan_iter(f"nasq:run:{a.run_id}:*"):
        r_.delete(key)
    r_.zrem("nasq:runs", a.run_id)
    p = cli(["runs", "--json"], report_dir=rep)  # no broker at all
    assert p.returncode == 0, p.stderr
    assert a.run_id in {x["run_id"] for x in json.loads(p.stdout)}
    p = cli(["compare", a.run_id, b.run_id, "--json"], report_dir=rep)
    assert p.returncode == 0 and json.loads(p.stdout)["images_both"] == 20


def test_cancel_a_running_run(redis_url, start_workers, tmp_path, cli):
    from nasq.api import submit_evaluation
    from nasq.errors import RunError
    from nasq.queue.store import RunStore

    weights = tmp_path / "w.sim"
    weights.write_bytes(os.urandom(64))
    rep = tmp_path / "reports"
    w = start_workers(redis_url, backend="sim", sim="rate=40", settings=Settings(report_dir=str(rep)))
    client = Settings(broker_url=redis_url, report_dir=str(rep))
    h = submit_evaluation(weights=str(weights), data="index:800", backend="sim", batch_size=4, shard_size=40,
                          queue=w.queue, settings=client, log=lambda *_: None)
    store = RunStore(redis_url)
    waited = {}

    def wait():
        try:
            h.wait(progress=False, timeout=120, log=lambda *_: None)
        except RunError as e:
            waited["error"] = str(e)
    t = threading.Thread(target=wait)
    t.start()
    deadline = time.time() + 60
    while time.time() < deadline and store.ledger.shard_counts(h.run_id)[0] < 2:
        time.sleep(0.2)
    p = cli(["cancel", h.run_id], broker=redis_url, report_dir=rep)
    assert p.returncode == 0, p.stderr
    assert "cancelled" in p.stderr and "partial report" in p.stderr
    t.join(30)
    assert "cancelled" in waited.get("error", "")  # a waiting client hears of it
    assert store.runs.state(h.run_id)["state"] == "cancelled"
    done_then = store.ledger.shard_counts(h.run_id)[0]
    from nasq.queue.transport import BrokerView

    broker = BrokerView(redis_url)  # queued shards are discarded, the running one was stopped
    deadline = time.time() + 60
    while time.time() < deadline and (broker.queued(w.queue)
                                      or any(t.startswith(h.run_id) for t in broker.unacked_ages())):
        time.sleep(0.1)
    assert store.ledger.shard_counts(h.run_id)[0] <= done_then + 1 < 20
    partial = store.runs.report(h.run_id)
    assert partial.partial is True and 80 <= partial.images < 800 and os.path.isfile(partial.files["json"])
    p = cli(["status", h.run_id, "--json"], broker=redis_url)
    assert json.loads(p.stdout)["state"] == "cancelled" and p.returncode == 4  # cancelled (nasq.cli.exits)
    p = cli(["cancel", h.run_id], broker=redis_url, report_dir=rep)
    assert p.returncode == 2 and "already ended (cancelled)" in p.stderr
    p = cli(["runs", "--state", "cancelled", "--json"], report_dir=rep)
    assert h.run_id in {x["run_id"] for x in json.loads(p.stdout)}
    # the worker serves the next run
    h2 = submit_evaluation(weights=str(weights), data="index:40", backend="sim", batch_size=4, queue=w.queue,
                           settings=client, log=lambda *_: None)
    assert h2.wait(progress=False, timeout=60, log=lambda *_: None).report.images == 40
    h.close()
    h2.close()


def test_a_sweep_resumed_after_a_worker_restart_reuses_its_points(assets, redis_url, start_workers, tmp_path, cli):
    from nasq.api import submit_sweep

    rep = tmp_path / "reports"
    settings = Settings(broker_url=redis_url, report_dir=str(rep))
    w = start_workers(redis_url, settings=Settings(report_dir=str(rep)))
    h = submit_sweep(batch_sizes=[1, 2], weights=assets["weights"], data=assets["data"], devices=w.names,
                     min_time_s=0.2, settings=settings, log=lambda *_: None)
    assert h.wait(timeout=120)["done"] == 2 and h.reused == 0
    first = h.report()
    w.stop()
    w2 = start_workers(redis_url, w.queue, settings=Settings(report_dir=str(rep)))  # a new process, a new name
    assert w2.names != w.names
    again = submit_sweep(batch_sizes=[1, 2], weights=assets["weights"], data=assets["data"], devices=w2.names,
                         min_time_s=0.2, settings=settings, log=lambda *_: None)
    assert again.sweep_id == h.sweep_id and again.reused == 2 and again.result is None
    rows = again.report().rows
    assert rows == first.rows
    for r in rows:
        assert r["stable"] in (True, False) and r["iters"] >= 8 and r["host"] and r["timestamp"]
        assert r["p50_ms" if "p50_ms" in r else "median_ms"] <= r["p99_ms"] <= r["max_ms"]
    head = open(first.files["csv"]).readline().strip().split(",")
    assert {"sweep_id", "timestamp", "host", "iters", "stable", "dataset_fingerprint", "p90_ms"} <= set(head)
    assert "data:image/png;base64," in open(first.files["html"]).read()
    p = cli(["sweeps", "--json"], report_dir=rep)
    listed = {s["sweep_id"]: s for s in json.loads(p.stdout)}
    assert listed[h.sweep_id]["done"] == 2 and listed[h.sweep_id]["state"] == "done"


def test_run_metrics_scraped_and_parsed_by_prometheus(assets, workers, settings, cli, nasq_cli, repo, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    from nasq.api import evaluate
    from nasq.queue.redis_server import free_port

    res = evaluate(weights=assets["weights"], data=assets["data"], labels=assets["labels"], batch_size=4,
                   queue=workers.queue, settings=settings, progress=False, log=lambda *_: None)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NASQ_")}
    proc = subprocess.Popen(nasq_cli + ["metrics", "--port", str(port), "--broker", settings.broker_url], cwd=repo,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, text = time.time() + 60, None
        while time.time() < deadline:
            try:
                text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
                break
            except requests.ConnectionError:
                time.sleep(0.3)
        assert text, proc.stderr.read1().decode() if proc.poll() is not None else "no answer"
        samples = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                samples.setdefault(s.name, []).append(s)

        def one(name, **labels):
            return next(s.value for s in samples[name] if all(s.labels.get(k) == v for k, v in labels.items()))
        assert one("nasq_run_images_done", run_id=res.run_id) == 23
        assert one("nasq_run_images", run_id=res.run_id) == 23
        assert one("nasq_run_info", run_id=res.run_id, state="done") == 1
        assert one("nasq_run_top1_ratio", run_id=res.run_id) == 1.0
        assert one("nasq_run_throughput_images_per_second", run_id=res.run_id) > 0
        assert one("nasq_run_device_throughput_images_per_second", run_id=res.run_id) > 0
        assert sum(s.value for s in samples["nasq_images_total"] if s.labels["run_id"] == res.run_id) == 20
        assert sum(s.value for s in samples["nasq_image_errors_total"] if s.labels["run_id"] == res.run_id) == 3
        assert one("nasq_shard_duration_seconds_count", run_id=res.run_id) >= 1
        assert one("nasq_workers_alive") >= 2
        if shutil.which("promtool"):  # what `nasq metrics` serves, as Prometheus' linter reads it
            lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
            assert lint.returncode == 0, lint.stdout + lint.stderr
    finally:
        proc.terminate()
        proc.wait(10)
