"""Run reports: a table for the terminal; on disk JSON, Markdown, a self-contained HTML page,
an ais_bench-style summary, a timm-style results row, plots and the per-image predictions."""
from __future__ import annotations

import csv
import io
import json
import os

from ..files import atomic_write, write_json
from ..tables import table
from .html import page, png_tag


def device_cell(d: dict) -> str:
    """How a device reads in a table: the device's own name (``NVIDIA H100 80GB HBM3``,
    ``cpu, 1 thread``), else the device as asked."""
    return d.get("device_name") or d["device"]


def versions_text(versions: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted((versions or {}).items())) or "?"


def ais_bench_summary(report: dict) -> str:
    """Per device, the lines ais_bench prints (compute time per batch, without host-device
    copies; throughput = 1000 * mean batch size / mean compute time), so numbers compare."""
    out = []
    for d in report["per_device"]:
        lat = d.get("latency_ms") or {}
        if not lat.get("count"):
            continue
        bs = d["images"] / lat["count"]
        out += [f"[INFO] ----------------- Performance Summary: {d['worker']} ({device_cell(d)}) ------------------",
                f"[INFO] NPU_compute_time (ms): min = {lat['min']}, max = {lat['max']}, mean = {lat['mean']}, "
                f"median = {lat['p50']}, percentile(99%) = {lat['p99']}",
                f"[INFO] throughput 1000*batchsize.mean({bs:g})/NPU_compute_time.mean({lat['mean']}): "
                f"{d.get('img_s_ais_bench')}"]
    if out:
        out.append("[INFO] ------------------------------------------------------")
    return "\n".join(out)


TIMM_FIELDS = ("model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size", "crop_pct", "interpolation",
               "batch_size", "precision", "backend", "images", "run_id")


def timm_row(report: dict) -> dict:
    """The row timm's validate.py writes to its results CSV (param_count in millions)."""
    from ..model.spec import PREPROCESS

    def err(v):
        return None if v is None else round(100.0 - v, 3)

    m = report.get("model") or {}
    params = m.get("param_count")
    return {"model": "nasnetalarge" if m.get("arch", "large") == "large" else f"nasnet-a-{m.get('arch')}",
            "top1": report.get("top1"), "top1_err": err(report.get("top1")), "top5": report.get("top5"),
            "top5_err": err(report.get("top5")), "param_count": round(params / 1e6, 2) if params else None,
            "img_size": PREPROCESS.crop, "crop_pct": PREPROCESS.crop_pct,
            "interpolation": "bilinear", "batch_size": report.get("batch_size"), "precision": report.get("precision"),
            "backend": report["backend"]["name"], "images": report["images"], "run_id": report["run_id"]}


def latency_rows(report: dict) -> list[list]:
    rows = []
    for d in report["per_device"]:
        lat = d.get("latency_ms") or {}
        rows.append([d["worker"], device_cell(d), report.get("batch_size"), lat.get("count"), lat.get("p50"),
                     lat.get("p90"), lat.get("p95"), lat.get("p99"), lat.get("max"), d.get("img_s_ais_bench"),
                     d.get("model_load_s")])
    return rows


LATENCY_HEADERS = ["worker", "device", "batch", "batches", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "max ms",
                   "compute img/s", "model load s"]


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
             f"  speed    {_speed(report)}, {report['shards']} shards", ""]
    lines.append(table([[d["worker"], device_cell(d), d["shards"], d["images"], f"{d['img_s_compute'] or 0:.2f}",
                         f"{d['img_s_wall'] or 0:.2f}"] + _lat_cells(d) for d in report["per_device"]],
                       ["worker", "device", "shards", "images", "compute img/s", "wall img/s", "p50 ms", "p99 ms"],
                       indent="  "))
    if report["errors"]:
        lines += ["", f"  excluded images ({report['error_count']}):"]
        lines += [f"    {e['name']}: {e['reason']}" for e in report["errors"][:20]]
        if report["error_count"] > 20:
            lines.append(f"    ... {report['error_count'] - 20} more in the JSON report")
    if report.get("duplicate_shard_results_dropped"):
        lines.append(f"  duplicate shard results dropped: {', '.join(report['duplicate_shard_results_dropped'])}")
    return "\n".join(lines)


