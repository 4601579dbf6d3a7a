"""The data path at fleet scale: SIMULATED devices that read real images, through a folder whose
read bandwidth is capped, with the host cache.

Two runs of the same data, each timed from submission to the client holding the report's
numbers: the first with an empty host cache (every image read from the capped folder), the
second from the host cache (the folder is not read). Each is set against the model of
docs/SCALE.md: a run takes the longest of what its parts need, the devices (images / (devices x
rate)), the shared storage (bytes / the folder's bandwidth) and, for JPEG, the host's decoding
(images / (cores x img/s per core of nasq's exact preprocessing, measured here first)); the
efficiency is the model's time over the measured one. Both runs must predict the same.

    .venv/bin/python bench/fleet_data.py --format u8 --images 50000 --workers 16 --read-mbps 300
    .venv/bin/python bench/fleet_data.py --format jpeg --images 5000 --workers 16
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from digests import make_folder  # noqa: E402 - the generated JPEG folder
from fleet import rate, workspace  # noqa: E402 - a Redis and settings, as bench/fleet.py makes them

from nasq.api import submit_evaluation  # noqa: E402
from nasq.config import BackendOptions  # noqa: E402
from nasq.queue.local import LocalCluster, WorkerSpec  # noqa: E402


def u8_folder(root: str, n: int, per_file: int = 256) -> int:
    """``n`` distinct uint8 331x331x3 crops as nasq's u8 shards (index.json with their digests,
    as `nasq preprocess` writes it); returns their bytes."""
    from nasq.data.sources import U8_FORMAT, U8_INDEX

    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(2)
    base = rng.integers(0, 256, size=(per_file, 331, 331, 3), dtype=np.uint8)
    shards, digests, names = [], [], []
    for k, start in enumerate(range(0, n, per_file)):
        count = min(per_file, n - start)
        arr = base[:count].copy()
        arr[:, 0, 0, :] = np.array([(start + j) >> s & 255 for j in range(count) for s in (0, 8, 16)],
                                   dtype=np.uint8).reshape(count, 3)  # distinct crops
        np.save(os.path.join(root, f"shard-{k:05d}.npy"), arr)
        shards.append({"file": f"shard-{k:05d}.npy", "start": start, "count": count})
        digests += [hashlib.sha256(a.tobytes()).hexdigest() for a in arr]
        names += [f"ILSVRC2012_val_{start + j + 1:08d}.JPEG" for j in range(count)]
    with open(os.path.join(root, U8_INDEX), "w") as f:
        json.dump({"format": U8_FORMAT, "version": 1, "crop": 331, "resize": 378, "images": n, "names": names,
                   "shards": shards, "errors": {}, "digests": digests}, f)
    return n * 331 * 331 * 3


def jpeg_folder(root: str, n: int, distinct: int = 200) -> int:
    """``n`` JPEGs of 500x375 (about 110 kB) made unique, as ``bench/digests.py`` makes them."""
    return make_folder(root, n, distinct, seed=3, quality=97)


def decode_rate(root: str, n: int = 200) -> float:
    """Images per second per core of nasq's exact preprocessing on this folder's files."""
    from nasq.data.transforms import preprocess_u8

    names = sorted(os.listdir(root))[:n]
    datas = [open(os.path.join(root, x), "rb").read() for x in names]
    t = time.process_time()
    for d in datas:
        preprocess_u8(d)
    return len(datas) / (time.process_time() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", choices=("u8", "jpeg"), default="u8")
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--rate", type=rate, default=176.0, help="img/s per device, or 310p3 (default: 176)")
    ap.add_argument("--read-mbps", type=float, default=0.0,
                    help="the data folder's bandwidth for this host in MB/s (default: uncapped)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--decode-threads", type=int, default=1,
                    help="each worker's loader threads (default: 1; nasq's default for a device is 4)")
    ap.add_argument("--data-dir", help="make the data here, or use what an earlier run made there")
    ap.add_argument("--cache-dir", help="the workers' host cache (default: in the benchmark's folder, on the "
                                        "disk; e.g. /dev/shm/... for a host whose local disk is fast NVMe)")
    ap.add_argument("--again", type=int, default=1, help="runs from the host cache after the first (default: 1)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work, redis, weights, settings = workspace("nasq-fleet-data-", lease_s=10)
    import dataclasses

    data = os.path.abspath(args.data_dir or os.path.join(work, "data"))
    cache_dir = os.path.join(args.cache_dir or work, f"host-cache-{os.getpid()}")
    settings = dataclasses.replace(settings, host_cache_dir=cache_dir, host_cache_gb=100,
                                   read_roots=os.pathsep.join([settings.read_roots, data]))
    t = time.time()
    if args.data_dir and os.path.isdir(data) and os.listdir(data):
        total = sum(os.path.getsize(os.path.join(data, f)) for f in os.listdir(data) if not f.endswith(".json"))
        if args.format == "u8":
            total = args.images * 331 * 331 * 3
    else:
        total = u8_folder(data, args.images) if args.format == "u8" else jpeg_folder(data, args.images)
    print(f"{args.images} images ({args.format}, {total / 1e9:.2f} GB) made in {time.time() - t:.0f} s", flush=True)
    per_core = decode_rate(data) if args.format == "jpeg" else None
    cores = os.cpu_count() or 1
    sim = f"rate={args.rate}" + (f",read_mbps={args.read_mbps}" if args.read_mbps else "")
    queue = "eval.fleet-data"
    fleet = LocalCluster([WorkerSpec(device=f"npu:{i}", backend="sim", queues=(queue,), name=f"sim{i:02d}@fleet",
                                     options=BackendOptions(threads=1, sim=sim, decode_threads=args.decode_threads))
                          for i in range(args.workers)],
                         workdir=os.path.join(work, "workers"), broker_url=redis.url, settings=settings,
                         ready_timeout=900, log=lambda *_: None)
    fleet.start()
    parts = {"devices_s": args.images / (args.workers * args.rate),
             "storage_s": total / (args.read_mbps * 1e6) if args.read_mbps else 0.0,
             "decode_s": args.images / (cores * per_core) if per_core else 0.0}
    rows, reference = [], None
    for label in ["first (empty host cache)"] + [f"again from the host cache ({k + 1})" for k in range(args.again)]:
        t0, at = time.time(), {}
        h = submit_evaluation(weights=weights, data=data, backend="sim", batch_size=args.batch_size, queue=queue,
                              settings=settings, log=lambda *_: None)
        submitted = time.time() - t0
        res = h.wait(progress=False, timeout=7200, log=lambda *_: None,
                     on_report=lambda _: at.setdefault("numbers", time.time()))
        h.close()
        wall = at["numbers"] - t0
        model = dict(parts, storage_s=parts["storage_s"] if not rows else 0.0)  # the second reads no storage
        predicted = max(model.values())
        read = res.report.data_read
        row = {"run": label, "wall_s": round(wall, 2), "submit_s": round(submitted, 2), "model_s": round(predicted, 2),
               "bound_by": max(model, key=model.get), "efficiency": round(predicted / wall, 4),
               "images_from_cache": read["images_from_cache"], "images_from_source": read["images_from_source"],
               "gb_from_source": round(read["bytes_from_source"] / 1e9, 2), "images": res.report.images}
        print(json.dumps(row), flush=True)
        rows.append(row)
        if reference is None:
            reference = res.predictions["top5"]
        else:
            row["exact"] = res.predictions["top5"] == reference
    fleet.stop()
    redis.kill()
    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {cores} cores",
           "python": platform.python_version(), "format": args.format, "images": args.images, "bytes": total,
           "workers": args.workers, "rate_img_s_per_device": args.rate, "read_mbps": args.read_mbps,
           "batch_size": args.batch_size, "decode_threads": args.decode_threads,
           "host_cache_on": "tmpfs" if (args.cache_dir or "").startswith("/dev/shm") else "the VM's disk", "decode_img_s_per_core": round(per_core, 1) if per_core else None,
           "model_parts_s": {k: round(v, 2) for k, v in parts.items()}, "runs": rows}
    print(json.dumps(out, indent=1))
    path = args.out or f"bench/results/fleet_data-{args.format}-{args.workers}.json"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    import shutil

    shutil.rmtree(cache_dir, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
