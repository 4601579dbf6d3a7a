"""Numbers an operator reads: intervals against published values, paired intervals at the
extremes, compare's warnings, the p99 flag, device cells, sweep decisions, display rounding."""
import pytest


def test_wilson_interval_matches_published_values():
    from nasq.results.stats import wilson

    # Newcombe (1998), Statistics in Medicine 17:857, example 81/263: 0.2553 to 0.3662
    assert wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)      # never below 0, never empty
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(0, 0) is None


def test_paired_interval_matches_the_published_example_and_keeps_a_width_at_the_extremes():
    from nasq.results.stats import paired_difference

    # Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency Tables" (2017), ch. 8:
    # complete response before/after consolidation, [[59, 6], [16, 80]]: -0.0621 (-0.1186 to -0.0046)
    d, low, high = paired_difference(59, 16, 6, 80)
    assert (d, low, high) == pytest.approx((-0.0621, -0.1186, -0.0046), abs=1e-4)
    for table in [(0, 0, 0, 100), (100, 0, 0, 0), (37, 0, 0, 63)]:  # 0 %, 100 %, identical runs
        d, low, high = paired_difference(*table)
        assert d == 0 and low < 0 < high and high - low > 0.01       # the Wald interval is [0, 0] here
    d, low, high = paired_difference(0, 100, 0, 0)                  # A right on all, B on none
    assert d == -1 and low == -1 and -1 < high < -0.9
    assert paired_difference(0, 0, 0, 0) is None


def _pred(names, labels, top1s):
    return {"names": names, "labels": labels, "top5": [[t, 999, 998, 997, 996] for t in top1s],
            "scores": [[0.0] * 5 for _ in names], "indices": list(range(len(names)))}


def _report(run_id, fingerprint="f", **over):
    from nasq.rundata import Report

    return Report.from_payload({"run_id": run_id, "backend": {"name": "torch", "versions": {}}, "precision": "fp32",
                                "batch_size": 8, "num_outputs": 1001, "model": {"sha256": "abc"},
                                "dataset": {"root": "/d", "kind": "jpeg", "images": 3, "fingerprint": fingerprint},
                                "per_device": [], "throughput_img_s": 2.5, "images": 3} | over)


def test_compare_of_equal_runs_has_an_interval_and_of_disjoint_runs_warns():
    from nasq.results.compare import compare, render

    names, labels = [f"i{k}" for k in range(50)], [k % 7 for k in range(50)]
    same = compare(_report("A"), _pred(names, labels, labels), _report("B"), _pred(names, labels, labels))
    assert same["delta_points"] == 0 and same["ci95_points"][0] < 0 < same["ci95_points"][1]
    assert same["comparable"] and same["warnings"] == []
    apart = compare(_report("A"), _pred(["x", "y"], [1, 2], [1, 2]), _report("B", fingerprint="g"),
                    _pred(["p", "q"], [1, 2], [1, 1]))
    assert not apart["comparable"] and apart["images_both"] == 0
    assert any("share no image" in w for w in apart["warnings"]) and any("different datasets" in w
                                                                          for w in apart["warnings"])
    assert "WARNING: the runs share no image" in render(apart)


def _shard(sid, start, stop, worker, host, device, lat):
    n = stop - start
    return {"run_id": "r", "shard_id": sid, "status": "ok", "worker": worker, "host": host, "device": device,
            "device_name": "SIMULATED (rate 310p3, not a measurement)", "backend": "sim", "precision": "fp32",
            "names": [f"n{i}" for i in range(start, stop)], "indices": list(range(start, stop)),
            "labels": [1] * n, "top5": [[1, 2, 3, 4, 5]] * n, "scores": [[0.0] * 5] * n, "errors": [],
            "timing": {"started_at": 100.0, "finished_at": 104.0, "compute_s": 3.0, "data_s": 0.5, "wall_s": 4.0},
            "latency_ms": lat, "model_info": {"sha256": "0" * 64, "weights": "/w/nasnetalarge-random-tiny.pth",
                                                 "published": False},
            "environment": {"host": host, "cpu": "X"}, "accelerator": {}}


def _manifest(n_shards=3, size=8):
    from plans import run_manifest

    return run_manifest("r", [{"shard_id": f"s{i}", "start": i * size, "stop": (i + 1) * size} for i in range(n_shards)],
                        created=99.0, backend="sim", dataset={"kind": "u8"}, command=["nasq", "eval", "--weights",
                                                                                       "/w/x.pth"])


