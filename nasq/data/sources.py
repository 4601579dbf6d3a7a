"""Datasets: the three on-disk forms workers read.

* a folder of JPEGs (ImageNet val), decoded and preprocessed by the worker;
* a folder of ``.bin`` files, the seed's layout: one raw float32 3x331x331 (CHW) array
  per image, normalized, readable by ais_bench;
* a folder of ``u8`` shards written by ``nasq preprocess --format u8``: uint8 331x331x3
  crops (4x smaller than ``.bin``) that workers normalize on the device.

Images are ordered by file name; shards of a run are index ranges into that order. A source
listed for a run also knows the sha256 of every image (``digests.py``): its loaders hash the
bytes they read and refuse one that changed (``ContentChanged``).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import DatasetError
from ..model.spec import PREPROCESS
from . import digests as dg
from .labels import stem
from .transforms import ImageError, preprocess_u8

IMAGE_EXTS = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}
U8_FORMAT = "nasq-u8"
U8_INDEX = "index.json"
BIN_ERRORS = "preprocess_errors.json"
INDEX_PREFIX = "index:"
MAX_INDEX_IMAGES = 10_000_000


@dataclass
class Source:
    """An ordered list of images in one of the three forms. Load item i with ``load``."""

    kind: str
    root: str
    names: Sequence[str]
    fingerprint: str
    dtype: str  # what load() returns: "uint8" (HWC crop) or "float32" (normalized CHW)
    known_errors: dict[int, str] = field(default_factory=dict)
    #: file -> size when the folder was listed (what the fingerprint covers)
    sizes: dict[str, int] = field(default_factory=dict)
    #: the sha256 of the listing (names and sizes, or the u8 index); ``fingerprint`` is its start
    listing: str = ""
    #: per image, the sha256 of its bytes as listed (None: not checked), once known
    digests: list | None = None
    #: the sha256 of the listing and every digest: what a run names the dataset's bytes by
    content: str | None = None
    #: where read images are also kept and looked for (``hostcache.HostCache``; images with a digest)
    cache: object | None = None
    #: how fast the source may be read (``hostcache.ReadThrottle``: SIMULATED shared storage)
    throttle: object | None = None

    def __post_init__(self):
        self._counts = {"images_from_cache": 0, "images_from_source": 0, "bytes_from_cache": 0,
                        "bytes_from_source": 0}
        self._counted = threading.Lock()

    def __len__(self) -> int:
        return len(self.names)

    def counts(self) -> dict[str, int]:
        """Images and bytes read so far, from the host cache and from the source."""
        with self._counted:
            return dict(self._counts)

    def _count(self, where: str, nbytes: int) -> None:
        with self._counted:
            self._counts[f"images_from_{where}"] += 1
            self._counts[f"bytes_from_{where}"] += nbytes

    def _cached(self, i: int) -> bytes | None:
        want = self.digests[i] if self.digests is not None else None
        if want is None or self.cache is None:
            return None
        data = self.cache.get(want)
        if data is not None:
            self._count("cache", len(data))
        return data

    def _from_source(self, i: int, data: bytes, what: str | None = None) -> None:
        """Bytes of image ``i`` read from the source: paced (a throttle), checked against its
        digest, counted, and kept in the host cache."""
        if self.throttle is not None:
            self.throttle.take(len(data))
        self.verify(i, data, what)
        self._count("source", len(data))
        want = self.digests[i] if self.digests is not None else None
        if want is not None and self.cache is not None:
            self.cache.put(want, data)

    def with_digests(self, digests: list) -> None:
        """Take the per-image digests (from ``digests.file_digests`` or a run's digest list)."""
        self.digests = digests
        self.content = dg.content_hash(self.kind, self.listing, dg.pack(digests))

    def attach(self, raw: bytes, content: str) -> None:
        """Take a run's digest list (as stored in Redis), which must hash, with this listing, to
        the run's ``content``.

        Raises:
            DatasetError: the list is another dataset's, or the listing here differs.
        """
        digests = dg.unpack(raw, len(self.names))
        if dg.content_hash(self.kind, self.listing, raw) != content:
            raise DatasetError(f"the dataset at {self.root} differs from the one the run was submitted with: its "
                               "files were added, removed or resized since, or this worker sees other files; every "
                               "worker must see the same files")
        self.digests, self.content = digests, content

    def verify(self, i: int, data: bytes, what: str | None = None) -> None:
        """The bytes read for image ``i`` are those listed.

        Raises:
            ContentChanged: naming the file (``what``: a part of one).
        """
        if self.digests is None:
            return
        want = self.digests[i]
        if want is not None and dg.sha256(data) != want:
            raise dg.ContentChanged(f"{what or os.path.join(self.root, self.names[i])} changed since the run was "
                                    "submitted (its bytes are not those listed: sha256 differs); rerun with the "
                                    "files as they are now, or restore it")

    def _files_of(self, start: int, stop: int) -> list[str]:
        return [self.names[i] for i in range(start, stop) if i not in self.known_errors]

    def check_unchanged(self, start: int, stop: int) -> None:
        """The files of images ``[start, stop)`` have the sizes they had when the folder was
        listed (a file rewritten in place leaves the folder's listing as it was).

        Raises:
            DatasetError: naming the first file that changed.
        """
        if not self.sizes:
            return
        for name in dict.fromkeys(self._files_of(start, stop)):
            if name not in self.sizes:
                continue
            try:
                size = os.path.getsize(os.path.join(self.root, name))
            except OSError:
                size = -1
            if size != self.sizes[name]:
                raise DatasetError(f"{os.path.join(self.root, name)} changed since the dataset was listed "
                                   f"({self.sizes[name]} bytes then, {size if size >= 0 else 'gone'} now); rerun "
                                   "with the files as they are now")

    def describe(self) -> dict:
        """What a run records of the dataset: with its ``content`` known, the fingerprint is its
        start (it covers the bytes); else the listing's."""
        return {"kind": self.kind, "root": self.root, "images": len(self.names),
                "fingerprint": self.content[:16] if self.content else self.fingerprint, "content": self.content,
                "listing": self.fingerprint}

    def load(self, i: int) -> np.ndarray:
        if i in self.known_errors:
            raise ImageError(self.known_errors[i])
        return self._load(i)

    def _load(self, i: int) -> np.ndarray:
        raise NotImplementedError


    def read(self, i: int) -> bytes:
        """The bytes of image ``i``'s file: from the host cache (verified there), else read and
        checked against its digest (a file listed with a digest that cannot be read any more
        changed too), and kept in the cache.

        Raises:
            ContentChanged: the bytes differ from those listed, or the file is gone.
            OSError: a file listed without a digest (unreadable then) that cannot be read.
        """
        data = self._cached(i)
        if data is not None:
            return data
        path = os.path.join(self.root, self.names[i])
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            if self.digests is not None and self.digests[i] is not None:
                raise dg.ContentChanged(f"{path} changed since the run was submitted (it cannot be read any more: "
                                        f"{e.strerror or e}); rerun with the files as they are now, or restore it") \
                    from None
            raise
        self._from_source(i, data)
        return data


class JpegFolder(Source):
    def _load(self, i):
        path = os.path.join(self.root, self.names[i])
        if self.digests is None and self.cache is None and self.throttle is None:
            self._count("source", self.sizes.get(self.names[i], 0))
            return preprocess_u8(path)
        return preprocess_u8(self.read(i), name=path)


class BinFolder(Source):
    def _load(self, i):
        want = int(np.prod(PREPROCESS.chw)) * 4
        try:
            data = self.read(i)
        except OSError as e:
            raise ImageError(str(e)) from None
        if len(data) != want:
            raise ImageError(f"{len(data)} bytes, expected {want} (float32 3x331x331)")
        return np.frombuffer(bytearray(data), dtype=np.float32).reshape(PREPROCESS.chw)


class U8Shards(Source):
    def __init__(self, *args, shards: list[dict], index_digests: list | None = None, **kw):
        super().__init__(*args, **kw)
        self.shards = shards
        #: the per-image digests the index names (``nasq preprocess`` writes them), if any
        self.index_digests = index_digests
        self._starts = [s["start"] for s in shards]
        self._maps: dict[int, np.ndarray] = {}

    def _files_of(self, start: int, stop: int) -> list[str]:
        import bisect

        first, last = bisect.bisect_right(self._starts, start) - 1, bisect.bisect_right(self._starts, stop - 1) - 1
        return [self.shards[k]["file"] for k in range(max(0, first), last + 1)]

    def _load(self, i):
        import bisect

        k = bisect.bisect_right(self._starts, i) - 1
        if k not in self._maps:
            path = os.path.join(self.root, self.shards[k]["file"])
            try:
                self._maps[k] = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                if self.digests is not None and self.digests[i] is not None:
                    raise dg.ContentChanged(f"{path} changed since the run was submitted (it cannot be read any "
                                            f"more: {e})") from None
                raise ImageError(f"cannot read shard {path}: {e}") from None
        crop = np.array(self._maps[k][i - self.shards[k]["start"]])
        if self.digests is None and self.cache is None and self.throttle is None:
            self._count("source", crop.nbytes)
        else:
            self._from_source(i, crop.tobytes(), f"image {i} ({self.names[i]}) of "
                                                 f"{os.path.join(self.root, self.shards[k]['file'])}")
        return crop

    def load(self, i: int) -> np.ndarray:
        if i not in self.known_errors and (data := self._cached(i)) is not None:
            return np.frombuffer(data, dtype=np.uint8).reshape(PREPROCESS.crop, PREPROCESS.crop, 3)  # read-only
        return super().load(i)


class _IndexNames(Sequence):
    """The names of an index dataset, made when asked for (a list of millions would not be)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [f"{k:08d}" for k in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return f"{i % self.n:08d}"


class IndexSource(Source):
    """``index:N``: N images that are only their index, for the SIMULATED backend (fleet-scale
    queue tests without files). Other backends refuse it."""

    def _load(self, i):
        return np.array([i], dtype=np.int64)


def _listing(kind: str, entries: list[tuple[str, int]]) -> str:
    """The sha256 of a listing (its first 16 digits are the listing's fingerprint)."""
    h = hashlib.sha256(kind.encode())
    for name, size in entries:
        h.update(f"\n{name}\t{size}".encode())
    return h.hexdigest()


def open_source(path: str | os.PathLike) -> Source:
    """Open a dataset folder, telling the three forms apart by their contents.

    Raises:
        DatasetError: missing folder, incomplete u8 shards, or no images in it.
    """
    text = os.fspath(path)
    if text.startswith(INDEX_PREFIX):
        n = text[len(INDEX_PREFIX):]
        if not n.isdigit() or not 1 <= int(n) <= MAX_INDEX_IMAGES:
            raise DatasetError(f"{text[:40]!r}: an index dataset is index:N with 1 <= N <= {MAX_INDEX_IMAGES} "
                               "(for --backend sim)")
        listing = _listing("index", [(text, int(n))])
        return IndexSource("index", text, _IndexNames(int(n)), listing[:16], "int64", listing=listing)
    root = os.path.abspath(text)
    if not os.path.isdir(root):
        raise DatasetError(f"data folder {root!r} does not exist")
    index = os.path.join(root, U8_INDEX)
    if os.path.isfile(index):
        with open(index, "rb") as f:
            raw = f.read()
        try:
            meta = json.loads(raw)
            if meta.get("format") != U8_FORMAT:
                raise DatasetError(f"{index} is not a nasq u8 index (its format field is not {U8_FORMAT!r})")
            errors = {int(k): str(v) for k, v in meta.get("errors", {}).items()}
            if any(os.path.basename(str(s["file"])) != s["file"] or s["file"] in ("", ".", "..")
                   for s in meta["shards"]):
                raise ValueError("a shard file outside the folder")
            sizes = {}
            for sh in meta["shards"]:
                try:
                    sizes[sh["file"]] = os.path.getsize(os.path.join(root, sh["file"]))
                except OSError:
                    pass
            listing = hashlib.sha256(raw).hexdigest()
            listed = meta.get("digests")
            if listed is not None and (not isinstance(listed, list) or len(listed) != len(meta["names"])):
                raise ValueError("digests")
            return U8Shards("u8", root, [str(n) for n in meta["names"]], listing[:16], "uint8", errors, sizes,
                            listing=listing, shards=meta["shards"], index_digests=listed)
        except (ValueError, TypeError, KeyError, AttributeError):
            raise DatasetError(f"{index} is not a readable nasq u8 index; rerun `nasq preprocess SRC {root} "
                               "--format u8`") from None
    entries = []
    bins = []
    for e in os.scandir(root):
        if not e.is_file() or e.name.startswith("."):
            continue
        ext = os.path.splitext(e.name)[1].lower()
        if ext == ".bin":
            bins.append((e.name, e.stat().st_size))
        elif ext in IMAGE_EXTS:
            entries.append((e.name, e.stat().st_size))
    if bins:
        errors_file = os.path.join(root, BIN_ERRORS)
        failed = {}
        if os.path.isfile(errors_file):
            with open(errors_file, encoding="utf-8") as f:
                failed = json.load(f)
        have = {stem(n) for n, _ in bins}
        listing = sorted(bins + [(n, -1) for n in failed if stem(n) not in have])
        names = [n for n, _ in listing]
        known = {i: f"preprocessing failed: {failed[n]}" for i, n in enumerate(names) if n in failed}
        full = _listing("bin", listing)
        return BinFolder("bin", root, names, full[:16], "float32", known, {n: size for n, size in listing if size >= 0},
                         listing=full)
    if os.path.isfile(os.path.join(root, "shard-00000.npy")):
        raise DatasetError(f"{root} holds u8 shards but no {U8_INDEX}: preprocessing did not finish. "
                           f"Rerun `nasq preprocess SRC {root} --format u8`; it resumes where it stopped.")
    if not entries:
        raise DatasetError(f"no images in {root}: expected JPEG (or PNG) files, .bin files, or u8 shards")
    entries.sort()
    full = _listing("jpeg", entries)
    return JpegFolder("jpeg", root, [n for n, _ in entries], full[:16], "uint8", sizes=dict(entries), listing=full)


def _unusable(e: Exception) -> str:
    """Why a file that Pillow cannot open is unusable, in a few words."""
    from PIL import Image

    if isinstance(e, Image.DecompressionBombError):
        return f"too large to decode ({e})"
    if isinstance(e, OSError):
        return "not an image Pillow can read"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def check_usable(source: Source) -> None:
    """Refuse a dataset without a single usable image before a run is queued. Looks only as far
    as the first usable image (a JPEG whose header Pillow reads, a ``.bin`` of the right size).

    Raises:
        DatasetError: naming the folder, how many files it holds and why the first one fails.
    """
    if source.kind == "index" or (source.kind == "u8" and len(source.known_errors) < len(source)):
        return
    first = None
    for i, name in enumerate(source.names):
        if i in source.known_errors:
            first = first or (name, source.known_errors[i])
            continue
        path = os.path.join(source.root, name)
        try:
            if source.kind == "bin":
                size = os.path.getsize(path)
                if size == int(np.prod(PREPROCESS.chw)) * 4:
                    return
                first = first or (name, f"{size} bytes, not a float32 3x331x331 array")
            else:
                from PIL import Image

                with Image.open(path):
                    return
        except Exception as e:  # noqa: BLE001 - any reason a file cannot be opened makes it unusable, named
            first = first or (name, _unusable(e))
    why = f" (e.g. {first[0]}: {first[1]})" if first else ""
    raise DatasetError(f"no usable image in {source.root}: none of its {len(source)} files can be read{why}")
