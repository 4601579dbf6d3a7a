"""Real Redis, real worker processes: the distributed result equals the single-process one."""
import json
import os
import time
import uuid

import numpy as np
import pytest

from nasq.api import evaluate, evaluate_local
from nasq.config import Settings
from nasq.data.preprocess import preprocess
from nasq.queue.app import make_app
from nasq.wire import TASK_EVAL_SHARD, TASK_MERGE
from nasq.queue.store import RunStore

def _same_predictions(dist: dict, ref: dict):
    assert dist["names"] == ref["names"]
    assert dist["labels"] == ref["labels"]
    assert dist["top5"] == ref["top5"]
    assert np.allclose(dist["scores"], ref["scores"], atol=1e-4)


def test_multiworker_equals_single_process(assets, workers, settings):
    res = evaluate(weights=assets["weights"], data=assets["data"], labels=assets["labels"], batch_size=4,
                   shard_size=4, queue=workers.queue, settings=settings, progress=False, log=lambda *_: None)
    ref = evaluate_local(weights=assets["weights"], data=assets["data"], labels=assets["labels"], batch_size=4,
                         settings=settings)
    _same_predictions(res.predictions, ref)
    r = res.report
    assert r.images == 20 and r.images_total == 23 and r.error_count == 3
    assert {e["name"] for e in r.errors} == assets["bad"]
    assert r.top1 == 100.0 and r.top5 == 100.0
    assert r.shards == 6 and len(r.per_device) == 2  # both workers took shards
    assert sum(d["images"] for d in r.per_device) == 20
    assert r.throughput_img_s > 0 and all(d["img_s_compute"] > 0 for d in r.per_device)
    assert r.model["arch"] == "tiny" and r.num_outputs == 1001
    assert RunStore(settings.broker_url).runs.state(res.run_id)["state"] == "done"


def test_u8_and_bin_forms_give_the_same_predictions(assets, workers, settings, tmp_path):
    ref = evaluate_local(weights=assets["weights"], data=assets["data"], labels=assets["labels"], batch_size=4,
                         settings=settings)
    for fmt in ("u8", "bin"):
        dst = tmp_path / fmt
        preprocess(assets["data"], str(dst), fmt=fmt, workers=2, shard_size=8, progress=False)
        res = evaluate(weights=assets["weights"], data=str(dst), labels=assets["labels"], batch_size=4,
                       shard_size=8, queue=workers.queue, settings=settings, progress=False, log=lambda *_: None)
        by_stem = {os.path.splitext(n)[0]: i for i, n in enumerate(ref["names"])}
        order = [by_stem[os.path.splitext(n)[0]] for n in res.predictions["names"]]
        assert len(order) == 20 and res.report.error_count == 3, fmt
        assert res.predictions["top5"] == [ref["top5"][i] for i in order], fmt
        assert np.allclose(res.predictions["scores"], [ref["scores"][i] for i in order], atol=1e-4), fmt


def test_1000_outputs_and_ais_bench_output_layout(assets, workers, settings, tmp_path):
    out = tmp_path / "result"
    res = evaluate(weights=assets["weights"], data=assets["data"], labels=assets["labels"], batch_size=4,
                   num_outputs=1000, queue=workers.queue, settings=settings, progress=False,
                   output_dir=str(out), outfmt="TXT", log=lambda *_: None)
    assert res.report.num_outputs == 1000 and res.report.top1 == 100.0
    files = sorted(os.listdir(out))
    assert len(files) == 20 and files[0] == "ILSVRC2012_val_00000001_0.txt"
    row = np.loadtxt(out / files[0])
    assert row.shape == (1000,) and int(np.argmax(row)) == res.predictions["top5"][0][0]


def _shard_results(store, manifest):
    """The shards' kept results (a run's shards are sent with ignore_result: Celery keeps none)."""
    kept = store.ledger.shard_results(manifest.run_id)
    return [kept[sid] for sid in manifest.shard_ids]


