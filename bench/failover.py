"""Failover benchmark: a run on healthy SIMULATED devices alone, then the same run with one more
device that fails every shard, on a real Redis (appendonly, appendfsync always).

Each run is timed from submission to the client holding the report's numbers. The failing
device fails at once (``--sim fail_after=0``: the fastest failure, the one that would eat the
most of the queue), or after its first N images, in the middle of a shard (``--fail-after N``). The second run must
give the first run's predictions image for image, exclude the failing device after
``device_max_failures`` (2) failures, and take at most ``1.5 x`` the healthy run's time. The
devices are simulated: this measures the queue's failover, not a model.

    .venv/bin/python bench/failover.py --healthy 3 --images 9600 --shard-size 96
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fleet import rate, workspace  # noqa: E402 - a Redis and settings, as bench/fleet.py makes them

from nasq.api import submit_evaluation  # noqa: E402
from nasq.config import BackendOptions  # noqa: E402
from nasq.queue.local import LocalCluster, WorkerSpec  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--healthy", type=int, default=3, help="healthy devices (default: 3)")
    ap.add_argument("--images", type=int, default=9600)
    ap.add_argument("--shard-size", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rate", type=rate, default=176.0, help="img/s per device, or 310p3 (default: 310p3, 176)")
    ap.add_argument("--fail-after", type=int, default=0, help="images the failing device does per shard before "
                                                               "failing (default: 0, at once)")
    ap.add_argument("--out", default="bench/results/failover.json")
    args = ap.parse_args()

    work, redis, weights, settings = workspace("nasq-failover-", lease_s=5)

    def cluster(queue: str, names: list[str], sim: str) -> LocalCluster:
        c = LocalCluster([WorkerSpec(device=f"npu:{i}", backend="sim", queues=(queue,), name=n,
                                     options=BackendOptions(threads=1, sim=sim)) for i, n in enumerate(names)],
                         workdir=os.path.join(work, "workers", names[0]), broker_url=redis.url, settings=settings,
                         ready_timeout=600, log=lambda *_: None)
        c.start()
        return c

    def run(queue: str) -> tuple[float, dict]:
        t0 = time.time()
        h = submit_evaluation(weights=weights, data=f"index:{args.images}", backend="sim", batch_size=args.batch_size,
                              shard_size=args.shard_size, queue=queue, settings=settings, log=lambda *_: None)
        at = {}
        res = h.wait(progress=False, timeout=3600, log=lambda *_: None,
                     on_report=lambda _: at.setdefault("numbers", time.time()))
        h.close()
        return at["numbers"] - t0, res

    rows = {}
    for label, bad in (("healthy alone", False), ("with a failing device", True)):
        queue = f"eval.failover-{len(rows)}"
        healthy = cluster(queue, [f"ok{i}-{len(rows)}@bench" for i in range(args.healthy)], f"rate={args.rate}")
        failing = cluster(queue, [f"bad-{len(rows)}@bench"], f"rate={args.rate},fail_after={args.fail_after}") \
            if bad else None
        wall, res = run(queue)
        rep = res.report
        rows[label] = {"wall_s": round(wall, 2), "images": rep.images, "shards": rep.shards,
                       "excluded": [{k: e.get(k) for k in ("worker", "shards_failed", "reason")}
                                    for e in rep.excluded_devices or []],
                       "shards_that_failed_somewhere": len(rep.shard_failures or {}),
                       "top5": res.predictions["top5"]}
        print(json.dumps({k: v for k, v in rows[label].items() if k != "top5"}), flush=True)
        healthy.stop()
        if failing:
            failing.stop()
    a, b = rows["healthy alone"], rows["with a failing device"]
    exact = a.pop("top5") == b.pop("top5")
    summary = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "healthy_devices": args.healthy, "images": args.images, "shard_size": args.shard_size,
               "batch_size": args.batch_size, "rate_img_s_per_device": args.rate, "fail_after": args.fail_after,
               "runs": rows, "ratio": round(b["wall_s"] / a["wall_s"], 3), "exact": exact,
               "excluded_after": [e["shards_failed"] for e in b["excluded"]]}
    print(json.dumps(summary, indent=1))
    redis.kill()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)
    if not exact or summary["ratio"] > 1.5:
        sys.exit(f"failover: exact={exact}, ratio {summary['ratio']} (target <= 1.5)")


if __name__ == "__main__":
    main()
