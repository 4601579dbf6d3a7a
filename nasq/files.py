"""Files written whole or not at all, file digests cached so a worker hashes a checkpoint once,
and a folder's files checked against the digests recorded for them."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from functools import lru_cache
from typing import BinaryIO, Callable


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_MODE = _file_mode()  # what open() would give a new file (mkstemp's files are 0600)


def fsync_dir(folder: str) -> None:
    """Make a rename or a new name in ``folder`` survive a crash of the machine, as far as the
    file system lets it: never raises (the rename it follows has happened either way)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # a folder this process may write but not open (no read permission)
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder: the data is synced, the name as they can
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], None], *,
                 mode: int | None = None, durable: bool = True) -> None:
    """Write ``path`` so that readers see the old file or the whole new one, never a part, also
    after the machine crashes: the data is synced before the rename and the folder after it
    (``durable=False`` for caches that are rebuilt when lost: the process's crash only).

    ``data`` is bytes, text (UTF-8), or a function that writes to the open binary file. The
    temporary file has a unique name beside ``path`` and is removed if writing fails (a full
    disk leaves no ``*.tmp`` behind).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, _MODE if mode is None else mode)
        os.replace(tmp, path)
        if durable:
            fsync_dir(folder)
    except BaseException:
        remove_quietly(tmp)
        raise


def remove_quietly(path: str) -> None:
    """Remove a file that may be gone already (a temporary file after a failed write)."""
    try:
        os.unlink(path)
    except OSError:
        pass


def write_json(obj, path: str | os.PathLike, *, indent: int | None = 2, mode: int | None = None,
               durable: bool = True) -> None:
    atomic_write(path, json.dumps(obj, indent=indent), mode=mode, durable=durable)


def read_json(path: str | os.PathLike, default=None):
    """The JSON in ``path``, or ``default`` if it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def file_digest(path: str | os.PathLike, algo: str = "sha256") -> str:
    st = os.stat(path)
    return _digest(os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, algo)


def stream_digest(path: str, algo: str = "sha256", *, block: int = 1 << 22) -> str:
    """The file's digest, read ``block`` bytes at a time."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


@lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int, ctime_ns: int, algo: str) -> str:
    return stream_digest(path, algo)


def cached_sha256(path: str | os.PathLike, cache_file: str) -> str:
    """sha256 of a (large) file, remembered on disk per (path, size, mtime, ctime) so that a
    repeat build of a 340 MB checkpoint does not rehash it. A cache that cannot be written is
    not: the digest is returned all the same."""
    path = os.path.abspath(path)
    st = os.stat(path)
    stamp = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"  # ctime: a rewrite that kept size and mtime
    cache = read_json(cache_file, {})
    hit = cache.get(path)
    if hit and hit.get("stamp") == stamp:
        return hit["sha256"]
    digest = file_digest(path)
    cache[path] = {"stamp": stamp, "sha256": digest}
    try:
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        write_json(cache, cache_file, indent=None, durable=False)
    except OSError:  # a read-only artifact dir: hashed again next time
        pass
    return digest


def verify_files(folder: str, expected: dict[str, str], *, cache_file: str | None = None) -> dict[str, str]:
    """The files of ``folder`` named in ``expected`` (name -> sha256) that do not hold those
    bytes: name -> why (missing, or the sha256 it has). ``cache_file``: remember digests per
    (path, size, mtime, ctime) there (``cached_sha256``); without one every file is read and
    hashed.

    Raises:
        OSError: a file that is there but cannot be read (it is not judged changed)."""
    bad = {}
    for name, want in expected.items():
        path = os.path.join(folder, name)
        try:
            got = cached_sha256(path, cache_file) if cache_file else file_digest(path)
        except FileNotFoundError:
            bad[name] = "missing"
            continue
        if got != want:
            bad[name] = f"sha256 {got[:12]}... where its meta.json records {str(want)[:12]}..."
    return bad
