"""Redis's capacity on the machine it runs on, with the persistence a nasq broker should run with.

Starts a private redis-server (appendonly yes, appendfsync always, as bench/fleet.py) and
runs ``redis-benchmark`` against it for the commands a nasq fleet sends most: nasq's own
progress tick (``TICK`` of nasq/queue/scripts.py, run as a worker runs it: an MGET of the run's
state and the lease, a SET of the lease), a script of five commands (the shape of nasq's
earlier tick, for scale), HSET, GET, LPUSH and PUBLISH, each with 64 clients and no pipelining
(as workers send them). Prints requests per second for each and writes them to --out. The
benchmark client runs on the same cores as the server, so the figures are a floor.

    .venv/bin/python bench/redis_capacity.py --out bench/results/redis_capacity.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import tempfile
import time
from urllib.parse import urlsplit

from nasq.queue.redis_server import spawn_redis, stop_process
from nasq.queue.scripts import KEPT, TICK

#: five commands: the shape of nasq's progress tick before it read the state and the lease in one MGET
TICK_LIKE = ("local st = redis.call('GET', KEYS[1]) "
             "if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return 0 end "
             "local h = redis.call('GET', KEYS[2]) "
             "if h then redis.call('PEXPIRE', KEYS[2], 30000) else redis.call('SET', KEYS[2], ARGV[1], 'PX', 30000) end "
             "redis.call('HSET', KEYS[4], ARGV[1], ARGV[2]) return 1")


def bench(port: int, args: list[str], n: int, clients: int) -> float:
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-c", str(clients), "-n", str(n), "-r", "100000",
                          "-q", *args], capture_output=True, text=True, check=True).stdout
    # "<command>: 12345.67 requests per second, p50=..." (the last line carries the figure)
    return float(re.findall(r"([0-9.]+) requests per second", out)[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=100_000, help="requests per command (default: 100000)")
    ap.add_argument("--clients", type=int, default=64, help="parallel connections (default: 64)")
    ap.add_argument("--out", default="bench/results/redis_capacity.json")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="nasq-redis-cap-")
    proc, url = spawn_redis(["--save", "", "--appendonly", "yes", "--appendfsync", "always", "--dir", work,
                             "--maxmemory-policy", "noeviction"])
    port = urlsplit(url).port
    try:
        def load(script: str) -> str:
            return subprocess.run(["redis-cli", "-p", str(port), "SCRIPT", "LOAD", script], capture_output=True,
                                  text=True, check=True).stdout.strip()

        sha = load(TICK_LIKE)
        subprocess.run(["redis-cli", "-p", str(port), "SET", "st", json.dumps({"state": "running"})], check=True,
                       capture_output=True)
        cases = {
            "evalsha_tick": ["EVALSHA", load(TICK), "2", "st", "lease:__rand_int__", "w#__rand_int__", "8", "30000",
                             "submitted,running", KEPT],
            "evalsha_tick_like": ["EVALSHA", sha, "4", "st", "lease:__rand_int__", "results", "done", "s__rand_int__",
                                  "8"],
            "hset": ["HSET", "h", "f__rand_int__", "1"],
            "get": ["GET", "k"],
            "lpush": ["LPUSH", "q", "x" * 400],
            "publish": ["PUBLISH", "celeryev", "x" * 600],
        }
        rows = {}
        for name, cmd in cases.items():
            t = time.time()
            rows[name] = bench(port, cmd, args.n, args.clients)
            print(f"{name:20s} {rows[name]:10.0f} requests/s ({time.time() - t:.1f} s)", flush=True)
        cpu = os.cpu_count()
        out = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {cpu} cores",
               "redis": subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip(),
               "persistence": "appendonly yes, appendfsync always", "clients": args.clients, "requests": args.n,
               "requests_per_s": rows}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    finally:
        stop_process(proc)


if __name__ == "__main__":
    main()
