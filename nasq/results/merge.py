"""Merge shard results into a run report.

The chord on the Redis result backend can hand the merge a shard twice (a redelivered
shard whose result differs by a byte is counted again) and, when that happens before the
last real shard lands, without one. So the merge checks itself: exactly one result per
shard id of the manifest, every shard present and ``ok``, every image accounted for.
"""
from __future__ import annotations

import time

from ..errors import RunError

TOPK = 5


class MissingShards(RunError):
    def __init__(self, run_id: str, missing: list[str]):
        self.missing = missing
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        super().__init__(f"run {run_id}: {len(missing)} shard(s) missing from the merge: {shown}")


def collect(manifest: dict, results: list) -> tuple[dict[str, dict], list[str]]:
    """One result per shard id: returns ({shard_id: result}, duplicate shard ids dropped).

    Raises:
        MissingShards: a shard of the manifest has no result.
        RunError: a shard failed (its error is in the message).
    """
    run_id = manifest["run_id"]
    by_id: dict[str, dict] = {}
    dropped: list[str] = []
    for r in results:
        if not isinstance(r, dict) or r.get("run_id") != run_id:
            continue
        sid = r["shard_id"]
        if sid in by_id:
            dropped.append(sid)  # a redelivered shard: the first result is as good as the second
            continue
        by_id[sid] = r
    expected = [s["shard_id"] for s in manifest["shards"]]
    missing = [sid for sid in expected if sid not in by_id]
    if missing:
        raise MissingShards(run_id, missing)
    failed = [by_id[sid] for sid in expected if by_id[sid].get("status") != "ok"]
    if failed:
        lines = "; ".join(f"{r['shard_id']} on {r.get('worker', '?')}: {r.get('error', 'failed')}" for r in failed[:5])
        raise RunError(f"run {run_id}: {len(failed)} shard(s) failed: {lines}")
    for s in manifest["shards"]:
        r = by_id[s["shard_id"]]
        seen = len(r["indices"]) + len(r["errors"])
        if seen != s["stop"] - s["start"]:
            raise RunError(f"run {run_id}: shard {s['shard_id']} accounts for {seen} images, "
                           f"expected {s['stop'] - s['start']}")
    return {sid: by_id[sid] for sid in expected}, dropped


def accuracy(labels: list, top5: list[list[int]]) -> dict:
    """Top-1..top-5 accuracy in percent over images that have a label (None without labels)."""
    pairs = [(lab, ids) for lab, ids in zip(labels, top5) if lab is not None]
    if not pairs:
        return {f"top{k}": None for k in range(1, TOPK + 1)} | {"correct": None}
    correct = {k: sum(lab in ids[:k] for lab, ids in pairs) for k in range(1, TOPK + 1)}
    out = {f"top{k}": round(100.0 * correct[k] / len(pairs), 4) for k in correct}
    out["correct"] = {f"top{k}": correct[k] for k in correct}
    return out


def latency_summary(lat_ms: list[float]) -> dict:
    """min/mean/p50/p90/p95/p99/max of per-batch compute times (ms), and how many there were."""
    import numpy as np

    if not lat_ms:
        return {"count": 0, **{k: None for k in ("min", "mean", "p50", "p90", "p95", "p99", "max")}}
    a = np.asarray(lat_ms, dtype=float)
    q = np.percentile(a, [50, 90, 95, 99])
    return {"count": int(a.size), "min": round(float(a.min()), 3), "mean": round(float(a.mean()), 3),
            "p50": round(float(q[0]), 3), "p90": round(float(q[1]), 3), "p95": round(float(q[2]), 3),
            "p99": round(float(q[3]), 3), "max": round(float(a.max()), 3)}


