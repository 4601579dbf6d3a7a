"""Run reports: a table for the terminal; on disk JSON, Markdown, a self-contained HTML page,
an ais_bench-style summary, a timm-style results row (the files and plots: ``run_files``)."""
from __future__ import annotations

import os

from ..rundata import Report
from ..tables import num, pct, table
from .html import page, png_tag


def device_id(d: dict) -> str:
    """Where a device is: ``host/device`` (``vm1/cuda:3``), from the worker's own description."""
    return f"{d['host']}/{d.get('device', '?')}" if d.get("host") else str(d.get("device", "?"))


def device_cell(d: dict) -> str:
    """How a device reads in a table: where it is and what it is (``vm1/cuda:3 NVIDIA H200``,
    ``vm2/npu:1 Ascend310P3, ais_bench static``, ``vm1/cpu OpenVINO fp32, 16 threads, 2 stream(s)``)."""
    name = d.get("device_name")
    return f"{device_id(d)} {name}" if name else device_id(d)


def devices_summary(per_device: list[dict], *, listed: int = 4) -> str:
    """The devices of a run in one cell: each one (``vm1/npu:0, vm1/npu:1 SIMULATED ...``) when
    a kind of device has at most ``listed``, else counted (``8x cuda (NVIDIA H200) on 2 hosts``)."""
    groups: dict[str, list[dict]] = {}
    for d in per_device:
        groups.setdefault(d.get("device_name") or "", []).append(d)
    parts = []
    for name, ds in sorted(groups.items()):
        if len(ds) <= listed:
            parts.append(", ".join(device_id(d) for d in ds) + (f" {name}" if name else ""))
            continue
        kinds = sorted({str(d.get("device", "?")).split(":")[0] for d in ds})
        hosts = {d.get("host") for d in ds}
        parts.append(f"{len(ds)}x {'/'.join(kinds)}" + (f" ({name})" if name else "")
                     + f" on {len(hosts)} host{'s' if len(hosts) != 1 else ''}")
    return "; ".join(parts)


def state_line(report: Report) -> str | None:
    """An incomplete run's headline: its state, images evaluated of images planned, shards."""
    if report.complete:
        return None
    failed = report.shards_failed
    return (f"{report.shown_state.upper()}: {report.images} of {report.planned_images} images evaluated "
            f"({_known(report.shards_ok)} of {_known(report.shards)} shards); every number covers only "
            f"those" + (f"; {len(failed)} shard(s) not evaluated (below)" if failed else ""))


def _known(v) -> str:
    return "?" if v is None else str(v)


def missing_rows(report: Report) -> list[list]:
    return [[f["shard_id"], f["images"], f["reason"], f.get("worker") or "-", f.get("attempts", 0)]
            for f in report.shards_failed]


MISSING_HEADERS = ["shard", "images", "why it has no result", "last worker", "attempts"]


def interval_text(report: Report, k: int) -> str:
    ci = report.top_ci95(k)
    return f" (95 % CI {ci[0]:.2f} to {ci[1]:.2f})" if ci else ""


def environment_rows(report: Report) -> list[list]:
    """The environment block: per host its CPU, cores, memory, OS, Python, nasq; per device its
    accelerator facts and runtime versions; the submitting host and the rerun command."""
    env = report.environment
    rows = []
    for host, e in sorted(env.hosts.items()):
        rows.append([f"host {host}", f"{e.get('cpu')}, {e.get('cpu_cores')} cores ({e.get('cpus_usable')} usable), "
                                     f"{e.get('memory_gib')} GiB; {e.get('os')}; Python {e.get('python')}; "
                                     f"nasq {e.get('nasq')}"])
    for d in report.per_device:
        acc = ", ".join(f"{k} {v}" for k, v in sorted((d.get("accelerator") or {}).items()) if v is not None)
        rows.append([f"device {device_id(d)}", "; ".join(filter(None, [d.get("device_name"), acc,
                                                                     versions_text(d.get("versions"))]))])
    if env.submitted_from:
        rows.append(["submitted from", f"{env.submitted_from} (nasq {env.client_nasq})"])
    rows.append(["rerun with", rerun_text(report)])
    return rows


