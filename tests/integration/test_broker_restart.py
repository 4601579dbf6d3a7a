"""A broker restarted mid-run: with persistence the run completes exactly, with no human action;
without it the client says in one line that the broker lost the run and how to rerun it."""
import os
import re
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from nasq.api import evaluate_local, submit_evaluation
from nasq.config import Settings
from nasq.queue.redis_server import free_port, redis_binary, wait_for_redis
from nasq.queue.store import RunStore

pytestmark = pytest.mark.slow  # model builds / a broker restarted: minutes


class Broker:
    """A redis-server on a fixed port and folder that can be killed and started again."""

    def __init__(self, folder, *, appendonly: bool):
        self.port, self.folder, self.appendonly = free_port(), str(folder), appendonly
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None

    def start(self):
        persist = ["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly else ["--appendonly", "no"]
        self.proc = subprocess.Popen([redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--dir", self.folder, "--maxmemory-policy", "noeviction", *persist],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_for_redis(self.url, self.proc), "redis-server did not start"

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def _restart_when_busy(broker, run_id, *, down_s=3.0):
    """Kill the broker while a shard runs, keep it down a few seconds, start it again."""
    store = RunStore(broker.url)
    deadline = time.time() + 60
    while time.time() < deadline and not store.ledger.running(run_id):
        time.sleep(0.02)
    broker.kill()
    time.sleep(down_s)
    broker.start()


def test_a_broker_restarted_with_appendonly_mid_run_costs_nothing(assets, start_workers, tmp_path):
    broker = Broker(tmp_path / "redis", appendonly=True)
    os.makedirs(broker.folder)
    broker.start()
    fast = Settings(broker_url=broker.url, lease_s=3, merge_wait_s=20, broker_outage_s=60)
    w = start_workers(broker.url, n=2, settings=fast)
    try:
        said = []
        handle = submit_evaluation(weights=assets["weights"], data=assets["data"], labels=assets["labels"],
                                   batch_size=1, shard_size=1, queue=w.queue, settings=fast, log=said.append)
        restart = threading.Thread(target=_restart_when_busy, args=(broker, handle.run_id))
        restart.start()
        result = handle.wait(progress=False, timeout=240, log=said.append)
        restart.join()
        assert any("lost the broker" in m for m in said) and any("the broker is back" in m for m in said), said
        ref = evaluate_local(weights=assets["weights"], data=assets["data"], labels=assets["labels"], batch_size=1)
        assert result.predictions["names"] == ref["names"] and result.predictions["top5"] == ref["top5"]
        assert np.allclose(result.predictions["scores"], ref["scores"], atol=1e-4)
        assert result.report.images == 20 and result.report.top1 == 100.0
        # the workers carried on and are in the registry again
        assert set(w.names) <= {n for n, i in RunStore(broker.url).registry.workers().items() if i["alive"]}
    finally:
        w.stop()
        broker.stop()


def test_a_broker_restarted_without_persistence_says_the_run_is_lost(assets, start_workers, nasq_cli, repo,
                                                                    tmp_path):
    broker = Broker(tmp_path / "redis", appendonly=False)
    os.makedirs(broker.folder)
    broker.start()
    fast = Settings(broker_url=broker.url, lease_s=3, broker_outage_s=60)
    w = start_workers(broker.url, n=1, settings=fast)
    try:
        env = {k: v for k, v in os.environ.items() if k != "NASQ_BROKER_URL"}
        client = subprocess.Popen(nasq_cli + ["eval", "--broker", broker.url, "--queue", w.queue, "--weights",
                                              assets["weights"], "--data", assets["data"], "--batch-size", "1",
                                              "--shard-size", "1", "--no-progress", "--timeout", "120"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=repo, env=env)
        said = []
        for line in client.stderr:  # once the run is submitted
            said.append(line)
            if re.match(r"run \S+: \d+ images in", line):
                break
        _restart_when_busy(broker, line.split()[1].rstrip(":"), down_s=1.0)
        out, err = client.communicate(timeout=180)
        err = "".join(said) + err
        assert client.returncode == 5, err  # the broker lost the run (nasq.cli.exits.BROKER)
        last = err.strip().splitlines()[-1]
        assert "the broker lost run" in last and "rerun it with: nasq eval --broker" in last, err
        assert "Traceback" not in err
    finally:
        w.stop()
        broker.stop()
