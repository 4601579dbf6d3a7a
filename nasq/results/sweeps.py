"""Sweep reports: the rows of a batch-size sweep and what they decide (per device, the batch size
of the highest throughput, and the highest throughput whose latency at a chosen percentile is
within a budget), as JSON, CSV, Markdown, a self-contained HTML page and three PNG plots
(throughput and latency against batch size, throughput against latency)."""
from __future__ import annotations

import csv
import io
import json
import os

from ..files import atomic_write, write_json
from ..tables import num, table
from .report import device_id

#: the percentiles a latency budget may be judged at, and the row field of each
PERCENTILES = {50: "median_ms", 90: "p90_ms", 95: "p95_ms", 99: "p99_ms"}
#: batch sizes whose throughput is within this fraction of the best are named beside it: a
#: difference the measurement's noise covers (the same sweep measured again moves this much)
CLOSE = 0.02
SIM_BANNER = "SIMULATED devices: their timings are a simulator's, not measurements"


def _key(r: dict) -> tuple:
    return (r.get("host") or "", r.get("device", "?"), r["worker"])


def _label(r: dict, rows: list[dict]) -> str:
    """A device's short name: ``host/device``, with the worker when two share the device."""
    same = {x["worker"] for x in rows if (x.get("host"), x.get("device")) == (r.get("host"), r.get("device"))}
    return device_id(r) + (f" ({r['worker'].split('@')[0]})" if len(same) > 1 else "")


def decide(rows: list[dict], *, latency_budget_ms: float | None = None, percentile: int = 99) -> list[dict]:
    """Per device: the batch size with the highest throughput (and those within 2 % of it), and
    with a budget, the highest throughput whose latency at ``percentile`` is within it."""
    if percentile not in PERCENTILES:
        raise ValueError(f"percentile must be one of {sorted(PERCENTILES)}, not {percentile!r}")
    field = PERCENTILES[percentile]
    out = []
    for key in sorted({_key(r) for r in rows}):
        mine = [r for r in rows if _key(r) == key]
        ok = sorted((r for r in mine if not r.get("error") and r.get("img_s")), key=lambda r: r["batch_size"])
        d = {"device": _label(mine[0], rows), "device_name": mine[0].get("device_name"), "worker": key[2],
             "percentile": percentile, "latency_budget_ms": latency_budget_ms, "best_batch_size": None,
             "best_img_s": None, "best_latency_ms": None, "close_batch_sizes": [], "within_budget_batch_size": None,
             "within_budget_img_s": None, "within_budget_latency_ms": None, "within_budget_close": [], "note": None,
             "stable": all(r.get("stable", True) for r in ok)}
        if not ok:
            d["note"] = "no point measured without an error"
            out.append(d)
            continue
        best = max(ok, key=lambda r: r["img_s"])
        d.update(best_batch_size=best["batch_size"], best_img_s=best["img_s"], best_latency_ms=best.get(field),
                 close_batch_sizes=_close(ok, best))
        if latency_budget_ms is not None:
            within = [r for r in ok if r.get(field) is not None and r[field] <= latency_budget_ms]
            if within:
                pick = max(within, key=lambda r: r["img_s"])
                ties = _close(within, pick)
                d.update(within_budget_batch_size=pick["batch_size"], within_budget_img_s=pick["img_s"],
                         within_budget_latency_ms=pick[field], within_budget_close=ties)
                if ties:
                    d["note"] = (f"within the budget, batch size {_sizes(ties)} {'is' if len(ties) == 1 else 'are'} "
                                 f"within {CLOSE * 100:g} % of batch {pick['batch_size']} ({num(pick['img_s'])} img/s): a tie "
                                 "within the measurement's noise, either meets the budget")
            else:
                fastest = min(ok, key=lambda r: r.get(field) or float("inf"))
                d["note"] = (f"no batch size meets p{percentile} <= {num(latency_budget_ms)} ms (the lowest is "
                             f"{num(fastest.get(field))} ms at batch {fastest['batch_size']})")
        out.append(d)
    return out


def _close(rows: list[dict], top: dict) -> list[int]:
    """The batch sizes of ``rows`` (other than ``top``) within ``CLOSE`` of ``top``'s img/s."""
    return [r["batch_size"] for r in rows if r is not top and r["img_s"] >= (1 - CLOSE) * top["img_s"]]


