"""Merge shard results into a run report, and show it.

The chord on the Redis result backend can hand the merge a shard twice (a redelivered
shard whose result differs by a byte is counted again) and, when that happens before the
last real shard lands, without one. So the merge checks itself: exactly one result per
shard id of the manifest, every shard present and ``ok``, every image accounted for.
"""
from __future__ import annotations

import json
import time

from .errors import RunError

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
                                     "last_finish": t["finished_at"]})
        d["shards"] += 1
        d["images"] += len(r["indices"])
        d["compute_s"] += t["compute_s"]
        d["data_s"] += t["data_s"]
        d["wall_s"] += t["wall_s"]
        d["first_start"] = min(d["first_start"], t["started_at"])
        d["last_finish"] = max(d["last_finish"], t["finished_at"])
    per_device = []
    for d in devices.values():
        d["img_s_compute"] = round(d["images"] / d["compute_s"], 3) if d["compute_s"] else None
        d["img_s_wall"] = round(d["images"] / d["wall_s"], 3) if d["wall_s"] else None
        for k in ("compute_s", "data_s", "wall_s"):
            d[k] = round(d[k], 3)
        per_device.append(d)
    per_device.sort(key=lambda d: (d["worker"], d["device"]))
    start = min(r["timing"]["started_at"] for r in shards.values())
    end = max(r["timing"]["finished_at"] for r in shards.values())
    n = len(pred["indices"])
    first = next(iter(shards.values()))
    report = {
        "run_id": manifest["run_id"],
        "created": manifest.get("created"),
        "finished": time.time(),
        "images": n,
        "images_total": manifest["dataset"]["images"],
        **accuracy(pred["labels"], pred["top5"]),
        "throughput_img_s": round(n / (end - start), 3) if end > start else None,
        "wall_s": round(end - start, 3),
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


def merge_partial(manifest: dict, results: list, reason: str) -> tuple[dict, dict] | None:
    """What a failed run did finish: the report over its ok shards, marked partial."""
    ok, seen = [], set()
    for r in results:
        if isinstance(r, dict) and r.get("run_id") == manifest["run_id"] and r.get("status") == "ok" \
                and r["shard_id"] not in seen:
            seen.add(r["shard_id"])
            ok.append(r)
    if not ok:
        return None
    sub = {**manifest, "shards": [s for s in manifest["shards"] if s["shard_id"] in seen]}
    report, pred = merge(sub, ok)
    report.update(partial=True, failure=reason, shards=len(manifest["shards"]),
                  shards_ok=len(ok), shards_not_ok=[s["shard_id"] for s in manifest["shards"] if s["shard_id"] not in seen])
    return report, pred


def render(report: dict) -> str:
    """The report as a readable table."""
    def pct(v):
        return "   n/a" if v is None else f"{v:6.2f}%"

    lines = [f"nasq run {report['run_id']}" + ("  PARTIAL: " + report["failure"] if report.get("partial") else ""),
             f"  model    {report['model'].get('arch', '?')} ({report.get('num_outputs')} outputs)  "
             f"backend {report['backend']['name']}  batch {report['batch_size']}  precision {report.get('precision')}",
             f"  dataset  {report['dataset']['root']} ({report['dataset']['kind']}, fingerprint {report['dataset']['fingerprint']})",
             f"  images   {report['images']} evaluated of {report['images_total']}, {report['error_count']} excluded",
             "  accuracy " + "  ".join(f"top-{k} {pct(report.get(f'top{k}'))}" for k in (1, 5)),
             f"  speed    {report['throughput_img_s']} img/s aggregate over {report['wall_s']} s, {report['shards']} shards", ""]
    head = f"  {'worker':<28} {'device':<10} {'shards':>6} {'images':>7} {'compute img/s':>14} {'wall img/s':>11}"
    lines += [head, "  " + "-" * (len(head) - 2)]
    for d in report["per_device"]:
        lines.append(f"  {d['worker'][:28]:<28} {d['device']:<10} {d['shards']:>6} {d['images']:>7} "
                     f"{d['img_s_compute'] or 0:>14.2f} {d['img_s_wall'] or 0:>11.2f}")
    if report["errors"]:
        lines += ["", f"  excluded images ({report['error_count']}):"]
        lines += [f"    {e['name']}: {e['reason']}" for e in report["errors"][:20]]
        if report["error_count"] > 20:
            lines.append(f"    ... {report['error_count'] - 20} more in the JSON report")
    if report.get("duplicate_shard_results_dropped"):
        lines.append(f"  duplicate shard results dropped: {', '.join(report['duplicate_shard_results_dropped'])}")
    return "\n".join(lines)


def write_json(report: dict, path: str) -> None:
    import os

    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, path)


