"""Sweep reports: the rows of a batch-size sweep as JSON, CSV, Markdown, a self-contained HTML
page and two PNG plots (throughput, and latency with its p50-p99 band, against batch size)."""
from __future__ import annotations

import csv
import io
import json
import os

from ..files import atomic_write, write_json
from ..tables import table


def render_markdown(rows: list[dict]) -> str:
    eval_mode = any(r.get("mode") == "eval" for r in rows)
    head = ["device", "worker", "batch size", "iterations", "throughput (img/s)", "latency min / median / p99 (ms)",
            "peak MiB"] + (["top-1 %", "top-5 %"] if eval_mode else [])
    lines = []
    for r in sorted(rows, key=lambda r: (r.get("device_name") or "", r["worker"], r["batch_size"])):
        if r.get("error"):
            cells = [r.get("device_name") or r.get("device", "?"), r["worker"], str(r["batch_size"]),
                     "", f"error: {r['error']}", "", ""] + (["", ""] if eval_mode else [])
        else:
            cells = [r.get("device_name") or r["device"], r["worker"], str(r["batch_size"]),
                     f"{r.get('iters', '?')}{'' if r.get('stable', True) else ' (not stable)'}",
                     f"{r['img_s']:.2f}", f"{r['min_ms']:.2f} / {r['median_ms']:.2f} / {r['p99_ms']:.2f}"
                     + ("" if r.get("p99_samples_ok", True) else "*"),
                     "-" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"]
            if eval_mode:
                cells += ["-" if r.get("top1") is None else f"{r['top1']:.2f}",
                          "-" if r.get("top5") is None else f"{r['top5']:.2f}"]
        lines.append(cells)
    note = ("\n\\* p99 of fewer than 100 batches: close to the maximum, not a tail estimate.\n"
            if any(not r.get("p99_samples_ok", True) for r in rows if not r.get("error")) else "")
    return table(lines, head, markdown=True) + "\n" + note


def _title(what: str, rows: list[dict]) -> str:
    """"throughput vs batch size: large, torch fp32, on NVIDIA H100 ..." from the rows."""
    def one(key):
        vals = sorted({str(r.get(key)) for r in rows if r.get(key) is not None})
        return "/".join(vals) if vals else "?"

    devices = sorted({r.get("device_name") or r.get("device", "?") for r in rows})
    return (f"{what}: NASNet-A {one('model')}, {one('backend')} {one('precision')}, "
            f"{', '.join(devices[:3])}{' ...' if len(devices) > 3 else ''}")


def _plots(rows: list[dict], folder: str) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator, ScalarFormatter

    ok = [r for r in rows if not r.get("error")]
    sizes = sorted({r["batch_size"] for r in rows})
    files = {}
    for name in ("throughput_vs_batch.png", "latency_vs_batch.png"):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for w in sorted({r["worker"] for r in ok}):
            mine = sorted((r for r in ok if r["worker"] == w), key=lambda r: r["batch_size"])
            xs = [r["batch_size"] for r in mine]
            label = f"{mine[0].get('device_name') or mine[0]['device']} ({w})"
            if name.startswith("latency"):
                line, = ax.plot(xs, [r["median_ms"] for r in mine], marker="o", label=f"{label}: p50")
                if all("p90_ms" in r for r in mine):
                    ax.fill_between(xs, [r["median_ms"] for r in mine], [r["p99_ms"] for r in mine],
                                    color=line.get_color(), alpha=0.15, label=f"{label}: p50 to p99")
                    ax.plot(xs, [r["p90_ms"] for r in mine], ls="--", lw=1, color=line.get_color(), label=f"{label}: p90")
            else:
                ax.plot(xs, [r["img_s"] for r in mine], marker="o", label=label)
        for r in rows:
            if r.get("error"):
                ax.axvline(r["batch_size"], color="red", alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)  # the batch sizes themselves, not 2^k
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s" if name.startswith("throughput") else "compute time per batch (ms)")
        ax.set_title(_title("throughput vs batch size" if name.startswith("throughput") else "latency vs batch size",
                            rows) + (" (red: error rows)" if any(r.get("error") for r in rows) else ""), fontsize=9)
        ax.grid(alpha=0.3)
        if ok:
            ax.legend(fontsize=7)
        fig.tight_layout()
        files[name.split("_")[0]] = os.path.join(folder, name)
        atomic_write(files[name.split("_")[0]], lambda f: fig.savefig(f, dpi=110, format="png"))
        plt.close(fig)
    return files


CSV_COLUMNS = ["sweep_id", "point_id", "timestamp", "host", "device_name", "device", "worker", "batch_size", "mode",
               "iters", "stable", "windows", "img_s", "min_ms", "mean_ms", "median_ms", "p90_ms", "p95_ms", "p99_ms",
               "max_ms", "p99_samples_ok", "peak_mib", "top1", "top5", "images", "error", "model", "backend",
               "versions", "precision", "model_sha256", "dataset", "dataset_fingerprint"]


def render_html(rows: list[dict], plots: list[str], sweep_id: str) -> str:
    from .html import page, png_tag

    body = [(f"Points ({len(rows)})", table([[r.get(c) if c != "versions" else "" for c in CSV_COLUMNS[4:22]]
                                               for r in sorted(rows, key=lambda r: (r["worker"], r["batch_size"]))],
                                              CSV_COLUMNS[4:22], fmt="html")),
            ("Plots", "".join(png_tag(p) for p in plots))]
    return page(f"nasq sweep {sweep_id}: {_title('batch-size sweep', rows) if rows else ''}", body)


def write_report(rows: list[dict], folder: str) -> dict:
    os.makedirs(folder, exist_ok=True)
    files = {"json": os.path.join(folder, "sweep.json"), "csv": os.path.join(folder, "sweep.csv"),
             "markdown": os.path.join(folder, "sweep.md"), "html": os.path.join(folder, "sweep.html")}
    write_json(rows, files["json"])
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "versions": json.dumps(r.get("versions", {}))})
    atomic_write(files["csv"], out.getvalue())
    atomic_write(files["markdown"], render_markdown(rows))
    files.update(_plots(rows, folder))
    sid = rows[0].get("sweep_id", os.path.basename(folder)) if rows else os.path.basename(folder)
    atomic_write(files["html"], render_html(rows, [files["throughput"], files["latency"]], sid))
    return files


def sweeps_table(sweeps: list[dict]) -> str:
    """The recorded sweeps (``api.list_sweeps``) as a table."""
    import time

    return table([[s["sweep_id"], time.strftime("%Y-%m-%d %H:%M", time.localtime(s["created"])), s["state"],
                   f"{s['done']}/{s['points']}", s["errors"], s["mode"], f"{s['backend']} {s['precision']}",
                   ",".join(map(str, s["batch_sizes"] or [])), ", ".join(s["devices"] or [])] for s in sweeps],
                 ["sweep", "created", "state", "points", "errors", "mode", "backend", "batch sizes", "devices"])
