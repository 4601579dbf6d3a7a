"""File digests, cached per (path, size, mtime) so a worker hashes a checkpoint once."""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache


def file_digest(path: str | os.PathLike, algo: str = "sha256") -> str:
    st = os.stat(path)
    return _digest(os.path.abspath(path), st.st_size, st.st_mtime_ns, algo)


@lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def cached_sha256(path: str | os.PathLike, cache_file: str) -> str:
    """sha256 of a (large) file, remembered on disk per (path, size, mtime) so that a repeat
    build of a 340 MB checkpoint does not rehash it."""
    import json

    path = os.path.abspath(path)
    st = os.stat(path)
    stamp = f"{st.st_size}:{st.st_mtime_ns}"
    try:
        with open(cache_file, encoding="utf-8") as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(path)
    if hit and hit.get("stamp") == stamp:
        return hit["sha256"]
    digest = file_digest(path)
    cache[path] = {"stamp": stamp, "sha256": digest}
    os.makedirs(os.path.dirname(cache_file), exist_ok=True)
    tmp = f"{cache_file}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(cache, f)
    os.replace(tmp, cache_file)
    return digest