def rerun_text(report: Report) -> str:
    import shlex

    cmd = report.environment.command
    if not cmd:
        return "(not recorded: the run was submitted by a nasq that did not record it)"
    # "$NASQ_BROKER_URL" stands for a broker URL that holds a password: left for the shell to expand
    return shlex.join(cmd).replace("'$NASQ_BROKER_URL'", '"$NASQ_BROKER_URL"')


def versions_text(versions: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted((versions or {}).items())) or "?"


def ais_bench_summary(report: Report) -> str:
    """Per device, the lines ais_bench prints (compute time per batch, without host-device
    copies; throughput = 1000 * mean batch size / mean compute time), so numbers compare."""
    out = []
    backend = report.backend.name
    for d in report.per_device:
        lat = d.get("latency_ms") or {}
        if not lat.get("count"):
            continue
        bs = d["images"] / lat["count"]
        name = _compute_time_name(backend, str(d.get("device") or ""))
        out += [f"[INFO] ----------------- Performance Summary: {d['worker']} ({device_cell(d)}) ------------------",
                f"[INFO] {name} (ms): min = {lat['min']:.3f}, max = {lat['max']:.3f}, "
                f"mean = {lat['mean']:.3f}, median = {lat['p50']:.3f}, percentile(99%) = {lat['p99']:.3f}",
                f"[INFO] throughput 1000*batchsize.mean({bs:g})/{name}.mean({lat['mean']:.3f}): "
                f"{d.get('img_s_ais_bench'):.3f}"]
    if out:
        out.append("[INFO] ------------------------------------------------------")
    return "\n".join(out)


def _compute_time_name(backend: str | None, device: str) -> str:
    """ais_bench's ``NPU_compute_time`` for an NPU; what was measured on any other device."""
    if backend == "sim":
        return "SIMULATED_compute_time"
    kind = device.partition(":")[0]
    return {"npu": "NPU", "cuda": "GPU"}.get(kind, "CPU") + "_compute_time"


TIMM_FIELDS = ("model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size", "crop_pct", "interpolation",
               "batch_size", "precision", "backend", "images", "run_id")


def timm_row(report: Report) -> dict:
    """The row timm's validate.py writes to its results CSV (param_count in millions)."""
    from ..model.spec import PREPROCESS

    def err(v):
        return None if v is None else 100.0 - v

    m = report.model
    params = m.get("param_count")
    return {"model": "nasnetalarge" if m.get("arch", "large") == "large" else f"nasnet-a-{m.get('arch')}",
            "top1": report.top1, "top1_err": err(report.top1), "top5": report.top5,
            "top5_err": err(report.top5), "param_count": round(params / 1e6, 2) if params else None,
            "img_size": PREPROCESS.crop, "crop_pct": PREPROCESS.crop_pct,
            "interpolation": "bilinear", "batch_size": report.batch_size, "precision": report.precision,
            "backend": report.backend.name, "images": report.images, "run_id": report.run_id}


def latency_rows(report: Report) -> list[list]:
    rows = []
    for d in report.per_device:
        lat = d.get("latency_ms") or {}
        rows.append([device_cell(d), d["worker"], report.batch_size, lat.get("count"), lat.get("p50"),
                     lat.get("p90"), lat.get("p95"), p99_cell(lat), lat.get("max"), d.get("img_s_ais_bench"),
                     d.get("model_load_s")])
    return rows


LATENCY_HEADERS = ["device", "worker", "batch", "batches", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "max ms",
                   "compute img/s", "model load s"]


