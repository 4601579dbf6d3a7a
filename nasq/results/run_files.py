"""The files of a run's report: report.json, report.md, report.html, results.csv,
ais_bench.txt, predictions.json and the two plots (throughput.png, devices.png), written with
each failure named; the plots and the HTML page can come after the rest (``write_later_files``)."""
from __future__ import annotations

import csv
import io
import json
import os
import textwrap
from dataclasses import replace

from ..files import atomic_write, write_json
from ..rundata import Report
from .report import TIMM_FIELDS, ais_bench_summary, device_id, render_html, render_markdown, timm_row


RUN_FILES = (("json", "report.json"), ("markdown", "report.md"), ("html", "report.html"), ("csv", "results.csv"),
             ("ais_bench", "ais_bench.txt"), ("plot", "throughput.png"), ("devices", "devices.png"),
             ("predictions", "predictions.json"))


#: the files a done run's merging worker renders after the run is marked done (``write_later_files``)
LATER = ("plot", "devices", "html")


def write_run_files(report: Report, shards: list[dict], folder: str, predictions: dict | None = None, *,
                    final_folder: str | None = None, later: bool = False) -> Report:
    """report.json, report.md, report.html, results.csv (timm's columns), ais_bench.txt,
    throughput.png, devices.png and predictions.json for one run, written into ``folder`` and
    named as they will be in ``final_folder`` (where the caller moves them; default ``folder``).

    A file that cannot be written (a full disk, a read-only folder) is skipped and named with
    its reason. Returns the report with ``files`` (kind -> final path of each file written) and
    ``files_not_written`` (file name -> reason), set before report.json, written last, so that
    report.json holds exactly the report the caller keeps.

    ``later``: the plots and the HTML page (``LATER``) are left to ``write_later_files``, once
    the numbers are stored; ``files`` names them already and ``files_to_come`` lists their kinds
    (which could not be written is in the run's ``rendered`` record)."""
    final_folder = final_folder or folder
    attempt = _Attempts(folder, final_folder)
    written, failed = attempt.written, attempt.failed
    names = dict(RUN_FILES)
    to_come = None
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        failed.update({name: f"{type(e).__name__}: {e.strerror or e}" for _, name in RUN_FILES})
    else:
        if not later:
            _plots(report, shards, folder, attempt)

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
        if later:
            to_come = tuple(_later_kinds(report, shards))
            written.update({kind: os.path.join(final_folder, names[kind]) for kind in to_come})
        else:
            plots = [os.path.join(folder, names[k]) for k in ("plot", "devices") if k in written]
            attempt("html", names["html"], lambda p: atomic_write(p, render_html(report, plots)))
    if failed.keys() == {n for _, n in RUN_FILES}:  # nothing could be written: not even report.json will be
        return replace(report, files=dict(written), files_not_written=failed, files_to_come=to_come)
    with_json = replace(report, files={**written, "json": os.path.join(final_folder, names["json"])},
                        files_not_written=failed, files_to_come=to_come)
    try:
        write_json(with_json.to_payload(), os.path.join(folder, names["json"]))
    except OSError as e:
        return replace(report, files=dict(written), files_to_come=to_come,
                       files_not_written={**failed, names["json"]: f"{type(e).__name__}: {e.strerror or e}"})
    return with_json


def write_later_files(report: Report, shards: list[dict], folder: str) -> dict[str, str]:
    """The plots and the HTML page of ``report`` (its ``files_to_come``), rendered into
    ``folder``, where the rest of its files already are. Returns file name -> reason for each
    one that could not be written."""
    attempt, names = _Attempts(folder, folder), dict(RUN_FILES)
    _plots(report, shards, folder, attempt)
    plots = [os.path.join(folder, names[k]) for k in ("plot", "devices") if k in attempt.written]
    attempt("html", names["html"], lambda p: atomic_write(p, render_html(report, plots)))
    return attempt.failed