def merge(manifest: dict, results: list) -> tuple[dict, dict]:
    """Validate shard results and compute the run report.

    Returns:
        (report, predictions): the report is the summary written as JSON and shown as a
        table; predictions hold per image (index order) the name, label, top-5 ids, logits.
    """
    shards, dropped = collect(manifest, results)
    pred = {"names": [], "indices": [], "labels": [], "top5": [], "scores": []}
    errors = []
    devices: dict[tuple, dict] = {}
    for sid, r in shards.items():
        for key in pred:
            pred[key] += r[key]
        errors += r["errors"]
        t = r["timing"]
        key = (r["worker"], r["device"])
        d = devices.setdefault(key, {"worker": r["worker"], "device": r["device"], "device_name": r.get("device_name"),
                                     "backend": r["backend"], "shards": 0, "images": 0, "compute_s": 0.0,
                                     "data_s": 0.0, "wall_s": 0.0, "first_start": t["started_at"],
                                     "last_finish": t["finished_at"], "model_load_s": 0.0, "_lat": [], "_batches": 0})
        d["shards"] += 1
        # "device": the runtime's own execution time (ais_bench's exec_time_list); "host": time around the call
        if d.get("compute_clock") != "device":  # a shard without images reports "host"
            d["compute_clock"] = t.get("compute_clock", "host")
        d["model_load_s"] = max(d["model_load_s"], r.get("load_s") or 0.0)
        d["_lat"] += r.get("latency_ms") or []
        d["images"] += len(r["indices"])
        d["compute_s"] += t["compute_s"]
        d["data_s"] += t["data_s"]
        d["wall_s"] += t["wall_s"]
        d["first_start"] = min(d["first_start"], t["started_at"])
        d["last_finish"] = max(d["last_finish"], t["finished_at"])
    per_device = []
    for d in devices.values():
        lat = d.pop("_lat")
        d.pop("_batches")
        d["img_s_compute"] = round(d["images"] / d["compute_s"], 3) if d["compute_s"] else None
        d["img_s_wall"] = round(d["images"] / d["wall_s"], 3) if d["wall_s"] else None
        d["latency_ms"] = latency_summary(lat)
        # ais_bench's throughput: 1000 * mean batch size / mean compute time per batch (ms)
        d["img_s_ais_bench"] = round(1000.0 * (d["images"] / len(lat)) / d["latency_ms"]["mean"], 3) \
            if lat and d["latency_ms"]["mean"] else None
        for k in ("compute_s", "data_s", "wall_s"):
            d[k] = round(d[k], 3)
        per_device.append(d)
    per_device.sort(key=lambda d: (d["worker"], d["device"]))
    start = min(r["timing"]["started_at"] for r in shards.values())
    end = max(r["timing"]["finished_at"] for r in shards.values())
    n = len(pred["indices"])
    first = next(iter(shards.values()))
    finished = time.time()
    created = manifest.get("created")
    report = {
        "run_id": manifest["run_id"],
        "created": manifest.get("created"),
        "finished": finished,
        "images": n,
        "images_total": manifest["dataset"]["images"],
        **accuracy(pred["labels"], pred["top5"]),
        "throughput_img_s": round(n / (end - start), 3) if end > start else None,
        "wall_s": round(end - start, 3),
        "throughput": {  # every throughput, named by what it divides by (see README, "The report")
            "shard_span_img_s": round(n / (end - start), 3) if end > start else None,
            "end_to_end_img_s": round(n / (finished - created), 3) if created and finished > created else None,
            "end_to_end_s": round(finished - created, 3) if created else None,
            "compute_img_s": round(sum(d["img_s_ais_bench"] or 0 for d in per_device), 3) or None,
        },
        "model_load_s": max((d["model_load_s"] for d in per_device), default=0.0),
        "error_count": len(errors),
        "errors": [{"name": e["name"], "reason": e["reason"]} for e in errors],
        "per_device": per_device,
        "backend": {"name": first["backend"], "versions": first.get("versions", {})},
        "model": first.get("model_info", {}),
        "num_outputs": first.get("num_outputs"),
        "batch_size": manifest["batch_size"],
        "precision": first.get("precision"),
        "dataset": manifest["dataset"],
        "labels_file": manifest.get("labels"),
        "shards": len(shards),
        "duplicate_shard_results_dropped": dropped,
    }
    return report, pred


def ok_results(manifest: dict, results: list) -> list[dict]:
    """The ok results of the run's shards, one per shard id (the first)."""
    ok, seen = [], set()
    for r in results:
        if isinstance(r, dict) and r.get("run_id") == manifest["run_id"] and r.get("status") == "ok" \
                and r["shard_id"] not in seen:
            seen.add(r["shard_id"])
            ok.append(r)
    return ok


def merge_partial(manifest: dict, results: list, reason: str) -> tuple[dict, dict] | None:
    """What a failed run did finish: the report over its ok shards, marked partial."""
    ok = ok_results(manifest, results)
    seen = {r["shard_id"] for r in ok}
    if not ok:
        return None
    sub = {**manifest, "shards": [s for s in manifest["shards"] if s["shard_id"] in seen]}
    report, pred = merge(sub, ok)
    report.update(partial=True, failure=reason, shards=len(manifest["shards"]),
                  shards_ok=len(ok), shards_not_ok=[s["shard_id"] for s in manifest["shards"] if s["shard_id"] not in seen])
    return report, pred
