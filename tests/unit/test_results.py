"""Pure logic of the reports people compare: paired comparison, latency summaries, the
stability rule, sweep slots, the ais_bench and timm formats, the history index."""
import math

import pytest


def _pred(names, labels, top1s):
    return {"names": names, "labels": labels, "top5": [[t, 999, 998, 997, 996] for t in top1s],
            "scores": [[0.0] * 5 for _ in names], "indices": list(range(len(names)))}


def _report(run_id, **over):
    from nasq.rundata import Report

    base = {"run_id": run_id, "backend": {"name": "torch", "versions": {"torch": "2.14.1"}}, "precision": "fp32",
            "batch_size": 8, "num_outputs": 1001, "model": {"sha256": "abc"}, "images": 3,
            "dataset": {"root": "/d", "kind": "jpeg", "images": 3, "fingerprint": "f"},
            "per_device": [{"worker": "w", "device": "cpu", "device_name": "PyTorch CPU, 2 threads", "img_s_compute": 3.0,
                            "img_s_wall": 2.5}], "throughput_img_s": 2.5}
    return Report.from_payload(base | over)


def test_compare_counts_discordant_pairs_and_tests_them_exactly():
    from nasq.results.compare import compare
    from nasq.results.stats import mcnemar_exact

    names = [f"i{k}" for k in range(100)]
    labels = [k % 10 for k in range(100)]
    a_top1 = list(labels)                     # A right on all
    b_top1 = [lab if k >= 12 else lab + 1 for k, lab in enumerate(labels)]  # B wrong on the first 12
    b_top1[50] = labels[50]
    c = compare(_report("A"), _pred(names, labels, a_top1), _report("B", batch_size=4), _pred(names, labels, b_top1))
    assert c["images_both"] == 100 and c["top1_changed"] == 12
    assert c["mcnemar"]["a_right_b_wrong"] == 12 and c["mcnemar"]["b_right_a_wrong"] == 0
    assert c["mcnemar"]["p_value"] == pytest.approx(2 * 0.5 ** 12, rel=1e-6)
    assert c["delta_points"] == -12.0 and c["ci95_points"][0] < -12.0 < c["ci95_points"][1] < 0
    assert c["differences"] == {"batch_size": [8, 4]}
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024) == mcnemar_exact(9, 1)


def test_compare_uses_only_images_both_runs_saw():
    from nasq.results.compare import compare

    a = _pred(["x", "y", "z"], [1, 2, 3], [1, 2, 3])
    b = _pred(["y", "z", "w"], [2, 3, 4], [2, 0, 4])
    c = compare(_report("A"), a, _report("B"), b)
    assert c["images_both"] == 2 and c["images_labelled_both"] == 2 and c["top1_changed"] == 1
    assert not c["warnings"]
    sim = compare(_report("A"), a, _report("B", backend={"name": "sim", "versions": {}}), b)
    assert sim["warnings"] == ["run B ran on SIMULATED devices and the other on real ones: its throughput is a "
                               "simulator's, not a measurement, and its predictions are not a model's"]
    assert not compare(_report("A", backend={"name": "sim"}), a, _report("B", backend={"name": "sim"}), b)["warnings"]


def test_latency_summary_percentiles():
    from nasq.results.merge import latency_summary

    s = latency_summary([float(x) for x in range(1, 101)])
    assert s["count"] == 100 and s["min"] == 1.0 and s["max"] == 100.0 and s["p50"] == 50.5
    assert s["p90"] == pytest.approx(90.1) and s["p99"] == pytest.approx(99.01)
    assert latency_summary([])["p50"] is None


def test_stability_rule_stops_once_the_median_settles():
    """On a clock of the test's own (each call advances it by a set time), so that the rule is
    checked exactly, whatever the machine's speed or load."""
    from nasq.perf.timing import measure_stable

    now = [0.0]

    def steady():
        now[0] += 0.002
    lat, info = measure_stable(steady, min_time_s=0.2, stability_pct=1, max_time_s=3, clock=lambda: now[0])
    assert info["stable"] and info["windows"] == 2 and info["last_change_pct"] == 0.0 and len(lat) >= 16
    assert lat[0] == pytest.approx(2.0)

    calls = [0]

    def drifting():  # every call 2 % slower than the one before: no two windows' medians agree within 1 %
        calls[0] += 1
        now[0] += 0.0005 * 1.02 ** calls[0]
    lat, info = measure_stable(drifting, min_time_s=0.2, stability_pct=1, max_time_s=1.0, clock=lambda: now[0])
    assert not info["stable"] and info["windows"] >= 2 and info["last_change_pct"] > 1


def test_sweep_slots_survive_a_renamed_worker():
    from nasq.api.sweeps import _number

    before = _number([("h1", "cuda:0", "cuda0-111@h1"), ("h1", "cuda:1", "cuda1-112@h1"), ("h1", "cpu", "a@h1"),
                      ("h1", "cpu", "b@h1")])
    after = _number([("h1", "cuda:0", "cuda0-999@h1"), ("h1", "cuda:1", "cuda1-998@h1"), ("h1", "cpu", "c@h1"),
                     ("h1", "cpu", "d@h1")])
    assert [s for s, _ in before] == [s for s, _ in after] == ["h1/cpu#0", "h1/cpu#1", "h1/cuda:0#0", "h1/cuda:1#0"]


