"""What nasq relies on from kombu's Redis layout, the run's merge task ids, and how workers are
started: each checked against the real thing (real Redis, real worker processes)."""
import json
import os
import subprocess
import uuid

import pytest

from nasq.api import evaluate_local, submit_evaluation
from nasq.config import Settings
from nasq.errors import RunError
from nasq.queue.app import make_app
from nasq.queue.store import RunStore
from nasq.queue.transport import BrokerView
from nasq.wire import merge_task_id, shard_task_id
from waiting import sim_weights

def _drop_message(r, queue: str, task_id: str) -> None:
    """Take one message off a queue, as a broker that lost it would."""
    for raw in r.lrange(queue, 0, -1):
        if json.loads(raw)["headers"]["id"] == task_id:
            assert r.lrem(queue, 1, raw) == 1
            return
    raise AssertionError(f"{task_id} is not in {queue}")


def test_kombu_keeps_the_redis_layout_nasq_reads(other_db):
    """A queued message (each priority step), a delivered unacknowledged one: BrokerView finds
    them where kombu puts them. If a kombu release moves them, this fails (and healing, resume
    and stranded-shard detection would go blind)."""
    url = other_db(11)
    settings = Settings(broker_url=url)
    app = make_app(settings)
    queue = f"q.layout-{uuid.uuid4().hex[:6]}"
    view = BrokerView.for_app(app, settings)
    ids = []
    for priority in (0, 3, 9):
        tid = f"layout-{uuid.uuid4().hex[:6]}"
        app.send_task("nasq.nothing", args=(), queue=queue, task_id=tid, priority=priority)
        ids.append(tid)
    assert view.queued(queue) == 3 and view.queued_task_ids(queue) == set(ids)
    with app.connection_for_read() as conn:
        simple = conn.SimpleQueue(queue, accept=["application/json"])  # whatever this process's serializers
        message = simple.get(timeout=5)  # delivered, not acknowledged
        tid = message.headers["id"]
        assert tid in view.unacked_ages() and view.queued(queue) == 2
        message.ack()
        assert tid not in view.unacked_ages()
        simple.close()
    assert view.server_id()


def test_stranded_shards_recover_with_a_separate_result_backend(other_db, start_workers, tmp_path):
    """Broker and result backend on two Redis databases: a shard whose message is lost is found
    stranded (the queue is read on the broker, not the result backend) and sent again once; the
    shards still queued are not."""
    broker, backend = other_db(12), other_db(13)
    RunStore(broker).r.flushdb()
    settings = Settings(broker_url=broker, result_backend=backend, lease_s=2, report_dir=str(tmp_path / "rep"))
    queue = f"eval.split-{uuid.uuid4().hex[:6]}"
    weights = sim_weights(tmp_path)
    h = submit_evaluation(weights=weights, data="index:160", backend="sim", batch_size=4, shard_size=20, queue=queue,
                          settings=settings, log=lambda *_: None)
    lost = h.manifest.shards[5].shard_id
    _drop_message(RunStore(broker).r, queue, shard_task_id(h.run_id, lost))
    start_workers(broker, queue, backend="sim", sim="rate=40", settings=settings)
    res = h.wait(progress=False, timeout=120, log=lambda *_: None)
    store = RunStore(backend)
    assert res.report.images == 160 and res.report.redispatched_shards == {lost: 1}
    assert set(store.ledger.attempts(h.run_id).values()) == {1}  # the queued ones ran once
    assert res.predictions["top5"] == evaluate_local(weights=weights, data="index:160", backend="sim",
                                                     batch_size=4)["top5"]
    assert store.runs.manifest(h.run_id) and not RunStore(broker).runs.manifest(h.run_id)  # records are on the backend
    h.close()


def test_cancel_after_resume_revokes_the_resumed_merge(redis_url, start_workers, tmp_path):
    settings = Settings(broker_url=redis_url, lease_s=2, report_dir=str(tmp_path / "rep"))
    queue = f"eval.cr-{uuid.uuid4().hex[:6]}"
    h = submit_evaluation(weights=sim_weights(tmp_path), data="index:64", backend="sim", batch_size=4,
                          shard_size=16, queue=queue, settings=settings, log=lambda *_: None)
    store = RunStore(redis_url)
    lost = h.manifest.shards[3].shard_id
    _drop_message(store.r, queue, shard_task_id(h.run_id, lost))
    w = start_workers(redis_url, queue, backend="sim", sim="rate=2", settings=settings)  # 8 s a shard
    from nasq.api import cancel, resume

    with pytest.raises(RunError, match="did not finish within"):
        resume(h.run_id, settings=settings, progress=False, timeout=1, log=lambda *_: None)
    assert merge_task_id(h.run_id, 1) in store.runs.merge_ids(h.run_id)
    cancel(h.run_id, settings=settings, log=lambda *_: None)
    revoked = {tid for ids in (make_app(settings).control.inspect(destination=w.names, timeout=5).revoked() or {})
               .values() for tid in ids}
    assert {merge_task_id(h.run_id), merge_task_id(h.run_id, 1)} <= revoked
    assert store.runs.state(h.run_id)["state"] == "cancelled"
    h.close()


def test_an_embedded_run_ignores_a_workers_folder_in_the_current_directory(assets, nasq_cli, tmp_path):
    """`python -m workers` in a folder holding a `workers/` package would run that package: nasq
    starts its workers with -P (no current folder on sys.path). (The simulated device: what runs
    the shards is the point, not the model.)"""
    decoy = tmp_path / "decoy"
    (decoy / "workers").mkdir(parents=True)
    marker = tmp_path / "decoy-ran"
    (decoy / "workers" / "__init__.py").write_text("")
    (decoy / "workers" / "__main__.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nraise SystemExit(3)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NASQ_")}
    env["NASQ_WORK_DIR"] = str(tmp_path / "runs")
    env["NASQ_REPORT_DIR"] = str(tmp_path / "rep")
    p = subprocess.run(nasq_cli + ["eval", "--backend", "sim", "--weights", sim_weights(tmp_path), "--data",
                                   assets["data"], "--workers", "1", "-b", "4", "--no-progress"],
                       capture_output=True, text=True, cwd=decoy, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "20 evaluated of 23" in p.stdout and not marker.exists()
