"""Run reports: a table for the terminal, Markdown, JSON and a progress plot on disk."""
from __future__ import annotations

import os

from ..files import atomic_write, write_json
from ..tables import table


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
    lines.append(table([[d["worker"], d["device"], d["shards"], d["images"], f"{d['img_s_compute'] or 0:.2f}",
                         f"{d['img_s_wall'] or 0:.2f}"] for d in report["per_device"]],
                       ["worker", "device", "shards", "images", "compute img/s", "wall img/s"], indent="  "))
    if report["errors"]:
        lines += ["", f"  excluded images ({report['error_count']}):"]
        lines += [f"    {e['name']}: {e['reason']}" for e in report["errors"][:20]]
        if report["error_count"] > 20:
            lines.append(f"    ... {report['error_count'] - 20} more in the JSON report")
    if report.get("duplicate_shard_results_dropped"):
        lines.append(f"  duplicate shard results dropped: {', '.join(report['duplicate_shard_results_dropped'])}")
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    """The report as Markdown (headline, per-device table, excluded images)."""
    def pct(v):
        return "n/a" if v is None else f"{v:.2f} %"

    m = report.get("model", {})
    facts = [["model", f"{m.get('arch', '?')}, {report.get('num_outputs')} outputs, "
                       f"sha256 {str(m.get('sha256', m.get('artifact_key', '?')))[:16]}"],
             ["backend", f"{report['backend']['name']} {report['backend'].get('versions', {})}"],
             ["batch size / precision", f"{report['batch_size']} / {report.get('precision')}"],
             ["dataset", f"{report['dataset']['root']} ({report['dataset']['kind']}, {report['images_total']} images, "
                         f"fingerprint {report['dataset']['fingerprint']})"],
             ["images evaluated", f"{report['images']} ({report['error_count']} excluded)"]]
    facts += [[f"top-{k}", pct(report.get(f"top{k}"))] for k in range(1, 6)]
    facts.append(["throughput", f"{report['throughput_img_s']} img/s over {report['wall_s']} s"])
    lines = [f"# nasq run {report['run_id']}", "", table(facts, ["", ""], markdown=True), "",
             table([[d["worker"], f"{d['device']} ({d.get('device_name') or ''})", d["shards"], d["images"],
                     d["img_s_compute"], d["img_s_wall"]] for d in report["per_device"]],
                   ["worker", "device", "shards", "images", "compute img/s", "wall img/s"], markdown=True)]
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
    if len({(s["worker"], s["device"]) for s in shards}) <= 16:  # a fleet's legend would hide the plot
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)


def write_run_files(report: dict, shards: list[dict], folder: str) -> dict:
    """report.json, report.md and throughput.png for one run; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    files = {"json": os.path.join(folder, "report.json"), "markdown": os.path.join(folder, "report.md"),
             "plot": os.path.join(folder, "throughput.png")}
    write_json({**report, "files": files}, files["json"])
    atomic_write(files["markdown"], render_markdown(report))
    if shards:
        plot_throughput_over_time(report, shards, files["plot"])
    return files