def test_ais_bench_block_and_timm_row():
    from dataclasses import replace

    from nasq.results.report import ais_bench_summary, timm_row
    from nasq.rundata import BackendInfo

    r = _report("R", top1=82.5, top5=96.0, images=1000, model={"arch": "large", "param_count": 88_753_150})
    r.per_device[0].update(images=1000, latency_ms={"count": 125, "min": 10.0, "max": 20.0, "mean": 12.5,
                                                       "p50": 12.0, "p90": 14.0, "p95": 15.0, "p99": 19.0},
                              img_s_ais_bench=640.0)
    text = ais_bench_summary(r)  # a CPU worker's: its compute time is not an NPU's
    assert "CPU_compute_time (ms): min = 10.000, max = 20.000, mean = 12.500, median = 12.000, " \
           "percentile(99%) = 19.000" in text and "NPU" not in text
    assert "throughput 1000*batchsize.mean(8)/CPU_compute_time.mean(12.500): 640.000" in text
    npu = replace(r, backend=BackendInfo("ais_bench"), per_device=({**r.per_device[0], "device": "npu:0"},))
    assert "throughput 1000*batchsize.mean(8)/NPU_compute_time.mean(12.500): 640.000" in ais_bench_summary(npu)
    gpu = replace(r, per_device=({**r.per_device[0], "device": "cuda:1"},))
    assert "GPU_compute_time (ms)" in ais_bench_summary(gpu)
    sim = replace(r, backend=BackendInfo("sim"), per_device=({**r.per_device[0], "device": "npu:0"},))
    assert "SIMULATED_compute_time (ms)" in ais_bench_summary(sim)
    row = timm_row(r)
    assert row["model"] == "nasnetalarge" and row["top1_err"] == 17.5 and row["top5_err"] == 4.0
    assert row["param_count"] == 88.75 and row["img_size"] == 331 and row["interpolation"] == "bilinear"


def test_history_index_round_trip(tmp_path):
    from dataclasses import replace

    from nasq.results.history import get, query, record, row_of
    from nasq.rundata import Report
    from plans import run_manifest

    manifest = run_manifest("r1", [], images=10, created=100.0)
    report = Report.from_payload({"run_id": "r1", "images": 10, "top1": 90.0, "model": {"arch": "large"},
                                  "per_device": [{"host": "vm1", "device": "cpu", "device_name": "PyTorch CPU, 1 thread"}]})
    record(str(tmp_path), row_of(manifest, "done", report))
    onnx = replace(manifest, run_id="r2", created=200.0, job=replace(manifest.job, backend="onnxruntime"))
    record(str(tmp_path), row_of(onnx, "failed", error="boom"))
    assert [r["run_id"] for r in query(str(tmp_path))] == ["r2", "r1"]
    assert [r["run_id"] for r in query(str(tmp_path), state="done")] == ["r1"]
    assert [r["run_id"] for r in query(str(tmp_path), backend="onnxruntime")] == ["r2"]
    assert query(str(tmp_path), since=150.0)[0]["run_id"] == "r2"
    assert get(str(tmp_path), "r1")["devices"] == "vm1/cpu PyTorch CPU, 1 thread" and get(str(tmp_path), "nope") is None
    assert get(str(tmp_path), "r1")["device_list"] == ["vm1/cpu PyTorch CPU, 1 thread"]
    assert math.isclose(get(str(tmp_path), "r1")["top1"], 90.0)


def test_a_cancelled_run_stays_cancelled(tmp_path):
    """A merge or a failure that slips past the revoke leaves a cancelled run alone."""
    from nasq.results.ending import RunEnded, finish_run, mark_failed
    from nasq.runstate import TRANSITIONS

    class Store:
        """A cancelled run's record; a transition takes effect only from the states it starts from."""

        runs = ledger = property(lambda self: self)

        def __init__(self):
            self.writes = []

        def manifest(self, run_id):
            from plans import run_manifest

            return run_manifest(run_id, [{"shard_id": "s0", "start": 0, "stop": 1}])

        def state(self, run_id):
            return {"state": "cancelled"}

        def report(self, run_id):
            from nasq.rundata import Report

            return Report(run_id, images=0, per_device=(), state="cancelled", complete=False, partial=True)

        def attempts(self, run_id):
            return {"s0": 1}

        def finished(self, run_id):
            return {}

        def running(self, run_id):
            return {}

        def transition(self, run_id, name, **kw):
            if "cancelled" in TRANSITIONS[name][0]:
                self.writes.append((name, kw))
            return False, "cancelled"

    store = Store()
    with pytest.raises(RunEnded, match="cancelled"):
        finish_run("r1", [], store=store, report_dir=str(tmp_path), merge_wait_s=1, first_try=0)
    assert not mark_failed(store, store.runs.manifest("r1"), [], RuntimeError("x"), str(tmp_path))
    assert store.writes == [] and list(tmp_path.iterdir()) == []


def test_simulated_devices_name_every_option_that_changes_their_timing():
    from nasq.backends.sim_backend import SimBackend, parse_sim

    def text(options):
        b = SimBackend.__new__(SimBackend)
        b.spec = parse_sim(options)
        return b.describe_device()
    assert text(None) == "SIMULATED (rate 310p3, not a measurement)"
    names = {text(o) for o in ("slow=1", "slow=2", "slow=4", "slow=2,read_mbps=100", "decode=device")}
    assert len(names) == 5 and "slow 2," in text("slow=2") and "read_mbps 100" in text("read_mbps=100")
