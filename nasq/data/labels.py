"""Labels: ``val_label.txt`` (``ILSVRC2012_val_00000001.JPEG 65``, 0-based), matched on the
file stem, so ``ILSVRC2012_val_00000001.bin`` finds its label too."""
from __future__ import annotations

import os

from ..errors import DatasetError


def read_labels(path: str | os.PathLike) -> dict[str, int]:
    """``val_label.txt`` -> {file stem: 0-based label}.

    Raises:
        DatasetError: missing file or a malformed line (with its number).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f"label file {path!r} does not exist")
    labels: dict[str, int] = {}
    # The line itself is never quoted: a label path in a message may name a file that is not
    # a label file, and errors travel to Redis and the logs.
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or len(parts[1]) > 9:
                raise DatasetError(f"{path}:{n}: not a label line (expected '<image file> <label>', such as "
                                   "'ILSVRC2012_val_00000001.JPEG 65'); is it a val_label.txt?")
            labels[os.path.splitext(parts[0])[0]] = int(parts[1])
    if not labels:
        raise DatasetError(f"label file {path!r} is empty")
    return labels


def out_of_range(labels: dict[str, int], names, classes: int = 1000) -> list[tuple[str, int]]:
    """(image, label) of the images in ``names`` whose label is not an ImageNet class
    (0 <= label < ``classes``): they could never be predicted right."""
    return [(n, labels[stem(n)]) for n in names if stem(n) in labels and not 0 <= labels[stem(n)] < classes]


def find_labels(data: str) -> str | None:
    """``val_label.txt`` beside or inside the data folder, if there is one."""
    for cand in (os.path.join(data, "val_label.txt"), os.path.join(os.path.dirname(os.path.abspath(data)), "val_label.txt")):
        if os.path.isfile(cand):
            return cand
    return None


def stem(name: str) -> str:
    return os.path.splitext(os.path.basename(name))[0]


