"""Per-image predictions as a file: JSON (as the run store keeps them) or CSV (a row per image:
name, label, top-5 classes, their logits)."""
from __future__ import annotations

import csv
import io

from ..files import atomic_write, write_json


def write_predictions(pred: dict, path: str) -> None:
    """Write ``pred`` (names, labels, top5, scores per image) to ``path``: .json, else CSV."""
    if path.endswith(".json"):
        write_json(pred, path, indent=None)
        return
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["image", "label"] + [f"top{k}" for k in range(1, 6)] + [f"logit{k}" for k in range(1, 6)])
    for name, label, ids, scores in zip(pred["names"], pred["labels"], pred["top5"], pred["scores"]):
        w.writerow([name, "" if label is None else label, *ids, *scores])
    atomic_write(path, out.getvalue())
