"""A worker process that dies mid-shard loses nothing: the shard is redelivered and the run completes."""
import os
import signal
import time
import uuid

import numpy as np
import pytest

from conftest import Workers
from nasq.api import evaluate_local
from nasq.celery_app import make_app
from nasq.runstate import RunStore
from producer.submit import submit_run

pytestmark = pytest.mark.slow


def test_killed_worker_child_requeues_its_shard(assets, redis_url, settings, tmp_path):
    from nasq.data import open_source

    w = Workers(redis_url, f"eval.loss-{uuid.uuid4().hex[:6]}", str(tmp_path))
    w.start(1)
    try:
        app = make_app(settings)
        store = RunStore(redis_url)
        source = open_source(assets["data"])
        manifest, result = submit_run(app, store, dataset=source.describe(), labels=assets["labels"],
                                      model={"weights": assets["weights"], "num_outputs": None, "options": {}},
                                      backend="torch", batch_size=4, precision=None, shard_size=12, queue=w.queue)
        run_id = manifest["run_id"]
        # The first shard loads the model (seconds): kill the pool child while it runs.
        deadline = time.time() + 60
        while time.time() < deadline and not store.running(run_id):
            time.sleep(0.05)
        assert store.running(run_id), "no shard started"
        stats = app.control.inspect(destination=[w.procs[0][0]], timeout=2).stats()[w.procs[0][0]]
        child = stats["pool"]["processes"][0]
        os.kill(child, signal.SIGKILL)
        report = result.get(timeout=120)
        attempts = {k.decode(): int(v) for k, v in store.r.hgetall(f"nasq:run:{run_id}:attempts").items()}
        assert max(attempts.values()) == 2  # the killed shard ran twice
        assert report["images"] == 20 and report["top1"] == 100.0
        ref = evaluate_local(weights=assets["weights"], data=assets["data"], labels=assets["labels"], batch_size=4,
                             settings=settings)
        assert store.predictions(run_id)["top5"] == ref["top5"]
        assert np.allclose(store.predictions(run_id)["scores"], ref["scores"], atol=1e-4)
    finally:
        w.stop()