def _sizes(sizes: list[int]) -> str:
    return ", ".join(map(str, sizes[:-1])) + (" and " if len(sizes) > 1 else "") + str(sizes[-1])


def decision_rows(decision: list[dict]) -> tuple[list[list], list[str]]:
    budget = next((d["latency_budget_ms"] for d in decision if d["latency_budget_ms"] is not None), None)
    pct = decision[0]["percentile"] if decision else 99
    headers = ["device", "hardware", "best batch size", "img/s", f"p{pct} ms", "within 2 %"]
    if budget is not None:
        headers += [f"best with p{pct} <= {num(budget)} ms", "its img/s", f"its p{pct} ms"]
    rows = []
    for d in decision:
        row = [d["device"], d.get("device_name") or "-", d["best_batch_size"] if d["best_batch_size"] else "-",
               d["best_img_s"], d["best_latency_ms"], ",".join(map(str, d["close_batch_sizes"])) or "-"]
        if budget is not None:
            row += [d["within_budget_batch_size"] or "none", d["within_budget_img_s"], d["within_budget_latency_ms"]]
        rows.append(row)
    return rows, headers


POINT_HEADERS = ["device", "worker", "batch", "iterations", "img/s", "min ms", "p50 ms", "p99 ms", "peak MiB"]


def _point_rows(rows: list[dict]) -> tuple[list[list], list[str]]:
    eval_mode = any(r.get("mode") == "eval" for r in rows)
    out = []
    for r in sorted(rows, key=lambda r: (_key(r), r["batch_size"])):
        if r.get("error"):
            cells = [_label(r, rows), r["worker"], r["batch_size"], f"error: {r['error']}", "", "", "", "", ""]
            cells += ["", ""] if eval_mode else []
        else:
            cells = [_label(r, rows), r["worker"], r["batch_size"],
                     f"{r.get('iters', '?')}{'' if r.get('stable', True) else ' (not stable)'}", r["img_s"],
                     r.get("min_ms"), r.get("median_ms"),
                     num(r.get("p99_ms")) + ("" if r.get("p99_samples_ok", True) else "*"), r.get("peak_mib")]
            cells += [r.get("top1"), r.get("top5")] if eval_mode else []
        out.append(cells)
    return out, POINT_HEADERS + (["top-1 %", "top-5 %"] if eval_mode else [])


P99_NOTE = "\\* p99 of fewer than 100 batches: close to the maximum, not a tail estimate."


def environment_rows(rows: list[dict]) -> list[list]:
    """Per host its CPU, cores, memory, OS, Python and nasq; per device its hardware,
    accelerator facts and runtime versions (from the rows the workers wrote); how to report or
    measure the sweep again."""
    from .report import versions_text

    out, seen = [], set()
    for r in rows:
        e = r.get("environment") or {}
        if e and r.get("host") not in seen:
            seen.add(r.get("host"))
            out.append([f"host {r.get('host')}", f"{e.get('cpu')}, {e.get('cpu_cores')} cores, {e.get('memory_gib')} "
                                                 f"GiB; {e.get('os')}; Python {e.get('python')}; nasq {e.get('nasq')}"])
    devices = {}
    for r in rows:
        if not r.get("error"):
            devices.setdefault(_label(r, rows), r)
    for label, r in sorted(devices.items()):
        acc = ", ".join(f"{k} {v}" for k, v in sorted((r.get("accelerator") or {}).items()) if v is not None)
        out.append([f"device {label}", "; ".join(filter(None, [r.get("device_name"), acc,
                                                              versions_text(r.get("versions"))]))])
    if rows:
        sid = rows[0].get("sweep_id")
        out.append(["again", f"`nasq sweeps --resume {sid}` reports it again (measured points are reused; remove "
                             "its points/ folder to measure them again)"])
    return out


