"""A worker process that dies mid-shard loses nothing: the shard is redelivered and the run completes."""
import json
import os
import signal
import time
import uuid

import numpy as np

from nasq.api import evaluate_local, submit_evaluation
from nasq.queue.app import make_app
from nasq.queue.store import RunStore

def test_killed_worker_child_requeues_its_shard(assets, redis_url, settings, start_workers):
    w = start_workers(redis_url, f"eval.loss-{uuid.uuid4().hex[:6]}")
    try:
        app = make_app(settings)
        store = RunStore(redis_url)
        handle = submit_evaluation(weights=assets["weights"], data=assets["data"], labels=assets["labels"],
                                   batch_size=4, shard_size=12, queue=w.queue, settings=settings, log=lambda *_: None)
        run_id, result = handle.run_id, handle.result
        # The first shard loads the model (seconds): kill the pool child while it runs.
        deadline = time.time() + 60
        while time.time() < deadline and not store.ledger.running(run_id):
            time.sleep(0.05)
        assert store.ledger.running(run_id), "no shard started"
        stats = app.control.inspect(destination=[w.names[0]], timeout=2).stats()[w.names[0]]
        child = stats["pool"]["processes"][0]
        os.kill(child, signal.SIGKILL)
        report = result.get(timeout=120)
        attempts = store.ledger.attempts(run_id)
        assert max(attempts.values()) == 2  # the killed shard ran twice
        assert report["images"] == 20 and report["top1"] == 100.0
        ref = evaluate_local(weights=assets["weights"], data=assets["data"], labels=assets["labels"], batch_size=4,
                             settings=settings)
        assert store.runs.predictions(run_id)["top5"] == ref["top5"]
        assert np.allclose(store.runs.predictions(run_id)["scores"], ref["scores"], atol=1e-4)
    finally:
        w.stop()


def test_a_machine_lost_mid_shard_costs_a_lease_not_the_visibility_timeout(assets, redis_url, start_workers):
    """A whole worker (main process and pool child: a machine dying) SIGKILLed mid-shard: its
    shard's lease expires, the shard runs again elsewhere, and the waiting client gets the exact
    report, with no human action and long before the 12-hour visibility timeout."""
    import threading

    from nasq.config import Settings

    fast = Settings(broker_url=redis_url, lease_s=3, merge_wait_s=20)
    w = start_workers(redis_url, f"eval.lost-{uuid.uuid4().hex[:6]}", n=2, settings=fast)
    victim_name, victim = w.names[0], w.procs[0][1]
    store = RunStore(redis_url)
    try:
        handle = submit_evaluation(weights=assets["weights"], data=assets["data"], labels=assets["labels"],
                                   batch_size=4, shard_size=4, queue=w.queue, settings=fast, log=lambda *_: None)
        killed = {}

        def kill_when_busy():
            deadline = time.time() + 60
            while time.time() < deadline:
                mine = [sid for sid, r in store.ledger.running(handle.run_id).items() if r["worker"] == victim_name]
                if mine:
                    os.killpg(victim.pid, signal.SIGKILL)
                    killed.update(shard=mine[0], at=time.time())
                    return
                time.sleep(0.02)

        killer = threading.Thread(target=kill_when_busy)
        killer.start()
        result = handle.wait(progress=False, timeout=120, log=lambda *_: None)
        killer.join()
        assert killed, "the victim never took a shard"
        assert victim.poll() is not None  # it is gone for good
        waited = time.time() - killed["at"]
        report = result.report
        assert report.redispatched_shards == {killed["shard"]: 1}
        assert report.images == 20 and report.top1 == 100.0
        ref = evaluate_local(weights=assets["weights"], data=assets["data"], labels=assets["labels"], batch_size=4)
        assert result.predictions["names"] == ref["names"] and result.predictions["top5"] == ref["top5"]
        assert np.allclose(result.predictions["scores"], ref["scores"], atol=1e-4)
        assert waited < 3 + 30, f"recovered {waited:.1f} s after the kill"  # one lease + a shard, with slack
        assert store.runs.state(handle.run_id)["state"] == "done"
    finally:
        w.stop()


def test_a_shard_is_taken_for_dispatching_again_once_and_counted_in_the_same_step(redis_url):
    """Healers racing for a stranded or lost shard: one takes it, and its dispatch count goes up
    in the same atomic step (a claim without its count once left a shard unsendable forever
    after a broker restart fell between the two)."""
    import threading

    store = RunStore(redis_url)
    run = f"race-{uuid.uuid4().hex[:8]}"
    won = []
    threads = [threading.Thread(target=lambda: won.append(store.ledger.claim_stranded(run, "shard-00001", 0, why="test")))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == [0] * 7 + [1] and store.ledger.redispatched(run) == {"shard-00001": 1}  # its count now: 1
    assert store.ledger.claim_stranded(run, "shard-00001", 0, why="test") == 0  # a healer that saw the old count
    assert store.ledger.claim_stranded(run, "shard-00001", why="test") == 2  # reads the count now
    assert store.ledger.redispatched(run) == {"shard-00001": 2} and "shard-00001" in store.ledger.redispatched_at(run)
    assert store.ledger.redispatched_why(run) == {"shard-00001": "test"}
    store.r.hset(f"nasq:run:{run}:running", "shard-00002", json.dumps({"worker": "w9", "host": "h", "device": "cpu"}))
    assert store.ledger.claim_lost(run, "shard-00002") == 1 and store.ledger.claim_lost(run, "shard-00002") == 0  # running, lease gone
    lost = store.ledger.failures(run)["shard-00002"]  # the lost copy is a failure of its worker
    assert [(f["worker"], f["kind"]) for f in lost] == [("w9", "lost")]
    assert store.ledger.redispatched(run)["shard-00002"] == 1 and not store.ledger.running(run)
    assert store.r.ttl(f"nasq:run:{run}:redispatched") > 0
