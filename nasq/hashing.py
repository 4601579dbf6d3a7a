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