def render_markdown(rows: list[dict], decision: list[dict] | None = None) -> str:
    """The decision per device, then every point."""
    decision = decision if decision is not None else decide(rows)
    out = [f"**{SIM_BANNER}**", ""] if any(r.get("backend") == "sim" for r in rows) else []
    if decision:
        drows, dheads = decision_rows(decision)
        out += ["Best batch size per device:", "", table(drows, dheads, markdown=True), ""]
        out += [f"- {d['device']}: {d['note']}" for d in decision if d.get("note")]
        out += [""] if any(d.get("note") for d in decision) else []
    prows, pheads = _point_rows(rows)
    out += [table(prows, pheads, markdown=True)]
    if any(not r.get("p99_samples_ok", True) for r in rows if not r.get("error")):
        out += ["", P99_NOTE]
    if rows:
        out += ["", "Environment:", "", table(environment_rows(rows), ["", ""], markdown=True)]
    return "\n".join(out) + "\n"


def _title(what: str, rows: list[dict]) -> str:
    """"throughput vs batch size: large, torch fp32, on NVIDIA H100 ..." from the rows."""
    def one(key):
        vals = sorted({str(r.get(key)) for r in rows if r.get(key) is not None})
        return "/".join(vals) if vals else "?"

    names = sorted({r.get("device_name") or r.get("device", "?") for r in rows})
    return (f"{what}: NASNet-A {one('model')}, {one('backend')} {one('precision')}, "
            f"{', '.join(names[:2])}{' ...' if len(names) > 2 else ''}")


