"""``nasq preprocess``: JPEGs -> the seed's .bin files or compact uint8 shards.

Parallel across cores, with a progress bar, and resumable: finished files are kept and
skipped on a rerun; every file is written under a temporary name and renamed when complete.
Unusable images are recorded with their reason (``preprocess_errors.json`` for .bin, the
index for u8) so that evaluations count them. The sha256 of every output is written beside it
(the u8 index's ``digests``, one per crop; ``.nasq-sha256.json`` in a .bin folder), so that a run
lists the folder without reading it again (``digests.py``).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np

from ..errors import DatasetError
from ..files import atomic_write
from ..model.spec import PREPROCESS
from .digests import BIN_DIGESTS, u8_file_digests
from .labels import stem
from .sources import BIN_ERRORS, U8_FORMAT, U8_INDEX, open_source
from .transforms import ImageError, preprocess_float, preprocess_u8


@dataclass
class PreprocessResult:
    dst: str
    fmt: str
    images: int
    written: int
    skipped: int
    errors: dict[str, str]


def _u8_shard(task) -> tuple[int, int, dict]:
    src, dst, k, start, names, fingerprint = task
    arr = np.zeros((len(names), PREPROCESS.crop, PREPROCESS.crop, 3), dtype=np.uint8)
    errors = {}
    for j, name in enumerate(names):
        try:
            arr[j] = preprocess_u8(os.path.join(src, name))
        except ImageError as e:
            errors[str(start + j)] = str(e)
    base = os.path.join(dst, f"shard-{k:05d}")
    atomic_write(base + ".npy", lambda f: np.save(f, arr))
    digests = [None if str(start + j) in errors else hashlib.sha256(arr[j].tobytes()).hexdigest()
               for j in range(len(names))]
    meta = {"start": start, "count": len(names), "source_fingerprint": fingerprint, "errors": errors,
            "digests": digests}
    atomic_write(base + ".json", json.dumps(meta))
    return k, len(names), errors, digests


def _bin_chunk(task) -> tuple[int, int, dict, dict]:
    src, dst, names, known = task
    want = int(np.prod(PREPROCESS.chw)) * 4
    errors, written, digests = {}, 0, {}
    for name in names:
        out = os.path.join(dst, stem(name) + ".bin")
        if os.path.isfile(out) and os.path.getsize(out) == want:
            st, pre = os.stat(out), known.get(os.path.basename(out))
            if isinstance(pre, list) and pre[:3] == [st.st_size, st.st_mtime_ns, st.st_ctime_ns]:
                digests[os.path.basename(out)] = pre  # written and hashed by an earlier run of this
                continue
            with open(out, "rb") as f:
                data = f.read()
        else:
            try:
                data = preprocess_float(os.path.join(src, name)).tobytes()
            except ImageError as e:
                errors[name] = str(e)
                continue
            # no disk sync per image: a file a machine crash cut short is shorter than ``want``
            # and is made again by the next run of preprocess
            atomic_write(out, data, durable=False)
            written += 1
        st = os.stat(out)
        digests[os.path.basename(out)] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, hashlib.sha256(data).hexdigest()]
    return len(names), written, errors, digests


def preprocess(src: str, dst: str, *, fmt: str = "u8", workers: int | None = None, shard_size: int = 256,
               progress: bool = True) -> PreprocessResult:
    """Preprocess a JPEG folder into ``dst``.

    Args:
        fmt: "bin" (one float32 CHW .bin per image, the seed's layout) or "u8" (uint8 shards).
        workers: processes (default: all cores).
        shard_size: images per u8 shard file.
    """
    from tqdm import tqdm

    if fmt not in ("bin", "u8"):
        raise DatasetError(f"--format must be bin or u8, not {fmt!r}")
    source = open_source(src)
    if source.kind != "jpeg":
        raise DatasetError(f"{src} holds {source.kind} data, not JPEG images: nothing to preprocess")
    os.makedirs(dst, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    names = source.names
    if fmt == "u8":
        index_path = os.path.join(dst, U8_INDEX)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                meta = json.load(f)
            if meta.get("source_fingerprint") == source.fingerprint:
                return PreprocessResult(dst, fmt, len(names), 0, len(names), {meta["names"][int(i)]: r for i, r in meta["errors"].items()})
            raise DatasetError(f"{dst} already holds u8 shards of a different image set; choose an empty folder")
        tasks, done = [], {}
        for k, start in enumerate(range(0, len(names), shard_size)):
            chunk = names[start:start + shard_size]
            meta_path = os.path.join(dst, f"shard-{k:05d}.json")
            if os.path.isfile(meta_path) and os.path.isfile(meta_path[:-5] + ".npy"):
                with open(meta_path) as f:
                    m = json.load(f)
                if m.get("source_fingerprint") == source.fingerprint and m.get("count") == len(chunk):
                    done[k] = m
                    continue
            tasks.append((source.root, dst, k, start, chunk, source.fingerprint))
        skipped = sum(m["count"] for m in done.values())
        bar = tqdm(total=len(names), initial=skipped, unit="img", desc="preprocess u8", file=sys.stderr,
                   disable=not progress)
        with get_context("fork").Pool(workers) as pool:
            for k, n, errors, digests in pool.imap_unordered(_u8_shard, tasks):
                done[k] = {"start": k * shard_size, "count": n, "errors": errors, "digests": digests}
                bar.update(n)
        bar.close()
        errors = {i: r for m in done.values() for i, r in m["errors"].items()}
        shards = [{"file": f"shard-{k:05d}.npy", "start": done[k]["start"], "count": done[k]["count"]} for k in sorted(done)]
        digests = []
        for k in sorted(done):  # a shard kept from an earlier nasq without its digests: hashed now
            listed = done[k].get("digests") or u8_file_digests(os.path.join(dst, f"shard-{k:05d}.npy"),
                                                                done[k]["count"])
            digests += [None if str(done[k]["start"] + j) in errors else d for j, d in enumerate(listed)]
        index = {"format": U8_FORMAT, "version": 1, "crop": PREPROCESS.crop, "resize": PREPROCESS.resize,
                 "images": len(names), "source": source.root, "source_fingerprint": source.fingerprint,
                 "names": names, "shards": shards, "errors": errors, "digests": digests}
        atomic_write(index_path, json.dumps(index))
        return PreprocessResult(dst, fmt, len(names), len(names) - skipped, skipped,
                                {names[int(i)]: r for i, r in errors.items()})
    from ..files import read_json

    known = read_json(os.path.join(dst, BIN_DIGESTS), {}) or {}
    chunks = [(source.root, dst, names[i:i + 64], {stem(n) + ".bin": known.get(stem(n) + ".bin")
                                                   for n in names[i:i + 64]}) for i in range(0, len(names), 64)]
    bar = tqdm(total=len(names), unit="img", desc="preprocess bin", file=sys.stderr, disable=not progress)
    errors, written, digests = {}, 0, {}
    with get_context("fork").Pool(workers) as pool:
        for n, w, errs, dig in pool.imap_unordered(_bin_chunk, chunks):
            errors.update(errs)
            digests.update(dig)
            written += w
            bar.update(n)
    bar.close()
    atomic_write(os.path.join(dst, BIN_ERRORS), json.dumps(errors, indent=1))
    atomic_write(os.path.join(dst, BIN_DIGESTS), json.dumps(digests))
    return PreprocessResult(dst, fmt, len(names), written, len(names) - written - len(errors), errors)
