"""Numbers an operator can read and trust, on real workers (the SIMULATED backend on three
"NPUs", which sleeps instead of computing): each device named by host and device in every
output, a failed and a cancelled run explaining themselves with only accepted images counted,
the environment block and a rerun command that reproduces the run, a sweep that decides.

Every assertion on a rate compares it with a bound the simulated device cannot exceed, never
with a speed the machine must reach."""
import json
import os
import socket

from nasq.config import Settings
from nasq.queue.store import RunStore
from waiting import sim_weights, until

DEVICES = ["npu:0", "npu:1", "npu:2"]
HOST = socket.gethostname()


def test_three_devices_are_named_everywhere_and_the_rerun_command_reproduces_the_run(
        assets, redis_url, start_workers, tmp_path, cli):
    from nasq.api import evaluate, submit_sweep

    rep = tmp_path / "rep"
    w = start_workers(redis_url, backend="sim", sim="rate=4", devices=DEVICES,
                      settings=Settings(report_dir=str(rep), merge_wait_s=20))
    client = Settings(broker_url=redis_url, report_dir=str(rep))
    weights = sim_weights(tmp_path)
    res = evaluate(weights=weights, data=assets["data"], labels=assets["labels"], backend="sim", batch_size=2,
                   shard_size=4, queue=w.queue, settings=client, progress=False, log=lambda *_: None)
    r = res.report
    cells = {f"{HOST}/{d} SIMULATED (rate 4.0, not a measurement)" for d in DEVICES}  # 1 s a shard: all three work
    from nasq.results.report import device_cell

    assert {device_cell(d) for d in r.per_device} == cells
    md, html = open(r.files["markdown"]).read(), open(r.files["html"]).read()
    shown = cli(["runs"], broker=redis_url, report_dir=rep).stdout
    for cell in cells:
        assert cell in md and cell in html and cell in res.table
    assert all(f"{HOST}/{d}" in shown for d in DEVICES) and "(SIMULATED)" in shown
    # the banners, the interval, the environment block and the rerun command, in every format
    assert any("SIMULATED devices" in x for x in r.warnings) and "SIMULATED devices" in html
    assert r.top1_ci95[0] <= r.top1 <= r.top1_ci95[1] and "95 % CI" in md
    env = r.environment.hosts[HOST]
    assert env["cpu"] and env["cpu_cores"] >= 1 and env["nasq"] and env["python"]
    cmd = list(r.environment.command)
    assert cmd[:2] == ["nasq", "eval"] and "--broker" in cmd and "--queue" in cmd
    for text in (md, html):
        assert "Environment" in text and f"host {HOST}" in text and "--weights" in text
    # the rerun command, executed as it stands (plus where to write the predictions), gives the same predictions
    p = cli(cmd[1:] + ["--predictions", str(tmp_path / "again.json"), "--no-progress"], report_dir=rep, timeout=300)
    assert p.returncode == 0, p.stderr
    again = json.loads((tmp_path / "again.json").read_text())
    mine = dict(zip(res.predictions["names"], res.predictions["top5"]))
    assert dict(zip(again["names"], again["top5"])) == mine and len(mine) == 20

    # a sweep over the three devices names each of them and decides per device
    h = submit_sweep(batch_sizes=[1, 2, 4], weights=weights, data="index:16", backend="sim", mode="bench",
                     min_time_s=0.1, devices=w.names, settings=client, log=lambda *_: None)
    h.wait(timeout=240)
    sweep = h.report(str(tmp_path / "sweep"), latency_budget_ms=900, percentile=99)
    assert {d["device"] for d in sweep.decision} == {f"{HOST}/{d}" for d in DEVICES}
    for d in sweep.decision:  # 4 img/s at every size, so a batch takes 250, 500 or 1000 ms: 4 never meets 900 ms
        mine = [r for r in sweep.rows if f"{HOST}/{r['device']}" == d["device"]]
        assert d["best_batch_size"] == max(mine, key=lambda r: r["img_s"])["batch_size"]
        within = [r for r in mine if r["p99_ms"] <= 900]
        assert d["within_budget_batch_size"] == max(within, key=lambda r: r["img_s"])["batch_size"] in (1, 2), d
    data = json.loads(open(sweep.files["json"]).read())
    assert [d["within_budget_batch_size"] for d in data["decision"]] == [d["within_budget_batch_size"]
                                                                         for d in sweep.decision]
    assert len(data["rows"]) == 9
    page = open(sweep.files["html"]).read()
    assert page.index("Best batch size per device") < page.index("Points (9)")
    assert "best with p99 &lt;= 900 ms" in page and all(f"{HOST}/{d}" in page for d in DEVICES)
    assert "best with p99 <= 900 ms" in sweep.markdown and os.path.isfile(sweep.files["pareto"])


