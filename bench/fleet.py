"""Fleet benchmark: SIMULATED workers (``--backend sim``) x an index-only dataset on a real Redis.

Three runs, each timed from submission to the client holding the report's numbers (``wall_s``;
``files_s``: until the merging worker has rendered the plots and the HTML page too):
  1. undisturbed;
  2. KILL workers SIGKILLed (main process and pool child: machines dying) when 30 % is done;
  3. Redis SIGKILLed and restarted (appendonly) when 30 % is done, the killed workers replaced.
It prints ideal time (images / sum of device rates), wall time, efficiency, queue overhead, merge
time, Redis memory and message sizes, and the queue's own costs: submission time, the gap a
worker leaves between one shard's last batch and the next shard's first (ack, receive, claim),
Redis commands per shard and per idle worker-second, connections per worker and Redis CPU time.
It checks that runs 2 and 3 equal run 1 image for image and writes everything to --out. The
devices are simulated: this measures the queue, not a model. ``--rate 310p3`` is an Ascend
310P3's rate at its best batch (176 img/s: 175.7 at batch 4 in the vendor recipe's table,
``SEED_310P3`` in nasq/backends/sim_backend.py), flat at every batch; ``--rate 2000`` a GPU's.

    .venv/bin/python bench/fleet.py --workers 64 --images 50000 --rate 10
    .venv/bin/python bench/fleet.py --workers 16 --images 50000 --rate 310p3 --faults none
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import tempfile
import threading
import time

from nasq.api import submit_evaluation
from nasq.config import BackendOptions, Settings
from nasq.queue.local import LocalCluster, WorkerSpec
from nasq.queue.redis_server import free_port, redis_binary, wait_for_redis
from nasq.queue.store import RunStore

RATES = {"310p3": 176.0}  # img/s of one device at its best batch


def rate(text: str) -> float:
    return RATES.get(text.lower()) or float(text)


class RedisLoad:
    """What Redis did between two readings: commands by name, CPU seconds, clients now."""

    def __init__(self, r):
        self.r = r
        self.r.config_resetstat()
        self.cpu = self._cpu()

    def _cpu(self) -> float:
        info = self.r.info("cpu")
        return info["used_cpu_sys"] + info["used_cpu_user"]

    def read(self) -> dict:
        stats = {k.removeprefix("cmdstat_"): v["calls"] for k, v in self.r.info("commandstats").items()}
        stats.pop("info", None), stats.pop("config|resetstat", None), stats.pop("config", None)
        return {"commands": sum(stats.values()), "cpu_s": self._cpu() - self.cpu,
                "clients": self.r.info("clients")["connected_clients"],
                "top": dict(sorted(stats.items(), key=lambda kv: -kv[1])[:10])}


def shard_gaps(results: dict) -> list[float]:
    """Per worker, from one shard's last batch to its next shard's first batch (seconds)."""
    by_worker: dict[str, list] = {}
    for r in results.values():
        t = r.get("timing") or r
        if "started_at" in t:
            by_worker.setdefault(r.get("worker"), []).append((t["started_at"], t["finished_at"]))
    gaps = []
    for spans in by_worker.values():
        spans.sort()
        gaps += [b[0] - a[1] for a, b in zip(spans, spans[1:])]
    return sorted(gaps)


class Redis:
    def __init__(self, folder: str):
        self.folder, self.port = folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        self.proc = subprocess.Popen([redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "yes", "--appendfsync", "always", "--dir", self.folder,
                                      "--maxmemory-policy", "noeviction"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_for_redis(self.url, self.proc, timeout=60), "redis-server did not start"

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def workspace(prefix: str, *, lease_s: float) -> tuple[str, Redis, str, Settings]:
    """A temporary folder with a started Redis (appendonly, appendfsync always), weights for the
    simulated devices, and the settings of the benchmark's workers and client."""
    work = tempfile.mkdtemp(prefix=prefix)
    redis = Redis(os.path.join(work, "redis"))
    os.makedirs(redis.folder)
    redis.start()
    weights = os.path.join(work, "fleet.sim")
    with open(weights, "wb") as f:
        f.write(os.urandom(256))
    settings = Settings(broker_url=redis.url, lease_s=lease_s, merge_wait_s=120, broker_outage_s=120,
                        report_dir=os.path.join(work, "reports"), artifact_dir=os.path.join(work, "art"),
                        work_dir=os.path.join(work, "runs"), read_roots=work)  # the workers read the weights there
    return work, redis, weights, settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--rate", type=rate, default=10.0,
                    help="simulated img/s per device, or 310p3 (176) (default: 10)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=None, help="default: nasq's own (a few shards per worker)")
    ap.add_argument("--lease", type=float, default=5.0, help="lease_s (default: 5)")
    ap.add_argument("--kill", type=int, default=8, help="workers killed in run 2 (default: 8)")
    ap.add_argument("--faults", choices=("all", "none"), default="all",
                    help="none: the undisturbed run only (default: all three)")
    ap.add_argument("--idle-s", type=float, default=10.0, help="seconds of the idle fleet measured (default: 10)")
    ap.add_argument("--out", default="bench/results/fleet.json")
    args = ap.parse_args()

    work, redis, weights, settings = workspace("nasq-fleet-", lease_s=args.lease)
    queue = "eval.fleet"

    def workers(names):
        return LocalCluster([WorkerSpec(backend="sim", queues=(queue,), name=n,
                                       options=BackendOptions(threads=1, sim=f"rate={args.rate}"))
                             for n in names], workdir=os.path.join(work, "workers", names[0]), broker_url=redis.url,
                            settings=settings, ready_timeout=900, log=lambda *_: None)

    t = time.time()
    fleet = workers([f"sim{i:02d}@fleet" for i in range(args.workers)])
    fleet.start()
    print(f"{args.workers} simulated workers up in {time.time() - t:.0f} s", flush=True)
    results, reference = {}, None
    import redis as redis_py

    time.sleep(3)  # the workers' start-up traffic settles
    idle = RedisLoad(redis_py.Redis.from_url(redis.url))
    time.sleep(args.idle_s)
    quiet = idle.read()
    idle_row = {"seconds": args.idle_s, "commands_per_worker_s": quiet["commands"] / (args.workers * args.idle_s),
                "connections": quiet["clients"] - 1, "connections_per_worker": (quiet["clients"] - 1) / args.workers,
                "redis_cpu_s": quiet["cpu_s"], "top": quiet["top"]}
    print(json.dumps({"idle": idle_row}), flush=True)

    def one(label, fault=None):
        store = RunStore(redis.url, outage_s=120)
        said = []
        load = RedisLoad(store.r)
        t0 = time.time()
        h = submit_evaluation(weights=weights, data=f"index:{args.images}", backend="sim",
                              batch_size=args.batch_size, shard_size=args.shard_size, queue=queue, settings=settings,
                              log=said.append)
        submit_s = time.time() - t0
        hit = {}
        if fault:
            def trigger():
                while store.ledger.images_done(h.run_id, h.manifest) < 0.3 * args.images:
                    time.sleep(0.05)
                hit["at"] = time.time() - t0
                fault()
            threading.Thread(target=trigger, daemon=True).start()
        numbers = {}
        res = h.wait(progress=False, timeout=3600, log=said.append,
                     on_report=lambda _: numbers.setdefault("at", time.time()))
        wall, files_s = numbers["at"] - t0, time.time() - t0
        used = load.read() if not fault else None  # a restarted Redis starts its counts again
        rep = res.report
        shards_end = max(d["last_finish"] for d in rep.per_device)
        kept = store.ledger.shard_results(h.run_id)
        sizes = sorted(len(json.dumps(r)) for r in kept.values())
        gaps = shard_gaps(kept)
        info = store.r.info("memory")
        manifest = store.runs.manifest(h.run_id)
        msg = len(json.dumps(manifest.tasks()[0].args()))
        row = {"run": label, "run_id": h.run_id, "wall_s": round(wall, 2), "files_s": round(files_s, 2),
               "images": rep.images,
               "shards": rep.shards, "shard_images": manifest.shards[0].stop, "fault_at_s": round(hit["at"], 1) if hit else None,
               "merge_s": round(rep.finished - shards_end, 2), "report_to_client_s": round(t0 + wall - rep.finished, 2),
               "redispatched": rep.redispatched_shards, "redis_used_memory_peak": info["used_memory_peak_human"],
               "shard_message_bytes": msg, "shard_result_bytes_median": sizes[len(sizes) // 2],
               "workers_reporting": len(rep.per_device), "client_said": [m for m in said if "run " in m][-3:],
               "submit_s": round(submit_s, 3),
               "gap_between_shards_s": {"median": gaps[len(gaps) // 2] if gaps else None,
                                        "p90": gaps[int(len(gaps) * 0.9)] if gaps else None, "n": len(gaps)}}
        if used:
            row.update(redis_commands=used["commands"], redis_commands_per_shard=used["commands"] / rep.shards,
                       redis_cpu_s=round(used["cpu_s"], 2), redis_top_commands=used["top"])
        results[label] = row
        print(json.dumps(row), flush=True)
        h.close()
        return res.predictions

    reference = one("undisturbed")
    if args.faults == "none":
        fleet.stop()
        redis.kill()
        return summarize(args, results, idle_row)

    def kill_some():
        for _, proc, _ in fleet.procs[:args.kill]:
            os.killpg(proc.pid, signal.SIGKILL)

    assert one("kill", kill_some)["top5"] == reference["top5"], "run 2 differs from run 1"
    fleet.procs = fleet.procs[args.kill:]
    spare = workers([f"spare{i:02d}@fleet" for i in range(args.kill)])
    spare.start()

    def restart_redis():
        redis.kill()
        time.sleep(2)
        redis.start()

    assert one("broker-restart", restart_redis)["top5"] == reference["top5"], "run 3 differs from run 1"
    spare.stop()
    fleet.stop()
    redis.kill()
    summarize(args, results, idle_row)


def summarize(args, results: dict, idle_row: dict) -> None:
    ideal = args.images / (args.workers * args.rate)
    ideal_killed = args.images / ((args.workers - args.kill) * args.rate)
    shard_s = max(r["shard_images"] for r in results.values()) / args.rate
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "workers": args.workers, "images": args.images, "rate_img_s_per_device": args.rate,
        "batch_size": args.batch_size, "shard_size": args.shard_size, "lease_s": args.lease,
        "ideal_s": round(ideal, 2), "efficiency": round(ideal / results["undisturbed"]["wall_s"], 4),
        "queue_overhead_s": round(results["undisturbed"]["wall_s"] - ideal, 2),
        "kill_bound_s": round(ideal_killed + args.lease + shard_s, 2),
        "restart_added_s": (round(results["broker-restart"]["wall_s"] - results["undisturbed"]["wall_s"], 2)
                            if "broker-restart" in results else None),
        "idle": idle_row, "runs": results, "exact": True}
    print(json.dumps(summary, indent=1))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
