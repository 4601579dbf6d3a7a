"""Evaluate an index range of a dataset with a loaded backend.

The one function both a Celery shard task and the single-process reference call, so a
distributed run and a local one batch the same images the same way: batches are the
fixed index windows ``[start + k*B, start + (k+1)*B)`` with unusable images dropped, and
shard boundaries are multiples of B.
"""
from __future__ import annotations

import time

import numpy as np

from ..backends.base import Backend
from ..data.labels import stem
from ..data.outputs import OutputWriter
from ..data.sources import Source
from ..data.transforms import ImageError
from ..model.spec import label_offset

TOPK = 5


def topk(logits: np.ndarray, num_outputs: int, k: int = TOPK) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ImageNet label ids (background -> -1) and their logits, best first; among equal
    logits the lower id first (a stable sort's order)."""
    order = _top_order(logits, k)
    scores = np.take_along_axis(logits, order, axis=1)
    return order - label_offset(num_outputs), scores


def _top_order(logits: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` of ``np.argsort(-logits, axis=1, kind="stable")``, without sorting whole
    rows: each row's candidates are the logits at least its k-th largest, which are exactly k
    where no tie straddles the k-th place (otherwise, or with NaNs, the full sort)."""
    if logits.ndim != 2 or logits.dtype.kind != "f" or not 0 < k < logits.shape[1]:
        return np.argsort(-logits, axis=1, kind="stable")[:, :k]  # (negating integers can wrap)
    n = logits.shape[0]
    kth = -np.partition(-logits, k - 1, axis=1)[:, k - 1:k]
    keep = logits >= kth
    if not (keep.sum(axis=1) == k).all():
        return np.argsort(-logits, axis=1, kind="stable")[:, :k]
    cand = np.nonzero(keep)[1].reshape(n, k)  # ascending ids in each row
    vals = np.take_along_axis(logits, cand, axis=1)
    return np.take_along_axis(cand, np.argsort(-vals, axis=1, kind="stable"), axis=1)


def evaluate_range(source: Source, backend: Backend, start: int, stop: int, *, batch_size: int,
                   labels: dict[str, int] | None = None, writer: OutputWriter | None = None,
                   on_batch=None, latencies: list[float] | None = None, loader_threads: int = 1) -> dict:
    """Run images ``[start, stop)`` of ``source`` through ``backend``.

    The next batch is read and preprocessed (``loader_threads`` threads; Pillow releases the
    GIL while it decodes and resizes) while the current one runs on the device.

    Args:
        labels: {file stem: label}; an image without one is recorded as an error.
        writer: if given, full logits are written in ais_bench's layout.
        on_batch: called with the number of images done after each batch (progress).
        latencies: if given, each batch's compute time in ms is appended: the device's own
            execution time where the backend reports it (``take_device_ms``; ``compute_clock``
            "device"), else host time around the call ("host").

    Returns:
        A JSON-ready dict: per image (in index order) its index, name, label, top-5 ids and
        logits; the unusable images with reasons; and timings (``data_s`` is the loaders'
        time, overlapped with compute; ``wall_s`` the whole range).
    """
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    started_at = time.time()
    read_before = source.counts()
    out = {"indices": [], "names": [], "labels": [], "top5": [], "scores": [], "errors": []}
    compute_s = 0.0
    clock = "host"
    backend.take_device_ms()  # not this range's: a warm-up's or an earlier range's
    num_outputs = None
    pool = ThreadPoolExecutor(max_workers=max(1, loader_threads)) if loader_threads > 1 else None

    # JPEGs decoded on the device: the loaders only read bytes.
    encoded = getattr(backend, "decodes_jpeg", False) and source.kind == "jpeg"

    def load_one(i: int):
        name = source.names[i]
        try:
            if labels is not None and stem(name) not in labels:
                raise ImageError("no label for this image in the label file")
            if encoded:
                return i, source.read(i), None  # checked against its digest, as a decoded one is
            return i, source.load(i), None
        except (ImageError, OSError) as e:
            return i, None, {"index": i, "name": name, "reason": str(e)}

    def run_batch(items, batch):
        """(kept items, logits) of the loaded ``items`` (``batch``: their arrays stacked, or None).
        With device decoding, a batch holding an undecodable file goes through the per-image CPU
        path instead, which names the file and its reason."""
        if encoded:
            try:
                return items, backend.predict_encoded([arr for _, arr, _ in items])
            except (RuntimeError, ValueError):
                items = [load_cpu(i) for i, _, _ in items]
                out["errors"].extend(err for _, _, err in items if err is not None)
                items = [it for it in items if it[1] is not None]
                if not items:
                    return items, None
        if batch is None:  # the device-decode fallback's images, decoded here
            batch = np.stack([arr for _, arr, _ in items])
        if backend.fixed_batch and len(batch) < backend.fixed_batch:
            pad = np.zeros((backend.fixed_batch - len(batch),) + batch.shape[1:], dtype=batch.dtype)
            batch = np.concatenate([batch, pad])
        logits = backend.predict_u8(batch) if batch.dtype == np.uint8 else backend.predict(batch)
        return items, logits[: len(items)]

    def load_cpu(i: int):
        try:
            return i, source.load(i), None
        except (ImageError, OSError) as e:
            return i, None, {"index": i, "name": source.names[i], "reason": str(e)}

    def load_window(w0: int):
        td = time.perf_counter()
        idx = range(w0, min(w0 + batch_size, stop))
        items = list(pool.map(load_one, idx)) if pool else [load_one(i) for i in idx]
        # the batch is stacked here, in the prefetch thread, off the device's critical path
        kept = [arr for _, arr, _ in items if arr is not None]
        batch = None
        if kept and not encoded:
            batch = np.stack(kept)
            rows = iter(batch)  # the items keep views of the batch, not a second copy of the images
            items = [(i, next(rows) if arr is not None else None, err) for i, arr, err in items]
        return items, batch, time.perf_counter() - td

    windows = list(range(start, stop, batch_size))
    data_s = 0.0
    with ThreadPoolExecutor(max_workers=1) as prefetch:
        nxt = prefetch.submit(load_window, windows[0]) if windows else None
        for k, w0 in enumerate(windows):
            items, batch, dt = nxt.result()
            data_s += dt
            if k + 1 < len(windows):
                nxt = prefetch.submit(load_window, windows[k + 1])
            out["errors"] += [err for _, _, err in items if err is not None]
            items = [it for it in items if it[1] is not None]
            tc = time.perf_counter()
            if items:
                items, logits = run_batch(items, batch)
            host_ms = (time.perf_counter() - tc) * 1e3
            dev_ms = backend.take_device_ms()  # the device's own clock where the runtime reports it
            if dev_ms is not None:
                clock = "device"
            if not items:
                if on_batch is not None:
                    on_batch(min(w0 + batch_size, stop) - start)
                continue
            batch_ms = dev_ms if dev_ms is not None else host_ms
            compute_s += batch_ms / 1e3
            if latencies is not None:
                latencies.append(batch_ms)
            good = [i for i, _, _ in items]
            num_outputs = logits.shape[1]
            ids, scores = topk(logits, num_outputs)
            names = [source.names[i] for i in good]
            if writer is not None:
                writer.write(names, logits)
            out["indices"] += good
            out["names"] += names
            out["labels"] += [labels[stem(n)] if labels is not None else None for n in names]
            out["top5"] += ids.tolist()
            out["scores"] += np.round(scores.astype(np.float64), 5).tolist()
            if on_batch is not None:
                on_batch(min(w0 + batch_size, stop) - start)
    if pool is not None:
        pool.shutdown()
    out["num_outputs"] = num_outputs
    now = source.counts()
    out["data"] = {k: now[k] - read_before.get(k, 0) for k in now}  # images read from the host cache and the source
    out["timing"] = {"data_s": data_s, "compute_s": compute_s, "compute_clock": clock,
                     "wall_s": time.perf_counter() - t0,
                     "started_at": started_at, "finished_at": time.time()}
    return out
