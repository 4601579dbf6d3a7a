"""Celery's own command line reaches a nasq deployment with the documented app, ``celery -A
workers.app``, given only NASQ_BROKER_URL (or the settings file), as ``nasq worker`` reads them:
``inspect ping``, ``inspect active`` (a shard running now), ``status`` and ``events --dump``
against real workers on a real Redis."""
import os
import subprocess
import sys
import threading
import uuid

from nasq.api import submit_evaluation
from nasq.config import Settings
from nasq.queue.store import RunStore
from waiting import Waiter, sim_weights, until


def _celery(args, env, timeout=60):
    return subprocess.run([sys.executable, "-m", "celery", "-A", "workers.app", *args], env=env, cwd="/",
                          capture_output=True, text=True, timeout=timeout)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NASQ_")}
    return {**env, **extra}


def test_celery_inspect_status_and_events_reach_the_deployments_workers(redis_url, start_workers, tmp_path):
    queue = f"eval.celery-{uuid.uuid4().hex[:6]}"
    settings = Settings(broker_url=redis_url, report_dir=str(tmp_path / "rep"), lease_s=5)
    fleet = start_workers(redis_url, queue, backend="sim", devices=["npu:0", "npu:1"], sim="rate=40", settings=settings)
    env = _env(NASQ_BROKER_URL=redis_url)
    ping = _celery(["inspect", "ping", "--timeout", "2"], env)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    for name in fleet.names:
        assert f"->  {name}: OK" in ping.stdout and "pong" in ping.stdout, ping.stdout
    status = _celery(["status", "--timeout", "2"], env)
    assert status.returncode == 0 and all(f"{n}: OK" in status.stdout for n in fleet.names), status.stdout
    assert "nodes online" in status.stdout
    # the same, from the settings file instead of the environment
    (tmp_path / "nasq.toml").write_text(f'[nasq]\nbroker_url = "{redis_url}"\n')
    from_file = _celery(["inspect", "ping", "--timeout", "2"], _env(NASQ_CONFIG=str(tmp_path / "nasq.toml")))
    assert all(f"->  {n}: OK" in from_file.stdout for n in fleet.names), from_file.stdout + from_file.stderr
    # inspect active: the shards running now, by their task ids
    h = submit_evaluation(weights=sim_weights(tmp_path), data="index:480", backend="sim", batch_size=8,
                          shard_size=40, queue=queue, settings=settings)
    waiter = Waiter(h, timeout=120)
    store = RunStore(redis_url)
    until(lambda: store.ledger.running(h.run_id), 60, "a shard running")
    active = _celery(["inspect", "active", "--timeout", "2"], env)
    assert active.returncode == 0, active.stdout + active.stderr
    assert h.run_id in active.stdout and "nasq.eval_shard" in active.stdout, active.stdout
    waiter.join(130)
    assert waiter.error is None, waiter.error
    # events --dump: the workers' heartbeats as Celery's event stream shows them
    dump = subprocess.Popen([sys.executable, "-m", "celery", "-A", "workers.app", "events", "--dump"],
                            env={**env, "PYTHONUNBUFFERED": "1"}, cwd="/", stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(dump.stdout), daemon=True).start()
    try:
        until(lambda: all(any(n in line and "heartbeat" in line for line in list(lines)) for n in fleet.names), 30,
              "each worker's heartbeat in celery events --dump")
    finally:
        dump.terminate()
        dump.wait(10)
    # without any setting the app has no broker, and Celery says so rather than reaching a stranger
    lost = _celery(["inspect", "ping", "--timeout", "2"], _env(), timeout=60)
    assert not any(f"->  {n}: OK" in lost.stdout for n in fleet.names)