def test_duplicate_shard_result_ignored_and_missing_shard_named(assets, workers, settings, start_workers,
                                                                redis_url):
    from nasq.api import submit_evaluation

    res = evaluate(weights=assets["weights"], data=assets["data"], labels=assets["labels"], batch_size=4,
                   shard_size=8, queue=workers.queue, settings=settings, progress=False, log=lambda *_: None)
    app = make_app(settings)
    store = RunStore(settings.broker_url)
    manifest = store.runs.manifest(res.run_id)
    results = _shard_results(store, manifest)
    # A redelivered shard (the same message again, after the run was merged) is skipped; a second
    # result of a shard (a copy that ran: the hung worker that came back) is dropped and counted;
    # the report the client has is the report kept, in Redis and on disk.
    again = manifest.tasks()[1]
    out = app.signature(TASK_EVAL_SHARD, args=again.args(), queue=workers.queue).apply_async().get(timeout=60)
    assert out["status"] == "skipped" and "done" in out["reason"] and store.ledger.dropped(res.run_id) == {}
    second = dict(store.ledger.shard_results(res.run_id)[again.shard_id], worker="elsewhere@host")
    assert store.ledger.commit_shard(res.run_id, again.shard_id, holder="elsewhere@host#1", status="ok", result=second,
                              summary={"status": "ok", "worker": "elsewhere@host"}) == ("dropped", "late")
    assert store.ledger.dropped(res.run_id) == {again.shard_id: 1}
    # The chord firing again with the duplicate (same shard id, different timing and worker) merges nothing.
    dup = dict(results[1], worker="elsewhere@host", timing=dict(results[1]["timing"], wall_s=99.0))
    headline = app.signature(TASK_MERGE, args=(results + [dup],), kwargs={"run_id": res.run_id},
                             queue=workers.queue).apply_async().get(timeout=60)
    merged = store.runs.report(res.run_id)  # the report is in the run store
    assert headline["merged"] is False and headline["run_id"] == res.run_id
    assert merged == res.report  # a merged run is left alone
    assert merged.images == res.report.images and merged.top1 == res.report.top1
    assert "elsewhere@host" not in {d["worker"] for d in merged.per_device}
    with open(res.report.files["json"]) as f:
        assert json.load(f) == res.report.to_payload()
    # A shard whose result never arrived (and is not running anywhere): the run fails, naming it.
    # Run B has no worker on its queue; the run store holds the results of its first two shards
    # (run A's, the same images) and lost the third, whose message is gone too.
    quiet = f"eval.quiet-{uuid.uuid4().hex[:6]}"
    b = submit_evaluation(weights=assets["weights"], data=assets["data"], labels=assets["labels"], batch_size=4,
                          shard_size=8, queue=quiet, settings=settings, log=lambda *_: None)
    store.r.delete(quiet)  # the messages are lost
    kept = store.ledger.shard_results(res.run_id)
    gone = b.manifest.shards[2].shard_id
    for sid in b.manifest.shard_ids[:2]:
        r = {**kept[sid], "run_id": b.run_id}
        assert store.ledger.commit_shard(b.run_id, sid, holder="planted", status="ok", result=r,
                                  summary={"status": "ok", "worker": r["worker"], "images": len(r["indices"])}
                                  )[0] == "accepted"
    # (the merge waits merge_wait_s for a shard that may still come: a merging worker that waits 3 s)
    merger = start_workers(redis_url, f"merge-{uuid.uuid4().hex[:6]}", settings=Settings(merge_wait_s=3))
    with pytest.raises(Exception, match=gone):
        app.signature(TASK_MERGE, args=([],), kwargs={"run_id": b.run_id},
                      queue=merger.queue).apply_async().get(timeout=60)
    merger.stop()
    st = store.runs.state(b.run_id)
    assert st["state"] == "failed" and gone in st["error"] and "nasq resume" in st["error"]
    # nothing lost: what finished is kept as a partial report ...
    partial = store.runs.report(b.run_id)
    assert partial.partial is True and partial.shards_not_ok == (gone,)
    gone_images = len(next(r for r in results if r["shard_id"] == gone)["indices"])
    assert partial.images == res.report.images - gone_images
    assert os.path.isfile(partial.files["json"])
    # ... and `resume` (a worker on the run's queue now) reruns only the missing shard, then merges everything
    from nasq.api import resume

    t_resume = time.time()  # (the failed merge's healing may have queued the missing shard: it runs once w is up)
    w = start_workers(redis_url, quiet)
    try:
        done = resume(b.run_id, settings=settings, progress=False, log=lambda *_: None)
    finally:
        w.stop()
        b.close()
    assert not done.report.partial and done.report.images == res.report.images
    # every file of the resumed run's report is there (not the failed run's record of its own)
    assert done.not_rendered == {} and all(os.path.getsize(p) > 0 for p in done.report.files.values())
    assert done.predictions["top5"] == res.predictions["top5"]
    rerun = {sid for sid, f in store.ledger.finished(b.run_id).items() if f.get("finished_at", 0) > t_resume}
    assert rerun == {gone}  # only that shard ran again
    assert store.runs.state(b.run_id)["state"] == "done"


