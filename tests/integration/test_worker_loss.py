"""A worker process that dies mid-shard loses nothing: the shard is redelivered and the run completes."""
import os
import signal
import time
import uuid

import numpy as np
import pytest

from nasq.api import evaluate_local, submit_evaluation
from nasq.queue.app import make_app
from nasq.queue.store import RunStore

pytestmark = pytest.mark.slow


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
        while time.time() < deadline and not store.running(run_id):
            time.sleep(0.05)
        assert store.running(run_id), "no shard started"
        stats = app.control.inspect(destination=[w.names[0]], timeout=2).stats()[w.names[0]]
        child = stats["pool"]["processes"][0]
        os.kill(child, signal.SIGKILL)
        report = result.get(timeout=120)
        attempts = store.attempts(run_id)
        assert max(attempts.values()) == 2  # the killed shard ran twice
        assert report["images"] == 20 and report["top1"] == 100.0
        ref = evaluate_local(weights=assets["weights"], data=assets["data"], labels=assets["labels"], batch_size=4,
                             settings=settings)
        assert store.predictions(run_id)["top5"] == ref["top5"]
        assert np.allclose(store.predictions(run_id)["scores"], ref["scores"], atol=1e-4)
    finally:
        w.stop()