def test_three_devices_are_three_cells_and_few_batches_flag_the_p99():
    from nasq.results.merge import merge
    from nasq.results.report import devices_summary, render, render_markdown

    shards = [_shard(f"s{i}", i * 8, i * 8 + 8, f"npu{i}-1@vm1", "vm1", f"npu:{i}", [1.0, 2.0]) for i in range(3)]
    report, _ = merge(_manifest(), shards)
    cells = {f"vm1/npu:{i} SIMULATED (rate 310p3, not a measurement)" for i in range(3)}
    assert {c for c in render(report).splitlines() for c in cells if c in render(report)} == cells
    md = render_markdown(report)
    assert all(c in md for c in cells) and "p99 from fewer than 100 batches" in md
    assert devices_summary(report.per_device) == "vm1/npu:0, vm1/npu:1, vm1/npu:2 SIMULATED (rate 310p3, not a " \
                                                    "measurement)"
    assert devices_summary(report.per_device, listed=2) == "3x npu (SIMULATED (rate 310p3, not a measurement)) " \
                                                              "on 1 host"
    assert not report.per_device[0]["latency_ms"]["p99_samples_ok"]
    assert any("SIMULATED" in w for w in report.warnings) and any("RANDOM" in w for w in report.warnings)
    assert report.top1 == 100.0 and report.top1_ci95[0] < 100.0 == report.top1_ci95[1]
    assert "nasq eval --weights /w/x.pth" in md


def test_a_partial_report_names_what_it_lacks():
    from nasq.results.merge import merge_partial
    from nasq.results.report import render_html, render_markdown

    ok = [_shard("s0", 0, 8, "w@vm1", "vm1", "npu:0", [1.0])]
    report, _ = merge_partial(_manifest(), ok, "boom", failures={"s1": {"reason": "ValueError: bad", "worker": "w2",
                                                                         "attempts": 3}})
    assert report.state == "failed" and report.error == "boom" and not report.complete
    assert report.images == 8 and report.images_planned == 24
    assert [(f["shard_id"], f["attempts"]) for f in report.shards_failed] == [("s1", 3), ("s2", 0)]
    md, html = render_markdown(report), render_html(report, [])
    for text in (md, html):
        assert "8 of 24 images" in text and "ValueError: bad" in text and "no result (lost, or never ran)" in text
    empty, _ = merge_partial(_manifest(), [], "all lost", state="cancelled")
    assert empty.images == 0 and len(empty.shards_failed) == 3
    assert empty.shards_failed[0]["reason"] == "cancelled before it finished"


def _row(worker, device, bs, img_s, p99):
    return {"worker": worker, "host": "vm1", "device": device, "device_name": "NVIDIA H200", "batch_size": bs,
            "img_s": img_s, "median_ms": p99 / 2, "p90_ms": p99 * 0.8, "p95_ms": p99 * 0.9, "p99_ms": p99,
            "min_ms": p99 / 3}


def test_sweep_decides_the_best_batch_size_with_and_without_a_budget():
    from nasq.results.sweeps import decide, render_markdown

    rows = [_row("a@vm1", "cuda:0", 1, 500.0, 2.0), _row("a@vm1", "cuda:0", 8, 1900.0, 4.2),
            _row("a@vm1", "cuda:0", 64, 2200.0, 29.0), _row("a@vm1", "cuda:0", 32, 2180.0, 15.0),
            _row("b@vm1", "cuda:1", 1, 480.0, 2.2), {**_row("b@vm1", "cuda:1", 64, 0, 0), "error": "out of memory"}]
    d = {x["device"]: x for x in decide(rows, latency_budget_ms=5, percentile=99)}
    assert d["vm1/cuda:0"]["best_batch_size"] == 64 and d["vm1/cuda:0"]["close_batch_sizes"] == [32]
    assert d["vm1/cuda:0"]["within_budget_batch_size"] == 8 and d["vm1/cuda:1"]["within_budget_batch_size"] == 1
    tight = {x["device"]: x for x in decide(rows, latency_budget_ms=0.9, percentile=50)}
    assert tight["vm1/cuda:0"]["within_budget_batch_size"] is None and "no batch size meets p50" in \
        tight["vm1/cuda:0"]["note"]
    md = render_markdown(rows, decide(rows, latency_budget_ms=5))
    assert "best with p99 <= 5 ms" in md and "vm1/cuda:1" in md
    with pytest.raises(ValueError):
        decide(rows, percentile=97)
    # a near-tie within the budget (7.613 vs 7.61 img/s) is named as one the noise covers
    near = [_row("c@vm1", "cpu", 2, 7.61, 300.0), _row("c@vm1", "cpu", 4, 7.613, 590.0),
            _row("c@vm1", "cpu", 8, 7.9, 1200.0)]
    (c,) = decide(near, latency_budget_ms=600)
    assert c["within_budget_batch_size"] == 4 and c["within_budget_close"] == [2]
    assert "batch size 2 is within 2 % of batch 4" in c["note"] and "noise" in c["note"]
    (clear,) = decide(near[1:], latency_budget_ms=600)
    assert clear["within_budget_close"] == [] and clear["note"] is None
    assert not render_markdown(rows).startswith("**SIMULATED")
    sim = render_markdown([{**r, "backend": "sim"} for r in near])
    assert sim.startswith("**SIMULATED devices: their timings are a simulator's, not measurements**")