def render_markdown(report: dict) -> str:
    """The report as Markdown (headline, per-device table, excluded images)."""
    def pct(v):
        return "n/a" if v is None else f"{v:.2f} %"

    m = report.get("model", {})
    lines = [f"# nasq run {report['run_id']}", "",
             "| | |", "|---|---|",
             f"| model | {m.get('arch', '?')}, {report.get('num_outputs')} outputs, sha256 {str(m.get('sha256', m.get('artifact_key', '?')))[:16]} |",
             f"| backend | {report['backend']['name']} {report['backend'].get('versions', {})} |",
             f"| batch size / precision | {report['batch_size']} / {report.get('precision')} |",
             f"| dataset | {report['dataset']['root']} ({report['dataset']['kind']}, {report['images_total']} images, "
             f"fingerprint {report['dataset']['fingerprint']}) |",
             f"| images evaluated | {report['images']} ({report['error_count']} excluded) |"]
    lines += [f"| top-{k} | {pct(report.get(f'top{k}'))} |" for k in range(1, 6)]
    lines += [f"| throughput | {report['throughput_img_s']} img/s over {report['wall_s']} s |", "",
              "| worker | device | shards | images | compute img/s | wall img/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {d['worker']} | {d['device']} ({d.get('device_name') or ''}) | {d['shards']} | {d['images']} | "
              f"{d['img_s_compute']} | {d['img_s_wall']} |" for d in report["per_device"]]
    if report["errors"]:
        lines += ["", "## Excluded images", ""] + [f"- `{e['name']}`: {e['reason']}" for e in report["errors"]]
    return "\n".join(lines) + "\n"


def plot_throughput_over_time(report: dict, shards: list[dict], path: str) -> None:
    """Per-device throughput over the run: images done (cumulative) against seconds since start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min(s["started_at"] for s in shards)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key in sorted({(s["worker"], s["device"]) for s in shards}):
        mine = sorted((s for s in shards if (s["worker"], s["device"]) == key), key=lambda s: s["finished_at"])
        xs, ys, total = [], [], 0
        for s in mine:
            xs += [s["started_at"] - t0, s["finished_at"] - t0]
            ys += [total, total + s["images"]]
            total += s["images"]
        ax.plot(xs, ys, marker=".", label=f"{key[0]} ({key[1]})")
    ax.set_xlabel("seconds since the first shard started")
    ax.set_ylabel("images done")
    ax.set_title(f"run {report['run_id']}: per-device progress (slope = img/s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_run_files(report: dict, shards: list[dict], folder: str) -> dict:
    """report.json, report.md and throughput.png for one run; returns their paths."""
    import os

    os.makedirs(folder, exist_ok=True)
    files = {"json": os.path.join(folder, "report.json"), "markdown": os.path.join(folder, "report.md"),
             "plot": os.path.join(folder, "throughput.png")}
    write_json({**report, "files": files}, files["json"])
    with open(files["markdown"], "w", encoding="utf-8") as f:
        f.write(render_markdown(report))
    if shards:
        plot_throughput_over_time(report, shards, files["plot"])
    return files