def _plots(rows: list[dict], folder: str, decision: list[dict]) -> dict:
    """throughput_vs_batch.png, latency_vs_batch.png (p50 with its p50-p99 band) and
    pareto.png (throughput against latency at the decision's percentile), axes from zero,
    legends of short device names beside the plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator, ScalarFormatter

    ok = [r for r in rows if not r.get("error")]
    sizes = sorted({r["batch_size"] for r in rows})
    pct = decision[0]["percentile"] if decision else 99
    budget = next((d["latency_budget_ms"] for d in decision if d["latency_budget_ms"] is not None), None)
    field = PERCENTILES[pct]
    series = [sorted((r for r in ok if _key(r) == k), key=lambda r: r["batch_size"])
              for k in sorted({_key(r) for r in ok})]
    files = {}
    for kind in ("throughput", "latency", "pareto"):
        fig, ax = plt.subplots(figsize=(9, 4.8))
        for mine in series:
            label = _label(mine[0], rows)
            xs = [r["batch_size"] for r in mine]
            if kind == "latency":
                line, = ax.plot(xs, [r["median_ms"] for r in mine], marker="o", label=f"{label} p50")
                ax.fill_between(xs, [r["median_ms"] for r in mine], [r["p99_ms"] for r in mine],
                                color=line.get_color(), alpha=0.15, label=f"{label} p50 to p99")
            elif kind == "throughput":
                line, = ax.plot(xs, [r["img_s"] for r in mine], marker="o", label=label)
                best = max(mine, key=lambda r: r["img_s"])
                ax.plot([best["batch_size"]], [best["img_s"]], marker="*", ms=14, color=line.get_color())
            else:
                pts = [r for r in mine if r.get(field) is not None]
                line, = ax.plot([r[field] for r in pts], [r["img_s"] for r in pts], marker="o", label=label)
                for r in pts:
                    ax.annotate(str(r["batch_size"]), (r[field], r["img_s"]), textcoords="offset points",
                                xytext=(4, 4), fontsize=7, color=line.get_color())
        if kind != "pareto":
            for r in rows:
                if r.get("error"):
                    ax.axvline(r["batch_size"], color="red", alpha=0.2)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes)  # the batch sizes themselves, not 2^k
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xlabel("batch size")
        else:
            ax.set_xlabel(f"p{pct} compute time per batch (ms)")
            ax.set_xlim(left=0)
        if budget is not None and kind in ("latency", "pareto"):
            (ax.axhline if kind == "latency" else ax.axvline)(budget, color="black", ls=":", lw=1,
                                                              label=f"budget {num(budget)} ms")
        ax.set_ylim(bottom=0)  # from zero: a 2 % wobble must look like one
        ax.set_ylabel("compute time per batch (ms)" if kind == "latency" else "images / s")
        what = {"throughput": "throughput vs batch size (star: best)", "latency": "latency vs batch size",
                "pareto": f"throughput vs p{pct} latency (labels: batch size)"}[kind]
        ax.set_title(_title(what, rows) + (" (red: error rows)" if kind != "pareto" and any(
            r.get("error") for r in rows) else ""), fontsize=9)
        ax.grid(alpha=0.3)
        if ok:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        fig.tight_layout()
        name = {"throughput": "throughput_vs_batch.png", "latency": "latency_vs_batch.png",
                "pareto": "throughput_vs_latency.png"}[kind]
        files[kind] = os.path.join(folder, name)
        atomic_write(files[kind], lambda f: fig.savefig(f, dpi=110, format="png"))
        plt.close(fig)
    return files


CSV_COLUMNS = ["sweep_id", "point_id", "timestamp", "host", "device_name", "device", "worker", "batch_size", "mode",
               "iters", "stable", "stability_pct", "windows", "img_s", "min_ms", "mean_ms", "median_ms", "p90_ms", "p95_ms", "p99_ms",
               "max_ms", "p99_samples_ok", "peak_mib", "top1", "top5", "images", "error", "model", "backend",
               "versions", "precision", "model_sha256", "dataset", "dataset_fingerprint"]


def render_html(rows: list[dict], plots: list[str], sweep_id: str, decision: list[dict]) -> str:
    """The decision first, then the plots, then every point in a readable table."""
    from .html import page, png_tag

    drows, dheads = decision_rows(decision)
    summary = table(drows, dheads, fmt="html") + "".join(
        f"<p>{_escape(d['device'])}: {_escape(d['note'])}</p>" for d in decision if d.get("note"))
    prows, pheads = _point_rows(rows)
    points = table(prows, pheads, fmt="html")
    if any(not r.get("p99_samples_ok", True) for r in rows if not r.get("error")):
        points += f"<p>{_escape(P99_NOTE.replace(chr(92), ''))}</p>"
    banners = [SIM_BANNER] if any(r.get("backend") == "sim" for r in rows) else []
    body = [("Best batch size per device", summary), ("Plots", "".join(png_tag(p) for p in plots)),
            (f"Points ({len(rows)})", points), ("Environment", table(environment_rows(rows), ["what", "value"],
                                                                      fmt="html"))]
    return page(f"nasq sweep {sweep_id}: {_title('batch-size sweep', rows) if rows else ''}", body, banners=banners)


def _escape(text: str) -> str:
    import html

    return html.escape(str(text))


def write_report(rows: list[dict], folder: str, *, latency_budget_ms: float | None = None,
                 percentile: int = 99) -> tuple[dict, list[dict]]:
    """sweep.json ({sweep_id, decision, rows}), sweep.csv (the rows), sweep.md, sweep.html and
    the plots, in ``folder``. Returns (kind -> path, the decision)."""
    decision = decide(rows, latency_budget_ms=latency_budget_ms, percentile=percentile)
    os.makedirs(folder, exist_ok=True)
    sid = rows[0].get("sweep_id", os.path.basename(folder)) if rows else os.path.basename(folder)
    files = {"json": os.path.join(folder, "sweep.json"), "csv": os.path.join(folder, "sweep.csv"),
             "markdown": os.path.join(folder, "sweep.md"), "html": os.path.join(folder, "sweep.html")}
    write_json({"sweep_id": sid, "latency_budget_ms": latency_budget_ms, "percentile": percentile,
                "decision": decision, "rows": rows}, files["json"])
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "versions": json.dumps(r.get("versions", {}))})
    atomic_write(files["csv"], out.getvalue())
    atomic_write(files["markdown"], render_markdown(rows, decision))
    files.update(_plots(rows, folder, decision))
    atomic_write(files["html"], render_html(rows, [files["throughput"], files["latency"], files["pareto"]], sid,
                                            decision))
    return files, decision


def sweeps_table(sweeps: list[dict]) -> str:
    """The recorded sweeps (``api.list_sweeps``) as a table."""
    import time

    return table([[s["sweep_id"], time.strftime("%Y-%m-%d %H:%M", time.localtime(s["created"])), s["state"],
                   f"{s['done']}/{s['points']}", s["errors"], s["mode"], f"{s['backend']} {s['precision']}",
                   ",".join(map(str, s["batch_sizes"] or [])), ", ".join(s["devices"] or [])] for s in sweeps],
                 ["sweep", "created", "state", "points", "errors", "mode", "backend", "batch sizes", "devices"])
