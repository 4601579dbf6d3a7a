"""Datasets: the seed's preprocessing and the three on-disk forms workers read.

* a folder of JPEGs (ImageNet val), decoded and preprocessed by the worker;
* a folder of ``.bin`` files, the seed's layout: one raw float32 3x331x331 (CHW) array
  per image, normalized, readable by ais_bench;
* a folder of ``u8`` shards written by ``nasq preprocess --format u8``: uint8 331x331x3
  crops (4x smaller than ``.bin``) that workers normalize on the device.

Images are ordered by file name; shards of a run are index ranges into that order.
Labels come from ``val_label.txt`` (``ILSVRC2012_val_00000001.JPEG 65``, 0-based) and are
matched on the file stem, so ``ILSVRC2012_val_00000001.bin`` finds its label too.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np

from .errors import DatasetError
from .spec import PREPROCESS, PreprocessSpec

IMAGE_EXTS = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}
U8_FORMAT = "nasq-u8"
U8_INDEX = "index.json"
BIN_ERRORS = "preprocess_errors.json"


class ImageError(Exception):
    """An image that cannot be used; the message is the reason recorded in the report."""


# --------------------------------------------------------------------------- preprocessing

def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after torchvision's ``Resize(size)``: shorter side to ``size``.

    The longer side is truncated, not rounded, exactly as torchvision computes it.
    """
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (size, new_long) if width <= height else (new_long, size)


def preprocess_u8(src, spec: PreprocessSpec = PREPROCESS) -> np.ndarray:
    """Decode one image and return the seed's crop as uint8 HWC (331x331x3, RGB).

    Same operations as Cadene's ``TransformImage`` up to ``ToTensor``: RGB conversion,
    PIL bilinear resize (antialiased) of the shorter side to 378, center crop 331.

    Raises:
        ImageError: unreadable, truncated or non-image input.
    """
    from PIL import Image

    try:
        with Image.open(src) as im:
            im = im.convert("RGB")
            w, h = im.size
            nw, nh = resized_size(w, h, spec.resize)
            im = im.resize((nw, nh), Image.BILINEAR)
            left = int(round((nw - spec.crop) / 2.0))
            top = int(round((nh - spec.crop) / 2.0))
            im = im.crop((left, top, left + spec.crop, top + spec.crop))
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = str(e) or type(e).__name__
        if isinstance(src, (str, os.PathLike)) and os.path.isfile(src) and os.path.getsize(src) == 0:
            reason = "empty file"
        raise ImageError(reason) from None


def normalize_u8(batch: np.ndarray, spec: PreprocessSpec = PREPROCESS) -> np.ndarray:
    """uint8 NHWC crops -> normalized float32 NCHW, as ToTensor + Normalize compute it."""
    x = batch.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def preprocess_float(src, spec: PreprocessSpec = PREPROCESS) -> np.ndarray:
    """One image as the seed's float32 CHW input (what a ``.bin`` file holds)."""
    return normalize_u8(preprocess_u8(src, spec)[None], spec)[0]


# --------------------------------------------------------------------------- labels

def read_labels(path: str | os.PathLike) -> dict[str, int]:
    """``val_label.txt`` -> {file stem: 0-based label}.

    Raises:
        DatasetError: missing file or a malformed line (with its number).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f"label file {path!r} does not exist")
    labels: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DatasetError(f"{path}:{n}: expected '<image file> <label>', got {line.strip()!r}")
            labels[os.path.splitext(parts[0])[0]] = int(parts[1])
    if not labels:
        raise DatasetError(f"label file {path!r} is empty")
    return labels


def find_labels(data: str) -> str | None:
    """``val_label.txt`` beside or inside the data folder, if there is one."""
    for cand in (os.path.join(data, "val_label.txt"), os.path.join(os.path.dirname(os.path.abspath(data)), "val_label.txt")):
        if os.path.isfile(cand):
            return cand
    return None


def stem(name: str) -> str:
    return os.path.splitext(os.path.basename(name))[0]


# --------------------------------------------------------------------------- sources

@dataclass
class Source:
    """An ordered list of images in one of the three forms. Load item i with ``load``."""

    kind: str
    root: str
    names: list[str]
    fingerprint: str
    dtype: str  # what load() returns: "uint8" (HWC crop) or "float32" (normalized CHW)
    known_errors: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)

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
    root = os.path.abspath(os.fspath(path))
    if not os.path.isdir(root):
        raise DatasetError(f"data folder {root!r} does not exist")
    index = os.path.join(root, U8_INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("format") != U8_FORMAT:
            raise DatasetError(f"{index} is not a nasq u8 index (format {meta.get('format')!r})")
        raw = open(index, "rb").read()
        errors = {int(k): v for k, v in meta.get("errors", {}).items()}
        return U8Shards("u8", root, list(meta["names"]), hashlib.sha256(raw).hexdigest()[:16], "uint8",
                        errors, shards=meta["shards"])
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
        return BinFolder("bin", root, names, _listing_fingerprint("bin", listing), "float32", known)
    if os.path.isfile(os.path.join(root, "shard-00000.npy")):
        raise DatasetError(f"{root} holds u8 shards but no {U8_INDEX}: preprocessing did not finish. "
                           f"Rerun `nasq preprocess SRC {root} --format u8`; it resumes where it stopped.")
    if not entries:
        raise DatasetError(f"no images in {root}: expected JPEG (or PNG) files, .bin files, or u8 shards")
    entries.sort()
    return JpegFolder("jpeg", root, [n for n, _ in entries], _listing_fingerprint("jpeg", entries), "uint8")
