"""Merge shard results into a run report.

The chord on the Redis result backend can hand the merge a shard twice (a redelivered
shard whose result differs by a byte is counted again) and, when that happens before the
last real shard lands, without one. So the merge checks itself: exactly one result per
shard id of the manifest, every shard present and ``ok``, every image accounted for.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import replace

from ..errors import RunError
from ..rundata import BackendInfo, Report, RunEnvironment, RunManifest, ShardResult, Throughput
from ..runstate import RunState
from ..wire import MessageError
from .stats import wilson

TOPK = 5
#: a p99 from fewer batches than this is close to the maximum, not a tail estimate
P99_MIN_SAMPLES = 100

log = logging.getLogger("nasq.merge")


class MissingShards(RunError):
    def __init__(self, run_id: str, missing: list[str]):
        self.missing = missing
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        super().__init__(f"run {run_id}: {len(missing)} shard(s) missing from the merge: {shown}")


def collect(manifest: RunManifest, results: list) -> tuple[dict[str, ShardResult], list[str]]:
    """One result per shard id: returns ({shard_id: result}, duplicate shard ids dropped).

    Raises:
        MissingShards: a shard of the manifest has no result.
        RunError: a shard failed (its error is in the message).
        MessageError: a result of the run is malformed (the field is named).
    """
    run_id = manifest.run_id
    by_id: dict[str, ShardResult] = {}
    dropped: list[str] = []
    for r in filter(None, (ShardResult.read(x, run_id) for x in results)):
        if r.shard_id in by_id:
            dropped.append(r.shard_id)  # a redelivered shard: the first result is as good as the second
            continue
        by_id[r.shard_id] = r
    expected = manifest.shard_ids
    missing = [sid for sid in expected if sid not in by_id]
    if missing:
        raise MissingShards(run_id, missing)
    failed = [by_id[sid] for sid in expected if not by_id[sid].ok]
    if failed:
        lines = "; ".join(f"{r.shard_id} on {r.worker or '?'}: {r.error or 'failed'}" for r in failed[:5])
        raise RunError(f"run {run_id}: {len(failed)} shard(s) failed: {lines}")
    for s in manifest.shards:
        seen = by_id[s.shard_id].accounted
        if seen != s.images:
            raise RunError(f"run {run_id}: shard {s.shard_id} accounts for {seen} images, expected {s.images}")
    return {sid: by_id[sid] for sid in expected}, dropped


def accuracy(labels: list, top5: list[list[int]]) -> dict:
    """Top-1..top-5 accuracy in percent over images that have a label (None without labels),
    each with its Wilson 95 % interval (``top1_ci95``: [low, high] in percent), the counts
    behind them and ``labelled``, at full precision."""
    pairs = [(lab, ids) for lab, ids in zip(labels, top5) if lab is not None]
    ks = range(1, TOPK + 1)
    if not pairs:
        return {f"top{k}": None for k in ks} | {f"top{k}_ci95": None for k in ks} | {"correct": None, "labelled": 0}
    correct = {k: sum(lab in ids[:k] for lab, ids in pairs) for k in ks}
    out: dict = {f"top{k}": 100.0 * correct[k] / len(pairs) for k in ks}
    out |= {f"top{k}_ci95": tuple(100.0 * x for x in wilson(correct[k], len(pairs))) for k in ks}
    out["correct"] = {f"top{k}": correct[k] for k in ks}
    out["labelled"] = len(pairs)
    return out


def latency_summary(lat_ms: list[float]) -> dict:
    """min/mean/p50/p90/p95/p99/max of per-batch compute times (ms), how many there were, and
    ``p99_samples_ok``: whether there were enough for the p99 to be a tail estimate."""
    import numpy as np

    if not lat_ms:
        return {"count": 0, **{k: None for k in ("min", "mean", "p50", "p90", "p95", "p99", "max")},
                "p99_samples_ok": False}
    a = np.asarray(lat_ms, dtype=float)
    q = np.percentile(a, [50, 90, 95, 99])
    return {"count": int(a.size), "min": float(a.min()), "mean": float(a.mean()), "p50": float(q[0]),
            "p90": float(q[1]), "p95": float(q[2]), "p99": float(q[3]), "max": float(a.max()),
            "p99_samples_ok": bool(a.size >= P99_MIN_SAMPLES)}


def merge(manifest: RunManifest, results: list) -> tuple[Report, dict]:
    """Validate shard results and compute the run report.

    Returns:
        (report, predictions): the report is the summary written as JSON and shown as a
        table; predictions hold per image (index order) the name, label, top-5 ids, logits.
    """
    shards, dropped = collect(manifest, results)
    pred = {"names": [], "indices": [], "labels": [], "top5": [], "scores": []}
    errors = []
    devices: dict[tuple, dict] = {}
    hosts: dict[str, dict] = {}
    reads: dict[str, dict] = {}
    for sid, r in shards.items():
        for key in pred:
            pred[key] += getattr(r, key)
        errors += r.errors
        t, host = r.timing, r.at_host
        if r.environment:
            hosts.setdefault(host, r.environment)
        for k, v in r.data.items():  # images read from the host cache and from the source
            reads.setdefault(host or "?", {}).setdefault(k, 0)
            reads[host or "?"][k] += v
        d = devices.setdefault((r.worker, r.device), {
            "worker": r.worker, "host": host, "device": r.device, "device_name": r.device_name,
            "accelerator": r.accelerator, "versions": r.versions, "backend": r.backend, "shards": 0, "images": 0,
            "compute_s": 0.0, "data_s": 0.0, "wall_s": 0.0, "first_start": t.started_at, "last_finish": t.finished_at,
            "model_load_s": 0.0, "_lat": []})
        d["shards"] += 1
        # "device": the runtime's own execution time (ais_bench's exec_time_list); "host": time around the call
        if d.get("compute_clock") != "device":  # a shard without images reports "host"
            d["compute_clock"] = t.compute_clock
        d["model_load_s"] = max(d["model_load_s"], r.load_s or 0.0)
        d["_lat"] += r.latency_ms
        d["images"] += len(r.indices)
        d["compute_s"] += t.compute_s
        d["data_s"] += t.data_s
        d["wall_s"] += t.wall_s
        d["first_start"] = min(d["first_start"], t.started_at)
        d["last_finish"] = max(d["last_finish"], t.finished_at)
    per_device = []
    for d in devices.values():
        lat = d.pop("_lat")
        d["img_s_compute"] = d["images"] / d["compute_s"] if d["compute_s"] else None
        d["img_s_wall"] = d["images"] / d["wall_s"] if d["wall_s"] else None
        d["latency_ms"] = latency_summary(lat)
        # ais_bench's throughput: 1000 * mean batch size / mean compute time per batch (ms)
        d["img_s_ais_bench"] = 1000.0 * (d["images"] / len(lat)) / d["latency_ms"]["mean"] \
            if lat and d["latency_ms"]["mean"] else None
        per_device.append(d)
    per_device.sort(key=lambda d: (d["host"] or "", d["device"], d["worker"]))
    start = min((r.timing.started_at for r in shards.values()), default=0.0)
    end = max((r.timing.finished_at for r in shards.values()), default=0.0)
    n = len(pred["indices"])
    job = manifest.job
    first = next(iter(shards.values()), None)  # what ran the run (none: what it was to run on)
    finished = time.time()
    created = manifest.created
    reads_total = {k: sum(h.get(k, 0) for h in reads.values())
                   for k in ("images_from_cache", "images_from_source", "bytes_from_cache", "bytes_from_source")}
    report = Report(
        run_id=manifest.run_id, state=str(RunState.DONE), error=None, complete=True, created=created,
        finished=finished, images=n, images_planned=manifest.images_planned, images_total=manifest.images,
        **accuracy(pred["labels"], pred["top5"]),
        throughput_img_s=n / (end - start) if end > start else None,
        wall_s=end - start,
        throughput=Throughput(  # every throughput, named by what it divides by (see docs/REPORT.md)
            shard_span_img_s=n / (end - start) if end > start else None,
            end_to_end_img_s=n / (finished - created) if created and finished > created else None,
            end_to_end_s=finished - created if created else None,
            compute_img_s=sum(d["img_s_ais_bench"] or 0 for d in per_device) or None),
        model_load_s=max((d["model_load_s"] for d in per_device), default=0.0),
        error_count=len(errors),
        errors=tuple({"name": e["name"], "reason": e["reason"]} for e in errors),
        per_device=tuple(per_device),
        data_read={"hosts": reads, **reads_total},
        backend=BackendInfo(first.backend, first.versions) if first else BackendInfo(job.backend),
        model=first.model_info if first else {"weights": job.model.weights, "sha256": job.model.sha256},
        num_outputs=first.num_outputs if first else None,
        batch_size=job.batch_size,
        precision=first.precision if first else job.precision,
        dataset=job.dataset,
        labels_file=job.labels,
        labels_sha256=job.labels_sha256,
        shards=len(shards),
        shards_ok=len(shards),
        shards_failed=(),
        duplicate_shard_results_dropped=tuple(dropped),
        environment=RunEnvironment(hosts=hosts, submitted_from=manifest.submitted_from,
                                   client_nasq=manifest.nasq_version, command=manifest.command),
    )
    return replace(report, warnings=tuple(warnings_of(report))), pred


def warnings_of(report: Report) -> list[str]:
    """What a reader must know before trusting the numbers: simulated devices, weights that are
    not the published checkpoint, an incomplete run, a p99 from few batches."""
    out = []
    if report.backend.name == "sim" or any(d.get("backend") == "sim" for d in report.per_device):
        out.append("SIMULATED devices: their timings are a simulator's, not measurements")
    model = report.model
    if model.get("published") is False:  # checked by the worker that loaded it (md5); unknown for others
        out.append(f"weights are not the published NASNet-Large checkpoint (sha256 {str(model.get('sha256'))[:12]}...):"
                   " the accuracy is these weights' own"
                   + (" (RANDOM weights from nasq demo)" if "random" in os.path.basename(model.get("weights") or "")
                      else ""))
    if not report.complete:
        out.append(f"{report.shown_state.upper()} run: {report.images} of {report.images_planned} images "
                   "evaluated; every number covers only those")
    few = [d for d in report.per_device if d["latency_ms"]["count"] and not d["latency_ms"]["p99_samples_ok"]]
    if few:
        out.append(f"p99 latency from fewer than {P99_MIN_SAMPLES} batches on {len(few)} device(s): close to the "
                   "maximum, not a tail estimate")
    return out


def ok_results(manifest: RunManifest, results: list) -> list[ShardResult]:
    """The ok results of the run's shards, one per shard id (the first). One that cannot be read
    is left out (logged): a failed run's partial report is written all the same, and names its
    shard as not evaluated."""
    ok, seen = [], set()
    for x in results:
        try:
            r = ShardResult.read(x, manifest.run_id)
        except MessageError as e:
            log.warning("run %s: a shard result left out: %s", manifest.run_id, e)
            continue
        if r is not None and r.ok and r.shard_id not in seen:
            seen.add(r.shard_id)
            ok.append(r)
    return ok


def merge_partial(manifest: RunManifest, results: list, reason: str, *, state: str = str(RunState.FAILED),
                  failures: dict[str, dict] | None = None) -> tuple[Report, dict]:
    """What a failed or cancelled run did finish: the report over its ok shards, marked
    incomplete, naming every shard it lacks with why (``failures``: shard id -> {reason,
    worker, attempts}; a shard not named there never finished). A run without any finished
    shard gets a report of 0 images all the same: it says what failed."""
    ok = ok_results(manifest, results)
    seen = {r.shard_id for r in ok}
    report, pred = merge(manifest.only(seen), ok)
    report = replace(report, partial=True, complete=False, state=state, error=reason, failure=reason,
                     images_planned=manifest.images_planned, shards=len(manifest.shards), shards_ok=len(ok),
                     shards_failed=tuple(missing_shards(manifest, seen, failures or {}, state)),
                     shards_not_ok=tuple(sid for sid in manifest.shard_ids if sid not in seen))
    return replace(report, warnings=tuple(warnings_of(report))), pred


def missing_shards(manifest: RunManifest, ok: set[str], failures: dict[str, dict], state: str) -> list[dict]:
    """The shards without a kept result: id, images, why, the worker of its last attempt and
    how many attempts it had."""
    default = "cancelled before it finished" if state == RunState.CANCELLED else "no result (lost, or never ran)"
    return [{"shard_id": s.shard_id, "images": s.images,
             "reason": (failures.get(s.shard_id) or {}).get("reason") or default,
             "worker": (failures.get(s.shard_id) or {}).get("worker"),
             "attempts": (failures.get(s.shard_id) or {}).get("attempts", 0)}
            for s in manifest.shards if s.shard_id not in ok]
