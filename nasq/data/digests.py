"""What a run scores is what was listed, byte for byte: a sha256 per image, computed once.

The client lists a dataset with the sha256 of every file (JPEG, ``.bin``) or of every image's
crop (u8 shards): ``content_of`` hashes what it must and takes the rest from caches, so that a
second run of the same folder reads no file again:

* a cache per dataset folder in the artifact directory (``.digests/``), keyed by each file's
  path, size, mtime and inode;
* what ``nasq preprocess`` writes beside its output: the u8 index's per-image ``digests``, and
  ``.nasq-sha256.json`` in a ``.bin`` folder (name -> size, mtime, sha256).

The run's manifest carries the dataset's ``content``: the sha256 of its listing and of every
digest, which the list of digests (kept in Redis under that name) must hash to. A worker fetches
the list once per process and dataset, checks it against ``content``, and hashes the bytes of
each image it reads (it reads them anyway): a file that changed since the run was submitted
fails its shard with ``ContentChanged`` naming it, instead of being scored.
"""
from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor

from ..errors import DatasetError
from ..files import read_json, stream_digest, write_json

DIGEST_BYTES = 32
#: what ``nasq preprocess`` writes into a .bin folder: name -> [size, mtime_ns, ctime_ns, sha256 hex]
BIN_DIGESTS = ".nasq-sha256.json"
#: a missing digest (an image that was unusable when listed): it is not checked
NONE = b"\0" * DIGEST_BYTES


class ContentChanged(DatasetError):
    """A file whose bytes are not those the run was submitted with."""


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def pack(digests: list[bytes | None]) -> bytes:
    """The digest list as stored in Redis: 32 bytes per image, zeros for none."""
    return b"".join(d or NONE for d in digests)


def unpack(raw: bytes, n: int) -> list[bytes | None]:
    if len(raw) != n * DIGEST_BYTES:
        raise DatasetError(f"the dataset's digest list holds {len(raw) // DIGEST_BYTES} digests, not {n}")
    return [None if (d := raw[k:k + DIGEST_BYTES]) == NONE else d for k in range(0, len(raw), DIGEST_BYTES)]


def content_hash(kind: str, listing: str, raw: bytes) -> str:
    """The dataset's content: its kind, its listing (names, sizes, the u8 index) and every digest."""
    h = hashlib.sha256(f"nasq-content\n{kind}\n{listing}\n".encode())
    h.update(raw)
    return h.hexdigest()


class DigestCache:
    """sha256 of files, remembered per (path, size, mtime, ctime, inode) in one JSON file
    (written whole or not at all; the kernel sets ctime on every write, so a file rewritten
    with its size and mtime kept is hashed again); entries of files that are gone are dropped
    when it is saved."""

    def __init__(self, path: str | None):
        self.path = path
        self.entries: dict = (read_json(path, {}) if path else {}) or {}
        self.seen: set[str] = set()
        self.changed = False

    def get(self, path: str, st: os.stat_result):
        self.seen.add(path)
        hit = self.entries.get(path)
        if hit and hit[:4] == [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]:
            return hit[4]
        return None

    def put(self, path: str, st: os.stat_result, value) -> None:
        self.seen.add(path)
        self.entries[path] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, value]
        self.changed = True

    def save(self) -> None:
        if not self.path or not self.changed:
            return
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            write_json({k: v for k, v in self.entries.items() if k in self.seen}, self.path, indent=None, durable=False)
        except OSError:  # a read-only cache folder: the next listing hashes again
            pass


def cache_for(root: str, cache_dir: str | None) -> DigestCache:
    """The digest cache of one dataset folder under ``cache_dir`` (None: no cache)."""
    if not cache_dir:
        return DigestCache(None)
    name = hashlib.sha256(os.path.abspath(root).encode()).hexdigest()[:16]
    return DigestCache(os.path.join(cache_dir, ".digests", f"{name}.json"))


def _file_sha256(path: str) -> str:
    return stream_digest(path, block=1 << 20)


