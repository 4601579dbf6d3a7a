"""Merge validation: exactly one result per shard, all present, every image accounted for."""
import pytest
from plans import run_manifest

from nasq.errors import RunError
from nasq.wire import plan_even, plan_shards
from nasq.results.merge import MissingShards, accuracy, collect, merge
from nasq.results.report import render


def _manifest(n=10, size=4):
    return run_manifest("r1", plan_shards(n, size, 2), batch_size=2)


def _result(s, worker="w1", t0=100.0):
    idx = list(range(s.start, s.stop))
    return {"run_id": "r1", "shard_id": s.shard_id, "status": "ok", "worker": worker, "device": "cpu",
            "backend": "torch", "indices": idx, "names": [f"{i}.JPEG" for i in idx], "labels": [i % 3 for i in idx],
            "top5": [[i % 3, 7, 8, 9, 10] for i in idx], "scores": [[1.0] * 5 for _ in idx], "errors": [],
            "num_outputs": 1001, "timing": {"data_s": 0.1, "compute_s": 1.0, "wall_s": 1.2, "started_at": t0,
                                             "finished_at": t0 + 1.2}}


def test_plan_shards_cover_range_in_batch_multiples():
    shards = plan_shards(50, 7, 4)
    assert [s["stop"] - s["start"] for s in shards] == [8] * 6 + [2]
    assert shards[0]["start"] == 0 and shards[-1]["stop"] == 50
    assert all(a["stop"] == b["start"] for a, b in zip(shards, shards[1:]))
    assert plan_shards(0, 8, 4) == []
    # the default plan: a few shards per worker, at most 1000 images, at least a batch, even
    big = plan_even(50_000, 8, 8)
    assert len(big) == 50 and {s["stop"] - s["start"] for s in big} == {1000}
    assert [s["stop"] - s["start"] for s in plan_even(64, 2, 8)] == [8] * 8
    fleet = plan_even(50_000, 64, 8)
    sizes = [s["stop"] - s["start"] for s in fleet]
    assert len(fleet) == 256 and set(sizes) <= {192, 200} and sum(sizes) == 50_000
    assert all(s["start"] % 8 == 0 for s in fleet) and fleet[-1]["stop"] == 50_000
    assert [s["stop"] - s["start"] for s in plan_even(23, 2, 4)] == [4, 4, 4, 4, 4, 3]


def test_duplicate_dropped_and_report_correct():
    m = _manifest()
    results = [_result(s) for s in m.shards]
    dup = _result(m.shards[1], worker="w2", t0=101.0)  # redelivered: differs in more than a byte
    report, pred = merge(m, results[:2] + [dup] + results[2:])
    assert report.duplicate_shard_results_dropped == (m.shards[1].shard_id,)
    assert report.images == 10 and pred["indices"] == list(range(10))
    assert report.top1 == 100.0 and report.correct["top1"] == 10
    assert "w2" not in {d["worker"] for d in report.per_device}
    assert "duplicate shard results dropped" in render(report)


def test_missing_shard_named():
    m = _manifest()
    results = [_result(s) for s in m.shards]
    with pytest.raises(MissingShards, match="shard-00001") as e:
        collect(m, results[:1] + results[2:])
    assert e.value.missing == ["shard-00001"]


def test_failed_shard_fails_run_with_its_error():
    m = _manifest()
    results = [_result(s) for s in m.shards]
    results[2] = {**results[2], "status": "error", "error": "CUDA out of memory"}
    with pytest.raises(RunError, match="shard-00002 on w1: CUDA out of memory"):
        collect(m, results)


def test_short_shard_detected():
    m = _manifest()
    results = [_result(s) for s in m.shards]
    results[0] = {**results[0], "indices": results[0]["indices"][:-1]}
    with pytest.raises(RunError, match="accounts for 3 images, expected 4"):
        collect(m, results)


def test_foreign_results_ignored():
    m = _manifest()
    results = [_result(s) for s in m.shards] + [{**_result(m.shards[0]), "run_id": "other"}]
    report, _ = merge(m, results)
    assert report.shards == 3


def test_accuracy_topk_and_missing_labels():
    acc = accuracy([1, 2, 3], [[1, 0, 0, 0, 0], [0, 2, 0, 0, 0], [0, 0, 0, 0, 0]])
    assert acc["top1"] == pytest.approx(100 / 3, abs=1e-3) and acc["top2"] == pytest.approx(200 / 3, abs=1e-3)
    assert acc["top5"] == pytest.approx(200 / 3, abs=1e-3)
    assert accuracy([None], [[1, 2, 3, 4, 5]])["top1"] is None


def test_a_failed_run_is_reported_even_when_a_result_cannot_be_read():
    """The merge names a malformed result; the failure path leaves it out and still writes the
    partial report, which lists its shard as not evaluated."""
    from nasq.results.merge import merge_partial
    from nasq.wire import MessageError

    m = _manifest()
    results = [_result(s) for s in m.shards]
    results[1] = {**results[1], "timing": None}  # a worker's result changed in Redis by hand
    with pytest.raises(MessageError, match="timing"):
        collect(m, results)
    report, pred = merge_partial(m, results, "boom")
    assert report.images == 10 - 4 and report.shards_not_ok == (m.shards[1].shard_id,) and not report.complete
    failed = {"status": "error", "run_id": "r1", "shard_id": m.shards[2].shard_id, "worker": None, "host": ""}
    assert merge_partial(m, results[:2] + [failed], "boom")[0].shards_ok == 1  # a failure is never refused