def render(report: Report) -> str:
    """The report as a readable table."""
    lines = [f"nasq run {report.run_id}"]
    lines += [f"  ! {w}" for w in report.warnings]
    if report.error:
        lines.append(f"  error    {report.error}")
    lines += [f"  model    {report.model.get('arch', '?')} ({report.num_outputs} outputs)  "
              f"backend {report.backend.name}  batch {report.batch_size}  precision {report.precision}",
              f"  dataset  {_dataset_text(report)}",
              f"  images   {report.images} evaluated of {report.planned_images}, {report.error_count} excluded",
              "  accuracy " + "  ".join(f"top-{k} {_pct(report.top(k))}{interval_text(report, k)}" for k in (1, 5)),
              f"  speed    {_speed(report)}, {report.shards} shards"]
    read = data_read_text(report)
    if read:
        lines.append(f"  data     {read}")
    lines.append("")
    if report.per_device:
        lines.append(table([[device_cell(d), d["worker"], d["shards"], d["images"], d["img_s_compute"],
                             d["img_s_wall"]] + _lat_cells(d) for d in report.per_device],
                           ["device", "worker", "shards", "images", "compute img/s", "wall img/s", "p50 ms",
                            "p99 ms"], indent="  "))
    if report.shards_failed:
        lines += ["", "  shards not evaluated:", table(missing_rows(report), MISSING_HEADERS, indent="    ")]
    if report.errors:
        lines += ["", f"  excluded images ({report.error_count}):"]
        lines += [f"    {e['name']}: {e['reason']}" for e in report.errors[:20]]
        if report.error_count > 20:
            lines.append(f"    ... {report.error_count - 20} more in the JSON report")
    if report.excluded_devices:
        lines += ["", "  EXCLUDED devices (they failed shards of the run in a row and took none of its shards afterwards):",
                  table(excluded_rows(report), EXCLUDED_HEADERS, indent="    ")]
    if report.duplicate_shard_results_dropped:
        lines.append(f"  duplicate shard results dropped: {', '.join(report.duplicate_shard_results_dropped)}")
    return "\n".join(lines)


def excluded_rows(report: Report) -> list[list]:
    import time

    return [[device_cell(e), e.get("worker"), time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.get("at") or 0)),
             e.get("shards_failed"), str(e.get("reason")) + (" (lifted by nasq resume)" if e.get("lifted") else "")]
            for e in report.excluded_devices or ()]


EXCLUDED_HEADERS = ["device", "worker", "excluded at", "failed shards in a row", "why"]


def retried_rows(report: Report) -> list[list]:
    """Each failed copy of a shard: the shard, where it failed, why (the shard then ran elsewhere
    unless it is among the shards not evaluated)."""
    return [[sid, device_cell(f), f.get("worker"), f.get("error")]
            for sid, fs in sorted((report.shard_failures or {}).items()) for f in fs]


RETRIED_HEADERS = ["shard", "device", "worker", "error"]


def data_read_text(report: Report) -> str | None:
    """Where the images came from: the host cache and the source, per host when there are several."""
    d = report.data_read or {}
    if not d.get("hosts"):
        return None

    def one(x: dict) -> str:
        return (f"{x.get('images_from_cache', 0)} from the host cache, {x.get('images_from_source', 0)} from the "
                f"source ({x.get('bytes_from_source', 0) / 1e9:.2f} GB)")

    text = one(d)
    if len(d["hosts"]) > 1:
        text += "; " + "; ".join(f"{h}: {one(x)}" for h, x in sorted(d["hosts"].items()))
    return "images read: " + text


def _pct(v) -> str:
    return "   n/a" if v is None else f"{v:6.2f}%"


def _speed(report: Report) -> str:
    t = report.throughput
    parts = [(True, f"{num(report.throughput_img_s)} img/s over the shards' span ({num(report.wall_s)} s)"),
             (t.end_to_end_img_s, f"{num(t.end_to_end_img_s)} img/s end to end ({num(t.end_to_end_s)} s from "
                                  "submission)"),
             (t.compute_img_s, f"{num(t.compute_img_s)} img/s compute only")]
    return "; ".join(text for shown, text in parts if shown)


