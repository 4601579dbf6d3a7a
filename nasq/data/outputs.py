"""Full model outputs on disk in ais_bench's layout: ``<stem>_0.<ext>`` per image."""
from __future__ import annotations

import os

import numpy as np

from ..files import atomic_write
from .labels import stem

FORMATS = ("NPY", "TXT", "BIN")


class OutputWriter:
    """Writes one file per image (shape (1, C), like ais_bench at batch size 1)."""

    def __init__(self, root: str, fmt: str = "NPY"):
        fmt = fmt.upper()
        if fmt not in FORMATS:
            raise ValueError(f"output format must be one of {FORMATS}, not {fmt!r}")
        self.root, self.fmt = root, fmt
        os.makedirs(root, exist_ok=True)

    def write(self, names: list[str], logits: np.ndarray) -> None:
        ext = self.fmt.lower()
        for name, row in zip(names, logits):
            path = os.path.join(self.root, f"{stem(name)}_0.{ext}")
            row = np.asarray(row, dtype=np.float32)[None]
            # one file per image, on the worker's path between batches: whole or absent after a
            # crash of the process, without a disk sync per image (a run lost with its machine is
            # rerun, and writes them again)
            if self.fmt == "NPY":
                atomic_write(path, lambda f, row=row: np.save(f, row), durable=False)
            elif self.fmt == "TXT":
                atomic_write(path, lambda f, row=row: np.savetxt(f, row, fmt="%.8g"), durable=False)
            else:
                atomic_write(path, row.tobytes(), durable=False)
