"""How much broker memory a run takes: one run of SIMULATED workers over an index-only dataset on
a private Redis, its ``used_memory`` before submission, at its peak and after the report,
per image and per shard. The devices are simulated (fast, so the run is short): this measures
what nasq keeps in Redis, which does not depend on the device.

    .venv/bin/python bench/broker_memory.py --images 50000 --workers 4
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time

from nasq.api import submit_evaluation
from nasq.config import BackendOptions, Settings
from nasq.queue.local import LocalCluster, WorkerSpec
from nasq.queue.redis_server import free_port, redis_binary, wait_for_redis
from nasq.queue.store import RunStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rate", type=float, default=5000.0, help="simulated img/s per device (default: 5000)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=None, help="default: nasq's own plan")
    ap.add_argument("--out", default=None, help="also write the numbers here (JSON)")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="nasq-mem-")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    redis = subprocess.Popen([redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                              "no", "--maxmemory-policy", "noeviction", "--dir", work],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for_redis(url, redis), "redis-server did not start"
    weights = os.path.join(work, "fleet.sim")
    with open(weights, "wb") as f:
        f.write(os.urandom(256))
    settings = Settings(broker_url=url, report_dir=os.path.join(work, "rep"), artifact_dir=os.path.join(work, "art"),
                        work_dir=os.path.join(work, "runs"), read_roots=work)
    cluster = LocalCluster([WorkerSpec(backend="sim", queues=("eval.mem",), name=f"sim{i}@mem",
                                       options=BackendOptions(threads=1, sim=f"rate={args.rate}")) for i in range(args.workers)],
                           workdir=os.path.join(work, "workers"), broker_url=url, settings=settings, log=lambda *_: None)
    cluster.start()
    store = RunStore(url)
    try:
        store.r.config_resetstat()
        before = store.r.info("memory")["used_memory"]
        h = submit_evaluation(weights=weights, data=f"index:{args.images}", backend="sim", batch_size=args.batch_size,
                              shard_size=args.shard_size, queue="eval.mem", settings=settings, log=lambda *_: None)
        res = h.wait(progress=False, timeout=3600, log=lambda *_: None)
        time.sleep(1)
        info = store.r.info("memory")
        shards = res.report.shards
        keys = {k.decode(): store.r.memory_usage(k) or 0 for k in store.r.scan_iter(f"nasq:run:{h.run_id}:*")}
        row = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "redis": store.r.info("server")["redis_version"], "images": args.images, "shards": shards,
               "used_memory_before": before, "used_memory_after": info["used_memory"],
               "used_memory_peak": info["used_memory_peak"],
               "run_bytes": info["used_memory"] - before,
               "run_bytes_per_image": round((info["used_memory"] - before) / args.images, 1),
               "run_keys_bytes": sum(keys.values()),
               "largest_keys": dict(sorted(keys.items(), key=lambda kv: -kv[1])[:6])}
        print(json.dumps(row, indent=1))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(row, f, indent=2)
        h.close()
    finally:
        cluster.stop()
        redis.terminate()
        redis.wait(10)


if __name__ == "__main__":
    main()