def _speed(report: dict) -> str:
    t = report.get("throughput") or {}
    parts = [(True, f"{report['throughput_img_s']} img/s over the shards' span ({report['wall_s']} s)"),
             (t.get("end_to_end_img_s"), f"{t.get('end_to_end_img_s')} img/s end to end ({t.get('end_to_end_s')} s "
                                         "from submission)"),
             (t.get("compute_img_s"), f"{t.get('compute_img_s')} img/s compute only")]
    return "; ".join(text for shown, text in parts if shown)


def _lat_cells(d: dict) -> list:
    lat = d.get("latency_ms") or {}
    return [lat.get("p50") if lat.get("p50") is not None else "-", lat.get("p99") if lat.get("p99") is not None else "-"]


def _facts(report: dict) -> list[list]:
    def pct(v):
        return "n/a" if v is None else f"{v:.2f} %"

    m = report.get("model", {})
    t = report.get("throughput") or {}
    facts = [["model", f"{m.get('arch', '?')}, {report.get('num_outputs')} outputs, "
                       f"sha256 {str(m.get('sha256', m.get('artifact_key', '?')))[:16]}"],
             ["backend", f"{report['backend']['name']} ({versions_text(report['backend'].get('versions'))})"],
             ["batch size / precision", f"{report['batch_size']} / {report.get('precision')}"
                                        + (f" (computes in {m['compute_precision']})" if m.get("compute_precision")
                                           else "")],
             ["dataset", f"{report['dataset']['root']} ({report['dataset']['kind']}, {report['images_total']} images, "
                         f"fingerprint {report['dataset']['fingerprint']})"],
             ["images evaluated", f"{report['images']} ({report['error_count']} excluded)"]]
    facts += [[f"top-{k}", pct(report.get(f"top{k}"))] for k in range(1, 6)]
    facts += [["throughput, shards' span", f"{report['throughput_img_s']} img/s over {report['wall_s']} s "
                                           "(first shard start to last shard end)"],
              ["throughput, end to end", f"{t.get('end_to_end_img_s')} img/s over {t.get('end_to_end_s')} s "
                                         "(submission to report)"],
              ["throughput, compute only", f"{t.get('compute_img_s')} img/s (sum over devices of ais_bench's "
                                           "1000 * batch / mean compute ms; compute timed by "
                                           f"{_clock(report)})"],
              ["model load", f"{report.get('model_load_s')} s (slowest device)"]]
    return facts


def _clock(report: dict) -> str:
    clocks = {d.get("compute_clock", "host") for d in report.get("per_device") or []}
    if clocks == {"device"}:
        return "the device's own execution time (ais_bench exec_time_list)"
    return "the host around each batch" if clocks <= {"host"} else "the device where it reports one, else the host"


def render_markdown(report: dict) -> str:
    """The report as Markdown (headline, per-device table, excluded images)."""
    lines = [f"# nasq run {report['run_id']}", "", table(_facts(report), ["", ""], markdown=True), "",
             table([[d["worker"], device_cell(d), d["shards"], d["images"], d["img_s_compute"], d["img_s_wall"]]
                    for d in report["per_device"]],
                   ["worker", "device", "shards", "images", "compute img/s", "wall img/s"], markdown=True), "",
             "## Latency per batch (compute only)", "", table(latency_rows(report), LATENCY_HEADERS, markdown=True)]
    summary = ais_bench_summary(report)
    if summary:
        lines += ["", "## ais_bench-style summary", "", "```", summary, "```"]
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