def u8_file_digests(path: str, count: int) -> list[str]:
    import numpy as np

    arr = np.load(path, mmap_mode="r")
    return [hashlib.sha256(np.ascontiguousarray(arr[j]).tobytes()).hexdigest() for j in range(min(count, len(arr)))]


def file_digests(source, cache: DigestCache, *, log=None, threads: int | None = None) -> list[bytes | None]:
    """The sha256 of every image of ``source`` (a JPEG or ``.bin`` folder: the file's; u8
    shards: each crop's), from the caches where they hold it, else read and hashed (in
    ``threads`` threads; ``log`` hears of progress every 10 s when that takes long). A file
    that cannot be read has no digest and joins ``source.known_errors`` (an unusable image of
    the run, as its reason says)."""
    if source.kind == "u8":
        return _u8_digests(source, cache, log=log)
    preset = read_json(os.path.join(source.root, BIN_DIGESTS), {}) if source.kind == "bin" else {}
    out: list[bytes | None] = [None] * len(source.names)
    todo: list[tuple[int, str, os.stat_result]] = []
    for i, name in enumerate(source.names):
        if i in source.known_errors:
            continue
        path = os.path.join(source.root, name)
        try:
            st = os.stat(path)
        except OSError as e:
            source.known_errors[i] = f"cannot be read: {e.strerror or e}"
            continue
        hit = cache.get(path, st)
        pre = preset.get(name) if isinstance(preset, dict) else None
        if hit is None and isinstance(pre, list) and len(pre) == 4 and pre[:3] == [st.st_size, st.st_mtime_ns,
                                                                                   st.st_ctime_ns]:
            hit = pre[3]
            cache.put(path, st, hit)
        if hit is not None:
            out[i] = bytes.fromhex(hit)
        else:
            todo.append((i, path, st))
    if todo:
        total = sum(st.st_size for _, _, st in todo)
        said, t0, done = time.time(), time.time(), [0, 0]

        def one(item):
            i, path, st = item
            try:
                return i, path, st, _file_sha256(path), None
            except OSError as e:
                return i, path, st, None, f"cannot be read: {e.strerror or e}"

        with ThreadPoolExecutor(max_workers=threads or min(8, (os.cpu_count() or 1) * 2)) as pool:
            for i, path, st, hexd, why in pool.map(one, todo):
                if why:
                    source.known_errors[i] = why
                    continue
                out[i] = bytes.fromhex(hexd)
                cache.put(path, st, hexd)
                done[0] += 1
                done[1] += st.st_size
                if log is not None and time.time() - said >= 10:
                    said = time.time()
                    log(f"hashing {source.root}: {done[0]} of {len(todo)} files ({done[1] / 1e9:.1f} of "
                        f"{total / 1e9:.1f} GB, {done[1] / 1e6 / (said - t0):.0f} MB/s); a second run reads none")
    cache.save()
    return out


def _u8_digests(source, cache: DigestCache, *, log=None) -> list[bytes | None]:
    """Per-image digests of u8 shards: the index's own (``nasq preprocess`` writes them), else
    each shard file's crops hashed once and cached per shard file."""
    listed = source.index_digests
    if listed is not None:
        return [None if (i in source.known_errors or not d) else bytes.fromhex(d) for i, d in enumerate(listed)]
    out: list[bytes | None] = [None] * len(source.names)
    for k, shard in enumerate(source.shards):
        path = os.path.join(source.root, shard["file"])
        try:
            st = os.stat(path)
        except OSError as e:
            raise DatasetError(f"{path}: {e.strerror or e}") from None
        hexes = cache.get(path, st)
        if hexes is None:
            if log is not None and k % 20 == 0:
                log(f"hashing {source.root}: shard file {k + 1} of {len(source.shards)} (its index names no digests; "
                    "`nasq preprocess` writes them)")
            try:
                hexes = u8_file_digests(path, shard["count"])
            except (OSError, ValueError) as e:
                raise DatasetError(f"cannot read shard {path}: {e}") from None
            cache.put(path, st, hexes)
        for j, h in enumerate(hexes):
            i = shard["start"] + j
            if i < len(out) and i not in source.known_errors:
                out[i] = bytes.fromhex(h)
    cache.save()
    return out