def test_a_failed_run_explains_itself_and_counts_only_accepted_images(redis_url, start_workers, tmp_path, cli):
    """A device that fails mid-shard (after reporting progress): the report names the failed
    shards, why and how many images of how many; status and metrics count only the kept shard."""
    from nasq.api import submit_evaluation
    from nasq.errors import RunError
    from nasq.queue.metrics import RunCollector

    rep = tmp_path / "rep"
    w = start_workers(redis_url, backend="sim", sim="rate=4,fail_after=12", devices=["npu:0"],
                      settings=Settings(report_dir=str(rep), merge_wait_s=20))
    h = submit_evaluation(weights=sim_weights(tmp_path), data="index:24", backend="sim", batch_size=4,
                          shard_size=8, queue=w.queue, settings=Settings(broker_url=redis_url, report_dir=str(rep)),
                          log=lambda *_: None)
    try:
        h.wait(progress=False, timeout=120, log=lambda *_: None)
        raise AssertionError("the run should have failed")
    except RunError as e:
        assert "failed" in str(e)
    finally:
        h.close()
    store = RunStore(redis_url)
    until(lambda: store.runs.published(h.run_id), 60, "the failed run's report is in place")
    r = store.runs.report(h.run_id)
    assert r.state == "failed" and r.error and not r.complete
    assert r.images == 8 and r.images_planned == 24
    failed = {f["shard_id"]: f for f in r.shards_failed}
    assert set(failed) == {"shard-00001", "shard-00002"}
    assert all("simulated device failure" in f["reason"] and f["attempts"] == 1 for f in failed.values())
    on_disk = json.loads(open(r.files["json"]).read())
    md, html = open(r.files["markdown"]).read(), open(r.files["html"]).read()
    assert on_disk["shards_failed"] == list(r.shards_failed) and on_disk["state"] == "failed"
    for text in (md, html):
        assert "8 of 24 images" in text and "shard-00001" in text and "simulated device failure" in text
    # status: only the kept shard's 8 images (the failed one had reported 4), at a rate the device can do
    from nasq.cli.exits import RUN_FAILED

    p = cli(["status", h.run_id, "--json"], broker=redis_url)
    st = json.loads(p.stdout)
    assert p.returncode == RUN_FAILED and st["images_done"] == 8 and st["shards_done"] == 1
    assert st["shards_failed"] == 2
    assert 0 < st["rate_img_s"] <= 4.0 and st["workers"][w.names[0]]["images"] == 8
    assert st["workers"][w.names[0]]["failed"] == 2
    text = cli(["status", h.run_id], broker=redis_url)
    assert text.returncode == RUN_FAILED and "(2 failed)" in text.stdout and "shards not evaluated" in text.stdout
    assert "8 evaluated of 24" in text.stdout and "simulated device failure" in text.stdout
    metrics = {m.name: m for m in RunCollector(store).collect()}
    assert [s.value for s in metrics["nasq_run_shards_failed"].samples if s.labels["run_id"] == h.run_id] == [2]
    assert [s.value for s in metrics["nasq_run_images_done"].samples if s.labels["run_id"] == h.run_id] == [8]