def plot_devices(report: dict, path: str) -> None:
    """A bar per device: compute-only and wall img/s side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    devs = report["per_device"]
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * max(3, len(devs))))
    y = np.arange(len(devs))
    ax.barh(y - 0.2, [d.get("img_s_ais_bench") or d.get("img_s_compute") or 0 for d in devs], 0.4,
            label="compute only (ais_bench)")
    ax.barh(y + 0.2, [d.get("img_s_wall") or 0 for d in devs], 0.4, label="wall (decode + compute)")
    ax.set_yticks(y, [f"{d['worker']}\n{device_cell(d)}" for d in devs], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("images / s")
    ax.set_title(f"run {report['run_id']}: throughput per device (batch {report['batch_size']}, "
                 f"{report['backend']['name']}, {report.get('precision')})", fontsize=9)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)


def render_html(report: dict, plots: list[str]) -> str:
    """The run as one self-contained HTML page (tables, the ais_bench block, plots inlined)."""
    def esc_table(rows, headers):
        return table(rows, headers, fmt="html")

    sections = [("Run", esc_table(_facts(report), ["what", "value"])),
                ("Devices", esc_table([[d["worker"], device_cell(d), d["shards"], d["images"], d["img_s_compute"],
                                        d["img_s_wall"], d.get("img_s_ais_bench")] for d in report["per_device"]],
                                      ["worker", "device", "shards", "images", "compute img/s", "wall img/s",
                                       "ais_bench img/s"])),
                ("Latency per batch (compute only)", esc_table(latency_rows(report), LATENCY_HEADERS))]
    sections += [("Plots", "".join(png_tag(p) for p in plots if os.path.isfile(p)))]
    summary = ais_bench_summary(report)
    if summary:
        sections.append(("ais_bench-style summary", "<pre>" + _escape(summary) + "</pre>"))
    sections.append(("timm-style results row", esc_table([list(timm_row(report).values())], list(TIMM_FIELDS))))
    if report["errors"]:
        sections.append((f"Excluded images ({report['error_count']})",
                         esc_table([[e["name"], e["reason"]] for e in report["errors"][:500]], ["image", "reason"])))
    title = f"nasq run {report['run_id']}" + (" (PARTIAL)" if report.get("partial") else "")
    return page(title, sections)


def _escape(text: str) -> str:
    import html

    return html.escape(text)


RUN_FILES = (("json", "report.json"), ("markdown", "report.md"), ("html", "report.html"), ("csv", "results.csv"),
             ("ais_bench", "ais_bench.txt"), ("plot", "throughput.png"), ("devices", "devices.png"),
             ("predictions", "predictions.json"))


def write_run_files(report: dict, shards: list[dict], folder: str, predictions: dict | None = None, *,
                    final_folder: str | None = None) -> None:
    """report.json, report.md, report.html, results.csv (timm's columns), ais_bench.txt,
    throughput.png, devices.png and predictions.json for one run, written into ``folder`` and
    named as they will be in ``final_folder`` (where the caller moves them; default ``folder``).

    A file that cannot be written (a full disk, a read-only folder) is skipped and named with
    its reason: sets ``report["files"]`` (kind -> final path of each file written) and
    ``report["files_not_written"]`` (file name -> reason) before report.json, written last, so
    that report.json holds exactly the report the caller keeps."""
    final_folder = final_folder or folder
    written, failed = {}, {}

    def attempt(kind: str, name: str, write) -> None:
        try:
            write(os.path.join(folder, name))
            written[kind] = os.path.join(final_folder, name)
        except (OSError, ValueError) as e:  # ValueError: matplotlib on a file it could not finish
            failed[name] = f"{type(e).__name__}: {getattr(e, 'strerror', None) or e}"

    names = dict(RUN_FILES)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        failed.update({name: f"{type(e).__name__}: {e.strerror or e}" for _, name in RUN_FILES})
    else:
        if shards:
            attempt("plot", names["plot"], lambda p: plot_throughput_over_time(report, shards, p))
        if report["per_device"]:
            attempt("devices", names["devices"], lambda p: plot_devices(report, p))

        def csv_row(path: str) -> None:
            out = io.StringIO()
            w = csv.DictWriter(out, fieldnames=TIMM_FIELDS)
            w.writeheader()
            w.writerow(timm_row(report))
            atomic_write(path, out.getvalue())

        attempt("csv", names["csv"], csv_row)
        attempt("ais_bench", names["ais_bench"], lambda p: atomic_write(p, ais_bench_summary(report) + "\n"))
        if predictions is not None:
            attempt("predictions", names["predictions"],
                    lambda p: atomic_write(p, json.dumps(predictions, separators=(",", ":"))))
        attempt("markdown", names["markdown"], lambda p: atomic_write(p, render_markdown(report)))
        plots = [os.path.join(folder, names[k]) for k in ("plot", "devices") if k in written]
        attempt("html", names["html"], lambda p: atomic_write(p, render_html(report, plots)))
    report["files"] = {**written, "json": os.path.join(final_folder, names["json"])}
    report["files_not_written"] = failed
    if failed.keys() == {n for _, n in RUN_FILES}:  # nothing could be written: not even report.json will be
        del report["files"]["json"]
        return
    try:
        write_json(report, os.path.join(folder, names["json"]))
    except OSError as e:
        del report["files"]["json"]
        failed[names["json"]] = f"{type(e).__name__}: {e.strerror or e}"
