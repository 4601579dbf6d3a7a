"""The data plane per core: what one host core does per second for each input format, and what a
worker spends per batch besides reading its images.

* JPEG: nasq's exact preprocessing (``preprocess_u8``), split into decode (``Image.open`` +
  RGB), the antialiased resize of the shorter side to 378, and the 331 center crop; on
  generated 500x375 JPEGs of about 110 kB (ImageNet validation's size);
* u8 shards and .bin files: a crop or a file read, checked against its sha256 (as a worker
  does) and made an array;
* the host cache: a crop read from it and verified;
* a worker's own work per batch besides its images (top-k, predictions, progress), on an
  index dataset with a simulated device that takes no time;
* the prefetch overlap: JPEG shards on a simulated device at each of ``--device-rates`` img/s
  (a 310P3's 176, a GPU's 2,000) with 1 and 2 decode threads, against the device's rate and the
  decode rate.

Every figure is CPU time per image on one core (``time.process_time`` of this process, single
threaded unless said), and its inverse, images per second per core.

    .venv/bin/python bench/data_plane.py --images 400 --out bench/results/data_plane.json
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import tempfile
import time

import numpy as np


def jpegs(folder: str, n: int) -> list[str]:
    from nasq.demo import make_image

    rng = np.random.default_rng(1)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        buf = io.BytesIO()
        make_image(rng, 500, 375).save(buf, format="JPEG", quality=97)
        path = os.path.join(folder, f"ILSVRC2012_val_{i + 1:08d}.JPEG")
        with open(path, "wb") as f:
            f.write(buf.getvalue())
        paths.append(path)
    return paths


def per_image(fn, items) -> dict:
    """CPU ms per item of ``fn`` over ``items`` (one thread), and items per second per core."""
    t = time.process_time()
    for x in items:
        fn(x)
    ms = 1e3 * (time.process_time() - t) / len(items)
    return {"cpu_ms_per_image": round(ms, 3), "img_s_per_core": round(1e3 / ms, 1)}


def jpeg_split(paths: list[str]) -> dict:
    from PIL import Image

    from nasq.data.transforms import preprocess_u8, resized_size
    from nasq.model.spec import PREPROCESS

    datas = [open(p, "rb").read() for p in paths]
    decoded = []

    def decode(d):
        with Image.open(io.BytesIO(d)) as im:
            decoded.append(im.convert("RGB"))

    out = {"decode": per_image(decode, datas)}
    resized = []

    def resize(im):
        resized.append(im.resize(resized_size(*im.size, PREPROCESS.resize), Image.BILINEAR))

    out["resize"] = per_image(resize, decoded)

    def crop(im):
        w, h = im.size
        left, top = int(round((w - PREPROCESS.crop) / 2.0)), int(round((h - PREPROCESS.crop) / 2.0))
        np.asarray(im.crop((left, top, left + PREPROCESS.crop, top + PREPROCESS.crop)), dtype=np.uint8)

    out["crop"] = per_image(crop, resized)
    out["sha256"] = per_image(lambda d: hashlib.sha256(d).digest(), datas)
    out["whole_preprocess_u8"] = per_image(lambda d: preprocess_u8(d), datas)
    out["mean_file_kb"] = round(sum(map(len, datas)) / len(datas) / 1e3, 1)
    return out


def formats(work: str, jpeg_dir: str) -> dict:
    from nasq.data import open_source
    from nasq.data.digests import cache_for, file_digests
    from nasq.data.hostcache import HostCache
    from nasq.data.preprocess import preprocess

    out = {}
    for fmt in ("u8", "bin"):
        dst = os.path.join(work, fmt)
        preprocess(jpeg_dir, dst, fmt=fmt, workers=os.cpu_count(), progress=False)
        src = open_source(dst)
        src.with_digests(file_digests(src, cache_for(dst, None)))
        for i in range(len(src)):  # the page cache warm, as a second run's would be
            src.load(i)
        out[f"{fmt}_read_and_check"] = per_image(src.load, range(len(src)))
        out[f"{fmt}_bytes_per_image"] = int(np.prod(src.load(0).shape) * src.load(0).dtype.itemsize)
        if fmt == "u8":
            src.cache = HostCache(os.path.join(work, "host-cache"), 10**10)
            for i in range(len(src)):
                src.load(i)  # fills it
            out["u8_from_host_cache"] = per_image(src.load, range(len(src)))
    return out


def worker_overhead(n: int) -> dict:
    """A worker's CPU per image besides reading it: a simulated device that takes no time on an
    index dataset (no file), batch 8 and 64."""
    from nasq import backends
    from nasq.config import BackendOptions
    from nasq.data import open_source
    from nasq.inference.evaluate import evaluate_range
    from nasq.model.spec import ModelRef

    weights = tempfile.mktemp()
    open(weights, "wb").write(os.urandom(64))
    out = {}
    for bs in (8, 64):
        b = backends.create("sim", "cpu")
        b.load(ModelRef(weights), batch_size=bs, options=BackendOptions(sim="rate=100000000"))
        t = time.process_time()
        evaluate_range(open_source(f"index:{n}"), b, 0, n, batch_size=bs, on_batch=lambda done: None)
        ms = 1e3 * (time.process_time() - t) / n
        out[f"batch_{bs}"] = {"cpu_ms_per_image": round(ms, 3)}
    os.unlink(weights)
    return out


def overlap(jpeg_dir: str, device_rate: float, n: int) -> list[dict]:
    """JPEG shards on a simulated device at ``device_rate`` img/s with 1 and 2 decode threads."""
    from nasq import backends
    from nasq.config import BackendOptions
    from nasq.data import open_source
    from nasq.inference.evaluate import evaluate_range
    from nasq.model.spec import ModelRef

    weights = tempfile.mktemp()
    open(weights, "wb").write(os.urandom(64))
    src = open_source(jpeg_dir)
    rows = []
    for threads in (1, 2):
        b = backends.create("sim", "cpu")
        b.load(ModelRef(weights), batch_size=8, options=BackendOptions(sim=f"rate={device_rate}"))
        t, c = time.perf_counter(), time.process_time()
        evaluate_range(src, b, 0, min(n, len(src)), batch_size=8, loader_threads=threads)
        wall = time.perf_counter() - t
        rows.append({"decode_threads": threads, "device_img_s": device_rate,
                     "img_s": round(min(n, len(src)) / wall, 1),
                     "host_cores_busy": round((time.process_time() - c) / wall, 2)})
    os.unlink(weights)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--device-rates", default="176,2000", help="simulated device img/s for the overlap rows")
    ap.add_argument("--out", default="bench/results/data_plane.json")
    args = ap.parse_args()
    import PIL

    work = tempfile.mkdtemp(prefix="nasq-data-plane-")
    try:
        jpeg_dir = os.path.join(work, "val")
        paths = jpegs(jpeg_dir, args.images)
        out = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "cpu": _cpu(), "python": platform.python_version(), "pillow": PIL.__version__, "images": args.images,
               "jpeg": jpeg_split(paths), **formats(work, jpeg_dir), "worker_per_image": worker_overhead(20000),
               "overlap": [row for rate in map(float, args.device_rates.split(","))
                           for row in overlap(jpeg_dir, rate, args.images)]}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=1))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


if __name__ == "__main__":
    main()