def _lat_cells(d: dict) -> list:
    lat = d.get("latency_ms") or {}
    return [num(lat.get("p50")), p99_cell(lat)]


def p99_cell(lat: dict) -> str:
    """The p99, marked * when it comes from fewer than 100 batches (then close to the maximum)."""
    if lat.get("p99") is None:
        return "-"
    return num(lat["p99"]) + ("" if lat.get("p99_samples_ok", True) else "*")


P99_NOTE = "\\* p99 from fewer than 100 batches: close to the maximum, not a tail estimate."


def _facts(report: Report) -> list[list]:
    m = report.model
    t = report.throughput
    facts = [["state", report.shown_state + (f": {report.error}" if report.error else "")],
             ["model", f"{m.get('arch', '?')}, {report.num_outputs} outputs, "
                       f"sha256 {str(m.get('sha256', m.get('artifact_key', '?')))[:16]}"],
             ["backend", f"{report.backend.name} ({versions_text(report.backend.versions)})"],
             ["batch size / precision", f"{report.batch_size} / {report.precision}"
                                        + (f" (computes in {m['compute_precision']})" if m.get("compute_precision")
                                           else "")],
             ["devices", devices_summary(report.per_device)],
             ["dataset", _dataset_text(report, images=True)],
             ["images evaluated", f"{report.images} of {report.planned_images} planned ({report.error_count} excluded)"]]
    facts += [[f"top-{k}", pct(report.top(k)) + interval_text(report, k)] for k in range(1, 6)]
    facts += [["throughput, shards' span", f"{num(report.throughput_img_s)} img/s over {num(report.wall_s)} s "
                                           "(first shard start to last shard end)"],
              ["throughput, end to end", f"{num(t.end_to_end_img_s)} img/s over {num(t.end_to_end_s)} s "
                                         "(submission to report)"],
              ["throughput, compute only", f"{num(t.compute_img_s)} img/s (sum over devices of ais_bench's "
                                           "1000 * batch / mean compute ms; compute timed by "
                                           f"{_clock(report)})"],
              ["model load", f"{num(report.model_load_s)} s (slowest device)"]]
    if data_read_text(report):
        facts.append(["data", data_read_text(report)])
    return facts


def _clock(report: Report) -> str:
    clocks = {d.get("compute_clock", "host") for d in report.per_device}
    if clocks == {"device"}:
        return "the device's own execution time (ais_bench exec_time_list)"
    return "the host around each batch" if clocks <= {"host"} else "the device where it reports one, else the host"


def _device_rows(report: Report) -> list[list]:
    return [[device_cell(d), d["worker"], d["shards"], d["images"], d["img_s_compute"], d["img_s_wall"],
             d.get("img_s_ais_bench")] for d in report.per_device]


DEVICE_HEADERS = ["device", "worker", "shards", "images", "compute img/s", "wall img/s", "ais_bench img/s"]