class _Attempts:
    """Write one file after another into ``folder``, each failure kept with its reason:
    ``written`` (kind -> its path in ``final_folder``), ``failed`` (file name -> reason)."""

    def __init__(self, folder: str, final_folder: str):
        self.folder, self.final_folder = folder, final_folder
        self.written: dict[str, str] = {}
        self.failed: dict[str, str] = {}

    def __call__(self, kind: str, name: str, write) -> None:
        try:
            write(os.path.join(self.folder, name))
            self.written[kind] = os.path.join(self.final_folder, name)
        except (OSError, ValueError) as e:  # ValueError: matplotlib on a file it could not finish
            self.failed[name] = f"{type(e).__name__}: {getattr(e, 'strerror', None) or e}"
        except ImportError:  # a worker installed without nasq[worker]
            self.failed[name] = "matplotlib is not installed on the merging worker: pip install 'nasq[worker]'"


def _later_kinds(report: Report, shards: list[dict]) -> list[str]:
    wanted = {"plot": bool(shards), "devices": bool(report.per_device), "html": True}
    return [k for k in LATER if wanted[k]]


def _plots(report: Report, shards: list[dict], folder: str, attempt) -> None:
    names = dict(RUN_FILES)
    if shards:
        attempt("plot", names["plot"], lambda p: plot_throughput_over_time(report, shards, p))
    if report.per_device:
        attempt("devices", names["devices"], lambda p: plot_devices(report, p))


def plot_throughput_over_time(report: Report, shards: list[dict], path: str) -> None:
    """Per-device throughput over the run: images done (cumulative) against seconds since start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min(s["started_at"] for s in shards)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key in sorted({(s["worker"], s["device"]) for s in shards}, key=lambda k: (_label(shards, k), k)):
        mine = sorted((s for s in shards if (s["worker"], s["device"]) == key), key=lambda s: s["finished_at"])
        xs, ys, total = [], [], 0
        for s in mine:
            xs += [s["started_at"] - t0, s["finished_at"] - t0]
            ys += [total, total + s["images"]]
            total += s["images"]
        ax.plot(xs, ys, marker=".", label=_label(shards, key))
    ax.set_xlabel("seconds since the first shard started")
    ax.set_ylabel("images done")
    ax.set_title(f"run {report.run_id}: per-device progress (slope = img/s)")
    ax.grid(alpha=0.3)
    if len({(s["worker"], s["device"]) for s in shards}) <= 16:  # a fleet's legend would hide the plot
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)


def _label(shards: list[dict], key: tuple) -> str:
    """A device's short name in a legend: ``host/device`` (the worker's name when two workers
    share a device)."""
    mine = next(s for s in shards if (s["worker"], s["device"]) == key)
    same = {s["worker"] for s in shards if s.get("host") == mine.get("host") and s["device"] == mine["device"]}
    return device_id(mine) + (f" ({key[0]})" if len(same) > 1 else "")


def plot_devices(report: Report, path: str) -> None:
    """A bar per device: compute-only and wall img/s side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    devs = report.per_device
    fig, ax = plt.subplots(figsize=(8, 1.4 + 0.45 * max(3, len(devs))))
    y = np.arange(len(devs))
    ax.barh(y - 0.2, [d.get("img_s_ais_bench") or d.get("img_s_compute") or 0 for d in devs], 0.4,
            label="compute only (ais_bench)")
    ax.barh(y + 0.2, [d.get("img_s_wall") or 0 for d in devs], 0.4, label="wall (decode + compute)")
    ax.set_yticks(y, [f"{device_id(d)}\n{textwrap.shorten(d.get('device_name') or '', 40)}" for d in devs],
                  fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("images / s")
    ax.set_xlim(left=0)
    ax.set_title(f"run {report.run_id}: throughput per device (batch {report.batch_size}, "
                 f"{report.backend.name}, {report.precision})", fontsize=9, pad=22)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)