def test_a_sweep_asked_with_1_or_1_0_is_one_sweep():
    """min_time_s=1 (an API call) and --min-time 1 (the CLI: a float) define the same sweep."""
    from nasq.perf.sweep import sweep_id

    base = {"mode": "bench", "backend": "torch", "batch_sizes": [1, 2], "images": 64}
    assert sweep_id({**base, "min_time_s": 1, "stability_pct": 3}) == sweep_id({**base, "min_time_s": 1.0,
                                                                                  "stability_pct": 3.0})
    assert sweep_id({**base, "min_time_s": 1}) != sweep_id({**base, "min_time_s": 1.5})


def test_display_rounds_but_keeps_significant_figures():
    from nasq.tables import num, table

    assert [num(x) for x in (0.24061234, 6.158123, 175.73, 2214.37, 1.0, None)] == \
        ["0.2406", "6.158", "175.7", "2214", "1", "-"]
    assert "0.2406" in table([[0.24061234, True]], ["img/s", "stable"]) and "yes" in table([[1.0, True]], ["a", "b"])


def test_the_rerun_command_never_writes_a_broker_password():
    from types import SimpleNamespace

    from nasq.api.runs import rerun_command
    from nasq.request import EvalRequest

    request = EvalRequest(weights="/w/my weights.pth", data="/d/val", labels="/d/val_label.txt")
    plan = SimpleNamespace(request=request)
    for url in ("redis://:s3cret@head:6379/0", "redis://head:6379/0?password=s3cret", "rediss://u:s3cret@h/1"):
        cmd = rerun_command(plan, queue="eval.torch", broker_url=url)
        assert "s3cret" not in " ".join(cmd) and cmd[-2:] == ["--broker", "$NASQ_BROKER_URL"]
    cmd = rerun_command(SimpleNamespace(request=request.replace(shard_size=64)), queue="eval.mine",
                        broker_url="redis://head:6379/0")
    assert cmd[-4:] == ["--queue", "eval.mine", "--broker", "redis://head:6379/0"] and "--shard-size" in cmd
    cmd = rerun_command(SimpleNamespace(request=request.replace(allow_bad_labels=True)), queue="eval.torch",
                        broker_url=None, devices=["cpu", "cpu"])
    assert cmd[-4:] == ["--device", "cpu", "--workers", "2"] and "--allow-bad-labels" in cmd
    from nasq.results.report import rerun_text

    line = rerun_text(_report("r", environment={"command": rerun_command(plan, queue="eval.torch",
                                                                          broker_url="redis://:x@h/0")}))
    assert "'/w/my weights.pth'" in line and line.endswith('--broker "$NASQ_BROKER_URL"')


def test_an_index_written_by_an_earlier_nasq_is_read_as_it_is_and_extended_on_write(tmp_path):
    import sqlite3

    from nasq.results.history import INDEX, get, query, record, row_of

    old = ("run_id", "created", "finished", "state", "model", "model_sha256", "backend", "precision", "batch_size",
           "devices", "dataset", "dataset_fingerprint", "images", "images_total", "top1", "top5", "throughput_img_s",
           "end_to_end_img_s", "report", "error")
    db = sqlite3.connect(str(tmp_path / INDEX))
    db.execute(f"CREATE TABLE runs ({', '.join(old)})")
    db.execute(f"INSERT INTO runs ({', '.join(old)}) VALUES ({', '.join('?' * len(old))})",
               ["old", 1.0, 2.0, "done", "large", None, "torch", "fp32", 8, "cpu, 1 thread", "/d", "f", 10, 10,
                90.0, 99.0, 5.0, 4.0, None, None])
    db.commit()
    db.close()
    (row,) = query(str(tmp_path))
    assert row["run_id"] == "old" and row["images_planned"] is None and row["device_list"] is None
    assert len({r[1] for r in sqlite3.connect(str(tmp_path / INDEX)).execute("PRAGMA table_info(runs)")}) == len(old)
    from plans import run_manifest

    manifest = run_manifest("new", [{"shard_id": "s0", "start": 0, "stop": 10}], created=3.0)
    record(str(tmp_path), row_of(manifest, "failed", error="boom"))
    assert get(str(tmp_path), "new")["images_planned"] == 10 and get(str(tmp_path), "old")["top1"] == 90.0


def test_compare_warns_when_shared_images_have_other_labels():
    from nasq.results.compare import compare

    a = _pred(["x", "y", "z"], [1, 2, 3], [1, 2, 3])
    b = _pred(["x", "y", "z"], [1, 2, 4], [1, 2, 4])
    c = compare(_report("A"), a, _report("B"), b)
    assert not c["comparable"] and any("different labels" in w for w in c["warnings"])