class _Planted:
    """Unpickling this creates a file: proof that pickle content was (not) decoded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_refused_by_workers_and_client(assets, workers, settings, tmp_path):
    from celery import Celery
    from kombu.exceptions import ContentDisallowed, DecodeError

    app = make_app(settings)
    assert app.conf.accept_content == ["json"] and app.conf.result_accept_content == ["json"]
    assert app.conf.task_serializer == app.conf.result_serializer == "json"
    # Someone with access to Redis sends a pickled task: the worker must refuse to decode it.
    worker_marker = tmp_path / "worker-unpickled"
    evil = Celery(broker=settings.broker_url, backend=settings.broker_url)
    evil.conf.task_serializer = "pickle"
    evil.conf.accept_content = ["pickle", "json"]
    evil.conf.result_serializer = "pickle"
    evil.conf.result_accept_content = ["pickle", "json"]
    r = evil.send_task(TASK_EVAL_SHARD, args=("evil-run", "shard-x", 0, 1, {"x": _Planted(str(worker_marker))}),
                       queue=workers.queue)
    deadline = time.time() + 20
    while time.time() < deadline and "untrusted content of type pickle" not in workers.log_text():
        time.sleep(0.5)
    assert "Refusing to deserialize untrusted content of type pickle" in workers.log_text()
    assert not worker_marker.exists()
    assert r.state == "PENDING"  # never executed
    assert RunStore(settings.broker_url).ledger.attempts("evil-run") == {}
    # A pickled result planted in the backend is not unpickled by the client.
    # (a fresh key: the evil backend itself would unpickle a value planted by an earlier session)
    client_marker = tmp_path / "client-unpickled"
    planted = f"planted-pickle-{uuid.uuid4().hex}"
    evil.backend.store_result(planted, _Planted(str(client_marker)), "SUCCESS")
    with pytest.raises((ContentDisallowed, DecodeError)):
        app.AsyncResult(planted).get(timeout=5)
    assert not client_marker.exists()


def test_wrong_backend_worker_reports_clear_error(assets, workers, settings, tmp_path):
    from nasq.artifacts import steps
    from nasq.artifacts.spec import make_spec
    from nasq.errors import RunError

    spec = make_spec(weights=assets["weights"], target="onnx", cache_dir=str(tmp_path))
    steps.export(spec, str(tmp_path), [])
    steps.simplify(spec, str(tmp_path), [])
    with pytest.raises(RunError, match="runs backend 'torch' but the run asked for 'onnxruntime'"):
        evaluate(weights=str(tmp_path / "model.onnx"), data=assets["data"], labels=assets["labels"], backend="onnxruntime",
                 batch_size=4, queue=workers.queue, settings=settings, progress=False, log=lambda *_: None)
