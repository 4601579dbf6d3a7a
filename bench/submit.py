"""Submission time: ``submit_evaluation`` of a run of N shards to a private Redis with the
persistence a nasq broker should run with (appendonly yes, appendfsync always) and no worker
taking the shards, so that only the submission is timed. Prints the seconds and the Redis
commands it took (INFO commandstats), three times per size, and writes them to --out.

    .venv/bin/python bench/submit.py --shards 64 256 --out bench/results/submit.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import redis

from nasq.api import submit_evaluation
from nasq.config import Settings
from nasq.queue.redis_server import spawn_redis, stop_process

IMAGES = 50_000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, nargs="+", default=[64, 256], help="shard counts (default: 64 256)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="bench/results/submit.json")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="nasq-submit-")
    proc, url = spawn_redis(["--save", "", "--appendonly", "yes", "--appendfsync", "always", "--dir", work,
                             "--maxmemory-policy", "noeviction"])
    rows = []
    try:
        weights = os.path.join(work, "w.sim")
        with open(weights, "wb") as f:
            f.write(os.urandom(256))
        settings = Settings(broker_url=url, report_dir=os.path.join(work, "rep"), work_dir=os.path.join(work, "runs"),
                            artifact_dir=os.path.join(work, "art"), read_roots=work)
        r = redis.Redis.from_url(url)
        for n in args.shards:
            size = IMAGES // n // 8 * 8  # batch-aligned: at least n shards
            for _ in range(args.repeat):
                r.config_resetstat()
                t = time.perf_counter()
                h = submit_evaluation(weights=weights, data=f"index:{IMAGES}", backend="sim", batch_size=8,
                                      shard_size=size, queue="eval.nobody", settings=settings, log=lambda *_: None)
                seconds = time.perf_counter() - t
                calls = {k.removeprefix("cmdstat_"): v["calls"] for k, v in r.info("commandstats").items()}
                row = {"shards": len(h.manifest.shards), "seconds": round(seconds, 4),
                       "redis_commands": sum(calls.values()),
                       "top": dict(sorted(calls.items(), key=lambda kv: -kv[1])[:5])}
                rows.append(row)
                print(json.dumps(row), flush=True)
                h.close()
    finally:
        stop_process(proc)
    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "persistence": "appendonly yes, appendfsync always", "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
