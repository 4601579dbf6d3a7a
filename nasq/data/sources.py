"""Datasets: the three on-disk forms workers read.

* a folder of JPEGs (ImageNet val), decoded and preprocessed by the worker;
* a folder of ``.bin`` files, the seed's layout: one raw float32 3x331x331 (CHW) array
  per image, normalized, readable by ais_bench;
* a folder of ``u8`` shards written by ``nasq preprocess --format u8``: uint8 331x331x3
  crops (4x smaller than ``.bin``) that workers normalize on the device.

Images are ordered by file name; shards of a run are index ranges into that order.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import DatasetError
from ..model.spec import PREPROCESS
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

    def __len__(self) -> int:
        return len(self.names)

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
        return {"kind": self.kind, "root": self.root, "images": len(self.names), "fingerprint": self.fingerprint}

    def load(self, i: int) -> np.ndarray:
        if i in self.known_errors:
            raise ImageError(self.known_errors[i])
        return self._load(i)

    def _load(self, i: int) -> np.ndarray:
        raise NotImplementedError


class JpegFolder(Source):
    def _load(self, i):
        return preprocess_u8(os.path.join(self.root, self.names[i]))


class BinFolder(Source):
    def _load(self, i):
        path = os.path.join(self.root, self.names[i])
        want = int(np.prod(PREPROCESS.chw)) * 4
        try:
            size = os.path.getsize(path)
            if size != want:
                raise ImageError(f"{size} bytes, expected {want} (float32 3x331x331)")
            return np.fromfile(path, dtype=np.float32).reshape(PREPROCESS.chw)
        except OSError as e:
            raise ImageError(str(e)) from None


class U8Shards(Source):
    def __init__(self, *args, shards: list[dict], **kw):
        super().__init__(*args, **kw)
        self.shards = shards
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
                raise ImageError(f"cannot read shard {path}: {e}") from None
        return np.array(self._maps[k][i - self.shards[k]["start"]])


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


def _listing_fingerprint(kind: str, entries: list[tuple[str, int]]) -> str:
    h = hashlib.sha256(kind.encode())
    for name, size in entries:
        h.update(f"\n{name}\t{size}".encode())
    return h.hexdigest()[:16]


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
        return IndexSource("index", text, _IndexNames(int(n)),
                           _listing_fingerprint("index", [(text, int(n))]), "int64")
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
            return U8Shards("u8", root, [str(n) for n in meta["names"]], hashlib.sha256(raw).hexdigest()[:16],
                            "uint8", errors, sizes, shards=meta["shards"])
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
        return BinFolder("bin", root, names, _listing_fingerprint("bin", listing), "float32", known,
                         {n: size for n, size in listing if size >= 0})
    if os.path.isfile(os.path.join(root, "shard-00000.npy")):
        raise DatasetError(f"{root} holds u8 shards but no {U8_INDEX}: preprocessing did not finish. "
                           f"Rerun `nasq preprocess SRC {root} --format u8`; it resumes where it stopped.")
    if not entries:
        raise DatasetError(f"no images in {root}: expected JPEG (or PNG) files, .bin files, or u8 shards")
    entries.sort()
    return JpegFolder("jpeg", root, [n for n, _ in entries], _listing_fingerprint("jpeg", entries), "uint8",
                      sizes=dict(entries))


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
        except (OSError, ValueError) as e:
            first = first or (name, type(e).__name__ if isinstance(e, ValueError) else "not an image Pillow can read")
    why = f" (e.g. {first[0]}: {first[1]})" if first else ""
    raise DatasetError(f"no usable image in {source.root}: none of its {len(source)} files can be read{why}")