def test_a_cancelled_run_counts_only_what_was_kept(redis_url, start_workers, tmp_path, cli):
    from nasq.api import submit_evaluation

    rep = tmp_path / "rep"
    w = start_workers(redis_url, backend="sim", sim="rate=4", devices=DEVICES,
                      settings=Settings(report_dir=str(rep), merge_wait_s=20))
    h = submit_evaluation(weights=sim_weights(tmp_path), data="index:240", backend="sim", batch_size=4,
                          shard_size=8, queue=w.queue, settings=Settings(broker_url=redis_url, report_dir=str(rep)),
                          log=lambda *_: None)
    store = RunStore(redis_url)
    try:
        # some shards kept, and copies mid-shard that have reported progress
        until(lambda: store.ledger.results_count(h.run_id) >= 3 and store.ledger.images_done(h.run_id) >
               store.ledger.images_done(h.run_id, accepted_only=True), 120, "kept shards and progress of running ones")
        p = cli(["cancel", h.run_id], broker=redis_url, report_dir=rep)
        assert p.returncode == 0, p.stderr
    finally:
        h.close()
    from nasq.cli.exits import RUN_CANCELLED

    r = store.runs.report(h.run_id)
    p = cli(["status", h.run_id, "--json"], broker=redis_url)
    st = json.loads(p.stdout)
    assert p.returncode == RUN_CANCELLED
    assert st["state"] == "cancelled" and r.state == "cancelled"
    kept = 8 * store.ledger.results_count(h.run_id)
    assert st["images_done"] == r.images == kept == sum(w_["images"] for w_ in st["workers"].values())
    assert 0 < st["rate_img_s"] <= 3 * 4.0
    assert len(r.shards_failed) == 30 - kept // 8 and f"{kept} of 240 images" in open(r.files["markdown"]).read()
    row = next(x for x in json.loads(cli(["runs", "--json"], broker=redis_url, report_dir=rep).stdout)
               if x["run_id"] == h.run_id)
    assert row["state"] == "cancelled" and row["images"] == kept and row["images_planned"] == 240


def test_compare_warns_about_runs_over_other_datasets(assets, redis_url, start_workers, tmp_path, cli):
    import shutil

    from nasq.api import evaluate
    from nasq.cli.exits import NOT_COMPARABLE

    rep = tmp_path / "rep"
    w = start_workers(redis_url, backend="sim", sim="rate=400", settings=Settings(report_dir=str(rep)))
    client = Settings(broker_url=redis_url, report_dir=str(rep))
    other = tmp_path / "other"  # ten of the same images, under the same names: another dataset
    other.mkdir()
    names = assets["names"][:10]
    for n in names:
        shutil.copy(os.path.join(assets["data"], n), other / n)
    labels = dict(line.split() for line in open(assets["labels"]))
    (tmp_path / "other_labels.txt").write_text("".join(f"{n} {labels[n]}\n" for n in names))
    weights = sim_weights(tmp_path)
    a, b, c = (evaluate(weights=weights, data=data, labels=lab, backend="sim", batch_size=4, queue=w.queue,
                        settings=client, progress=False, log=lambda *_: None)
               for data, lab in ((assets["data"], assets["labels"]), (assets["data"], assets["labels"]),
                                 (str(other), str(tmp_path / "other_labels.txt"))))
    same = cli(["compare", a.run_id, b.run_id], broker=redis_url, report_dir=rep)
    assert same.returncode == 0, same.stderr
    assert "B - A +0.00 points (95 % CI -" in same.stdout  # identical runs: an interval, not a point
    apart = cli(["compare", a.run_id, c.run_id, "--json"], broker=redis_url, report_dir=rep)
    assert apart.returncode == NOT_COMPARABLE and "different datasets" in apart.stderr
    assert json.loads(apart.stdout)["comparable"] is False
