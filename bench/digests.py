"""What checking the bytes costs: the first listing of an ImageNet-sized JPEG folder with the
sha256 of every file (cold page cache), the second (the digest cache: no file read), a
worker's check of each image it reads against the decoding of it, and the check of a
NASNet-Large-sized artifact (~350 MB) when a worker loads it.

The folder: ``--images`` JPEGs of about 128 kB at 500x375 (ImageNet validation averages ~110 kB
at ~500x375), ``--distinct`` of them encoded (quality 99) and the rest copies each made unique by a trailer
(decoders stop at the end-of-image marker). The page cache is dropped before the first listing
(``/proc/sys/vm/drop_caches``; needs root, else the listing is timed warm and says so).

    .venv/bin/python bench/digests.py --images 50000 --out bench/results/digests.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time

import numpy as np


def make_folder(root: str, n: int, distinct: int, *, seed: int = 0, quality: int = 99) -> int:
    """``n`` unique JPEGs of 500x375 in ``root``, ``distinct`` of them encoded and the rest copies
    made unique by a trailer (decoders stop at the image's end); returns their total size."""
    import io

    from nasq.demo import make_image

    rng = np.random.default_rng(seed)
    blobs = []
    for _ in range(distinct):
        buf = io.BytesIO()
        make_image(rng, 500, 375).save(buf, format="JPEG", quality=quality)
        blobs.append(buf.getvalue())
    os.makedirs(root, exist_ok=True)
    total = 0
    for i in range(n):
        data = blobs[i % distinct] + i.to_bytes(8, "little")
        with open(os.path.join(root, f"ILSVRC2012_val_{i + 1:08d}.JPEG"), "wb") as f:
            f.write(data)
        total += len(data)
    return total


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def listing(root: str, cache_dir: str) -> tuple[float, str]:
    from nasq.data import open_source
    from nasq.data.digests import cache_for, file_digests

    t = time.perf_counter()
    src = open_source(root)
    src.with_digests(file_digests(src, cache_for(src.root, cache_dir), log=print))
    return time.perf_counter() - t, src.content


def per_image(root: str, sample: int) -> dict:
    """Per image: reading it, hashing what was read, and nasq's exact decode + resize + crop."""
    from nasq.data.transforms import preprocess_u8

    names = sorted(os.listdir(root))[:sample]
    read_s = hash_s = decode_s = 0.0
    for name in names:
        t0 = time.perf_counter()
        data = open(os.path.join(root, name), "rb").read()
        t1 = time.perf_counter()
        hashlib.sha256(data).digest()
        t2 = time.perf_counter()
        preprocess_u8(data, name=name)
        t3 = time.perf_counter()
        read_s, hash_s, decode_s = read_s + t1 - t0, hash_s + t2 - t1, decode_s + t3 - t2
    n = len(names)
    return {"images": n, "read_ms": 1e3 * read_s / n, "sha256_ms": 1e3 * hash_s / n,
            "decode_resize_crop_ms": 1e3 * decode_s / n, "sha256_share_of_decode": hash_s / decode_s}


def artifact(folder: str, size_mb: int) -> dict:
    """A worker's check of an artifact's files when it loads them (each read and hashed), and a
    client's cache-hit check (digests cached per path, size and mtime)."""
    from nasq.files import cached_sha256, verify_files

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model.cpu.onnx")
    with open(path, "wb") as f:
        for _ in range(size_mb):
            f.write(os.urandom(1 << 20))
    want = {"model.cpu.onnx": hashlib.sha256(open(path, "rb").read()).hexdigest()}
    cold = drop_caches()
    t = time.perf_counter()
    assert verify_files(folder, want) == {}
    first = time.perf_counter() - t
    t = time.perf_counter()
    with open(path, "rb") as f:  # the same read and hash, from the page cache (file_digest remembers its answer)
        h = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    assert h.hexdigest() == want["model.cpu.onnx"]
    warm = time.perf_counter() - t
    cache = os.path.join(folder, ".digests.json")
    cached_sha256(path, cache)
    t = time.perf_counter()
    assert verify_files(folder, want, cache_file=cache) == {}
    hit = time.perf_counter() - t
    return {"size_mb": size_mb, "worker_check_s": round(first, 3), "cold_page_cache": cold,
            "worker_check_warm_s": round(warm, 3), "client_cache_hit_check_s": round(hit, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--distinct", type=int, default=500)
    ap.add_argument("--sample", type=int, default=500, help="images timed one by one (default: 500)")
    ap.add_argument("--artifact-mb", type=int, default=350)
    ap.add_argument("--out", default="bench/results/digests.json")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="nasq-digests-")
    try:
        root = os.path.join(work, "val")
        t = time.perf_counter()
        total = make_folder(root, args.images, args.distinct)
        print(f"{args.images} JPEGs, {total / 1e9:.2f} GB, written in {time.perf_counter() - t:.0f} s", flush=True)
        cold = drop_caches()
        first, content = listing(root, os.path.join(work, "art"))
        second, again = listing(root, os.path.join(work, "art"))
        assert again == content
        out = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "python": platform.python_version(), "images": args.images, "bytes": total,
               "first_listing_s": round(first, 2), "first_listing_cold_page_cache": cold,
               "first_listing_mb_s": round(total / 1e6 / first, 1), "second_listing_s": round(second, 2),
               "per_image": per_image(root, args.sample),
               "artifact": artifact(os.path.join(work, "artifact"), args.artifact_mb)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=1))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