def render_markdown(report: Report) -> str:
    """The report as Markdown: warnings, headline facts, devices, the shards not evaluated,
    latency, the environment block and the rerun command, excluded images."""
    lines = [f"# nasq run {report.run_id}", ""]
    lines += [f"> **{w}**" for w in report.warnings] + ([""] if report.warnings else [])
    lines += [table(_facts(report), ["", ""], markdown=True), "",
              "## Devices", "", table(_device_rows(report), DEVICE_HEADERS, markdown=True)]
    if report.shards_failed:
        lines += ["", "## Shards not evaluated", "", state_line(report) or "", "",
                  table(missing_rows(report), MISSING_HEADERS, markdown=True)]
    if report.excluded_devices:
        lines += ["", "## Excluded devices", "", "Each failed shards of the run in a row and took none of its shards "
                  "afterwards; the shards ran on the other devices.", "",
                  table(excluded_rows(report), EXCLUDED_HEADERS, markdown=True)]
    if report.shard_failures:
        lines += ["", "## Shards that failed on a device", "",
                  table(retried_rows(report), RETRIED_HEADERS, markdown=True)]
    lines += ["", "## Latency per batch (compute only)", "", table(latency_rows(report), LATENCY_HEADERS, markdown=True)]
    if _few_batches(report):
        lines += ["", P99_NOTE]
    lines += ["", "## Environment", "", table(environment_rows(report), ["", ""], markdown=True), "",
              "Rerun:", "", "```", rerun_text(report), "```"]
    summary = ais_bench_summary(report)
    if summary:
        lines += ["", "## ais_bench-style summary", "", "```", summary, "```"]
    if report.errors:
        lines += ["", "## Excluded images", ""] + [f"- `{e['name']}`: {e['reason']}" for e in report.errors]
    return "\n".join(lines) + "\n"


def render_html(report: Report, plots: list[str]) -> str:
    """The run as one self-contained HTML page: warnings first, then the facts, devices, the
    shards not evaluated, latency, plots, the environment and rerun command, the ais_bench block."""
    def esc_table(rows, headers):
        return table(rows, headers, fmt="html")

    sections = [("Run", esc_table(_facts(report), ["what", "value"])),
                ("Devices", esc_table(_device_rows(report), DEVICE_HEADERS))]
    if report.shards_failed:
        sections.append((f"Shards not evaluated ({len(report.shards_failed)})",
                         esc_table(missing_rows(report), MISSING_HEADERS)))
    if report.excluded_devices:
        sections.append((f"Excluded devices ({len(report.excluded_devices)})",
                         esc_table(excluded_rows(report), EXCLUDED_HEADERS)))
    if report.shard_failures:
        sections.append(("Shards that failed on a device", esc_table(retried_rows(report), RETRIED_HEADERS)))
    latency = esc_table(latency_rows(report), LATENCY_HEADERS)
    if _few_batches(report):
        latency += f"<p>{_escape(P99_NOTE.replace(chr(92), ''))}</p>"
    sections += [("Latency per batch (compute only)", latency),
                 ("Plots", "".join(png_tag(p) for p in plots if os.path.isfile(p))),
                 ("Environment", esc_table(environment_rows(report), ["what", "value"])),
                 ("Rerun", "<pre>" + _escape(rerun_text(report)) + "</pre>")]
    summary = ais_bench_summary(report)
    if summary:
        sections.append(("ais_bench-style summary", "<pre>" + _escape(summary) + "</pre>"))
    sections.append(("timm-style results row", esc_table(list(map(list, timm_row(report).items())),
                                                         ["field", "value"])))
    if report.errors:
        sections.append((f"Excluded images ({report.error_count})",
                         esc_table([[e["name"], e["reason"]] for e in report.errors[:500]], ["image", "reason"])))
    title = f"nasq run {report.run_id}" + ("" if report.complete else f" ({report.shown_state.upper()})")
    excluded = [f"EXCLUDED: {device_cell(e)} ({e.get('reason')})" for e in report.excluded_devices or ()]
    return page(title, sections, banners=[*filter(None, [state_line(report)]), *report.warnings, *excluded])


def _few_batches(report: Report) -> bool:
    """A device's p99 comes from fewer than 100 batches."""
    return any(not (d.get("latency_ms") or {}).get("p99_samples_ok", True) for d in report.per_device)


def _dataset_text(report: Report, *, images: bool = False) -> str:
    ds = report.dataset
    if ds is None:
        return "?"
    return f"{ds.root} ({ds.kind}, " + (f"{report.images_total} images, " if images else "") + \
        f"fingerprint {ds.fingerprint})"


def _escape(text: str) -> str:
    import html

    return html.escape(text)
