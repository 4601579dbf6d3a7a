"""Sweep reports: the rows of a batch-size sweep as JSON, CSV, Markdown and two PNG plots."""
from __future__ import annotations

import csv
import io
import json
import os

from ..files import atomic_write, write_json
from ..tables import table


def render_markdown(rows: list[dict]) -> str:
    eval_mode = any(r.get("mode") == "eval" for r in rows)
    head = ["device", "worker", "batch size", "dataset", "throughput (img/s)", "latency min / median / p99 (ms)",
            "peak MiB"] + (["top-1 %", "top-5 %"] if eval_mode else [])
    lines = []
    for r in sorted(rows, key=lambda r: (r.get("device_name") or "", r["worker"], r["batch_size"])):
        if r.get("error"):
            cells = [r.get("device_name") or r.get("device", "?"), r["worker"], str(r["batch_size"]),
                     r.get("dataset", ""), f"error: {r['error']}", "", ""] + (["", ""] if eval_mode else [])
        else:
            cells = [r.get("device_name") or r["device"], r["worker"], str(r["batch_size"]), r.get("dataset", ""),
                     f"{r['img_s']:.2f}", f"{r['min_ms']:.2f} / {r['median_ms']:.2f} / {r['p99_ms']:.2f}",
                     "-" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"]
            if eval_mode:
                cells += ["-" if r.get("top1") is None else f"{r['top1']:.2f}",
                          "-" if r.get("top5") is None else f"{r['top5']:.2f}"]
        lines.append(cells)
    return table(lines, head, markdown=True) + "\n"


def _plots(rows: list[dict], folder: str) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.get("error")]
    files = {}
    for name, ylabel, fn in (("throughput_vs_batch.png", "images / s", lambda r: r["img_s"]),
                             ("latency_vs_batch.png", "latency per batch (ms): median, bar to p99",
                              lambda r: r["median_ms"])):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for w in sorted({r["worker"] for r in ok}):
            mine = sorted((r for r in ok if r["worker"] == w), key=lambda r: r["batch_size"])
            xs, ys = [r["batch_size"] for r in mine], [fn(r) for r in mine]
            label = f"{w} ({mine[0].get('device_name') or mine[0]['device']})"
            if name.startswith("latency"):
                err = [[0] * len(mine), [r["p99_ms"] - r["median_ms"] for r in mine]]
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
            else:
                ax.plot(xs, ys, marker="o", label=label)
        for r in rows:
            if r.get("error"):
                ax.axvline(r["batch_size"], color="red", alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.set_title(("throughput" if name.startswith("throughput") else "latency") + " vs batch size"
                     + (" (red: error rows)" if any(r.get("error") for r in rows) else ""))
        ax.grid(alpha=0.3)
        if ok:
            ax.legend(fontsize=8)
        fig.tight_layout()
        files[name.split("_")[0]] = os.path.join(folder, name)
        atomic_write(files[name.split("_")[0]], lambda f: fig.savefig(f, dpi=110, format="png"))
        plt.close(fig)
    return files


def write_report(rows: list[dict], folder: str) -> dict:
    os.makedirs(folder, exist_ok=True)
    files = {"json": os.path.join(folder, "sweep.json"), "csv": os.path.join(folder, "sweep.csv"),
             "markdown": os.path.join(folder, "sweep.md")}
    write_json(rows, files["json"])
    cols = ["device_name", "device", "worker", "batch_size", "mode", "dataset", "img_s", "min_ms", "mean_ms",
            "median_ms", "p99_ms", "peak_mib", "top1", "top5", "images", "error", "backend", "versions", "precision",
            "model_sha256", "dataset_fingerprint"]
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "versions": json.dumps(r.get("versions", {}))})
    atomic_write(files["csv"], out.getvalue())
    atomic_write(files["markdown"], render_markdown(rows))
    files.update(_plots(rows, folder))
    return files
