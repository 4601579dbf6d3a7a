"""The ``nasq`` command: a thin adapter from flags to ``nasq.api``.

Each subcommand is a pair: ``_<name>_args(parser)`` declares its flags (choices come from the
registries: backends, precisions, compile modes, build targets) and ``cmd_<name>(args)`` maps
them onto one API call and prints the result. Bad flags end in one line and exit status 2.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import shlex
import sys

from .config import MAX_BATCH_SIZE as MAX_BATCH  # a light module: --help stays fast
from .errors import NasqError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block: the error is what the user needs
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ flag types
# Each checks its value when the flags are parsed, so a bad one is one line naming the flag
# (argparse adds "argument --batch-size:") before anything starts.



def int_in(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, not {text!r}") from None
        if v < low or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"must be {'at least ' + str(low) if high is None else f'{low} to {high}'}"
                                             f", not {v}")
        return v
    return parse


def seconds(high: float | None = None):
    """An argparse type: a number of seconds above 0 (at most ``high``)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of seconds, not {text!r}") from None
        if not v > 0 or (high is not None and v > high) or v != v:
            raise argparse.ArgumentTypeError(f"must be above 0{f' and at most {high:g}' if high else ''}, not {text}")
        return v
    return parse


def int_list(low: int = 1, high: int | None = None):
    """An argparse type: comma-separated integers, each in [low, high]."""
    one = int_in(low, high)

    def parse(text: str) -> list[int]:
        values = [one(x.strip()) for x in text.split(",") if x.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, not {text!r}")
        return values
    return parse


def _devices(text: str) -> str:
    from .config import parse_device

    if text in ("auto", "cpu", "cuda"):
        return text
    for d in (x.strip() for x in text.split(",")):
        try:
            parse_device(d)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or a list such as cuda:0,cuda:1, not {d!r}") \
                from None
    return text


def _ready(what: str, folder: str) -> None:
    """``folder`` exists (made if need be) and is writable, else one line naming ``what``."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise NasqError(f"{what}: cannot create {folder} ({e.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise NasqError(f"{what}: {folder} is not writable")


def _out_file(flag: str, path: str | None) -> None:
    """Make sure ``path`` can be written before a long run: its folder is ready and it is not a
    folder itself."""
    if path:
        if os.path.isdir(path):
            raise NasqError(f"{flag} {path} is a folder; give a file name")
        _ready(f"{flag} {path}", os.path.dirname(os.path.abspath(path)))


def _out_dir(flag: str, path: str | None) -> None:
    if path:
        _ready(f"{flag} {path}", path)


def _settings(args):
    from .config import load_settings

    return load_settings(broker_url=getattr(args, "broker", None))


def _store(args):
    from .queue.broker import probe
    from .queue.store import RunStore

    settings = _settings(args)
    if not settings.broker_url:
        raise NasqError("no broker: pass --broker redis://HOST:6379/0 or set NASQ_BROKER_URL (the runs of an embedded "
                        "`nasq eval` live in its private Redis and end with it)")
    probe(settings)
    return RunStore.for_settings(settings)


# ------------------------------------------------------------------------------ shared flags

def _backend_flags(p, *, precision_default: str | None = "fp32") -> None:
    from . import backends

    p.add_argument("--backend", default="torch", choices=backends.names(), help="inference runtime (default: torch)")
    default_text = precision_default or "the worker's"
    p.add_argument("--precision", default=precision_default, choices=backends.precisions(),
                   help=f"fp16/bf16 take the CUDA fast path (default: {default_text})")


def _torch_flags(p) -> None:
    from . import backends

    p.add_argument("--compile", default="none", choices=backends.compile_modes(),
                   help="torch backend: torch.compile mode (default: none)")
    p.add_argument("--cuda-graphs", action="store_true", help="torch backend: replay a CUDA graph per batch size")
    p.add_argument("--kernels", default="torch", choices=("torch", "triton"),
                   help="torch backend on CUDA: triton runs NASNet's separable branches as fused Triton kernels "
                        "(BatchNorm folded; default: torch)")


def _report_flags(p) -> None:
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON here")
    p.add_argument("--predictions", metavar="PATH", help="write per-image top-5 here (.csv or .json)")
    p.add_argument("--timeout", type=seconds(), help="give up waiting after this many seconds")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_report_paths(args) -> None:
    _out_file("--json", args.json)
    _out_file("--predictions", getattr(args, "predictions", None))


def _finish(result, args) -> int:
    from .files import atomic_write, write_json

    print(result.table)
    report = result.report
    for kind, path in (report.get("files") or {}).items():
        _log(f"run report ({kind}): {path}")
    missing = report.get("files_not_written") or {}
    if missing:
        folder = os.path.dirname(next(iter((report.get("files") or {}).values()), "")) or "the report dir"
        _log(f"not written by the merging worker: {', '.join(missing)} ({next(iter(missing.values()))})"
             + (f"; the rest are in {folder}" if report.get("files") else ""))
    for text in (result.notes or {}).values():
        _log(f"note: {text}")
    on_disk = (report.get("files") or {}).get("json")
    if result.embedded:  # the private Redis ends with this command
        kept = f"the report is in {on_disk}" if on_disk else "the report is the one printed above (no copy was kept)"
    else:
        kept = (f"the report is in {on_disk} and " if on_disk else "the report is ") + \
            f"in Redis (`nasq status {result.run_id} --json`, until it expires)"
    if missing or result.notes:
        _log(kept)
    writing = None
    try:
        if args.json:
            writing = args.json
            write_json(report, args.json)
            _log(f"report written to {args.json}")
        pred = result.predictions
        if getattr(args, "predictions", None) and pred is not None:
            writing = args.predictions
            if args.predictions.endswith(".json"):
                write_json(pred, args.predictions, indent=None)
            else:
                out = io.StringIO()
                w = csv.writer(out)
                w.writerow(["image", "label"] + [f"top{k}" for k in range(1, 6)] + [f"logit{k}" for k in range(1, 6)])
                for name, label, ids, scores in zip(pred["names"], pred["labels"], pred["top5"], pred["scores"]):
                    w.writerow([name, "" if label is None else label, *ids, *scores])
                atomic_write(args.predictions, out.getvalue())
            _log(f"per-image predictions written to {args.predictions}")
    except OSError as e:
        raise NasqError(f"could not write {writing}: {e.strerror or e}; {kept}") from None
    if not report.get("images"):
        raise NasqError(f"no image could be evaluated ({report.get('error_count', 0)} unusable, listed above); "
                        "check the data folder")
    return 0


# ------------------------------------------------------------------------------ eval

def _eval_args(p) -> None:
    p.add_argument("--weights", required=True, help="Cadene-format checkpoint (.pth) or a built model for the backend")
    p.add_argument("--data", required=True, help="folder of JPEGs, of .bin files, or of u8 shards")
    p.add_argument("--labels", help="val_label.txt (default: one in or beside --data; none: no accuracy)")
    _backend_flags(p, precision_default=None)
    p.add_argument("-b", "--batch-size", type=int_in(1, MAX_BATCH), default=8,
                   help="images per forward pass (default: 8)")
    p.add_argument("--device", default="auto", type=_devices,
                   help="embedded runs: auto, cpu, cuda or a list like cuda:0,cuda:1; indices count the GPUs "
                        "CUDA_VISIBLE_DEVICES leaves visible (default: auto)")
    p.add_argument("--workers", type=int_in(1, 256), help="embedded runs: number of local workers (default: one per device)")
    _torch_flags(p)
    p.add_argument("--shard-size", type=int_in(1, 100_000),
                   help="images per shard task (default: a few shards per worker, <= 1000)")
    p.add_argument("--allow-bad-labels", action="store_true",
                   help="go on when some labels are not ImageNet classes 0-999 (they count as misses)")
    p.add_argument("--num-outputs", type=int, choices=(1001, 1000),
                   help="1001 keeps the background class (as the seed's ONNX), 1000 drops it (default: the checkpoint's)")
    p.add_argument("--broker", help="Redis URL of a running nasq deployment (default: $NASQ_BROKER_URL; none: embedded)")
    p.add_argument("--queue", help="evaluation queue (default: eval.<backend>)")
    p.add_argument("--output", metavar="DIR", help="also write every image's logits in ais_bench's layout (shared storage)")
    p.add_argument("--outfmt", default="NPY", choices=("NPY", "TXT", "BIN"), help="format for --output (default: NPY)")
    p.add_argument("--soc-version", help="ais_bench with a checkpoint: the chip to build the .om for, e.g. Ascend310P3 "
                                         "(ATC on the build queue; see `npu-smi info`)")
    p.add_argument("--gears", type=int_list(1, MAX_BATCH),
                   help="ais_bench with a checkpoint: dynamic batch gears of the .om, e.g. 1,4,8 (-b must be one; "
                        "default: a static .om of -b)")
    _report_flags(p)


def cmd_eval(args) -> int:
    from .api import evaluate

    _check_report_paths(args)
    _out_dir("--output", args.output)
    return _finish(evaluate(weights=args.weights, data=args.data, labels=args.labels, backend=args.backend,
                            device=args.device, workers=args.workers, batch_size=args.batch_size,
                            shard_size=args.shard_size, num_outputs=args.num_outputs, precision=args.precision,
                            compile=None if args.compile == "none" else args.compile, cuda_graphs=args.cuda_graphs,
                            kernels=args.kernels,
                            broker=args.broker, queue=args.queue, output_dir=args.output, outfmt=args.outfmt,
                            progress=not args.no_progress, timeout=args.timeout, log=_log,
                            allow_bad_labels=args.allow_bad_labels, rerun=shlex.join(["nasq", *sys.argv[1:]]),
                            soc_version=args.soc_version, gears=args.gears), args)


# ------------------------------------------------------------------------------ demo

def _demo_args(p) -> None:
    p.add_argument("--images", type=int_in(1, 100_000), default=64, help="number of images (default: 64)")
    p.add_argument("--workers", type=int_in(1, 64), default=2, help="local CPU workers (default: 2)")
    p.add_argument("--workdir", help="keep images, labels and checkpoint here (default: a temporary folder, removed)")
    p.add_argument("--arch", default="large", choices=("large", "tiny"), help="model size (default: large = NASNet-A Large)")
    p.add_argument("--backend", default="torch", choices=("torch", "onnxruntime"), help="inference runtime (default: torch)")
    p.add_argument("-b", "--batch-size", type=int_in(1, MAX_BATCH), default=8,
                   help="images per forward pass (default: 8)")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_demo(args) -> int:
    import shutil
    import tempfile

    from .api import evaluate
    from .config import redact
    from .demo import prepare

    _out_file("--json", args.json)
    workdir = args.workdir or tempfile.mkdtemp(prefix="nasq-demo-")
    _log("nasq demo: the checkpoint has RANDOM weights (BatchNorm calibrated on generated images); "
         "accuracy below only shows the pipeline is correct, not how good NASNet-Large is.")
    paths = prepare(workdir, args.images, arch=args.arch, batch_size=args.batch_size, log=_log)
    settings = _settings(args)
    if settings.broker_url:
        _log(f"note: using the broker {redact(settings.broker_url)} from the environment/config; unset NASQ_BROKER_URL "
             "for a self-contained demo")
    result = evaluate(weights=paths["weights"], data=paths["data"], labels=paths["labels"], backend=args.backend,
                      device="cpu", workers=args.workers, batch_size=args.batch_size,
                      progress=not args.no_progress, settings=settings, log=_log)
    rc = _finish(result, args)
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        _log(f"images, labels and checkpoint kept in {workdir}")
    _log("reminder: random weights -- top-1 ~100% means every image got the reference model's prediction.")
    return rc


# ------------------------------------------------------------------------------ preprocess

def _preprocess_args(p) -> None:
    p.add_argument("src", help="folder of JPEG images")
    p.add_argument("dst", help="output folder")
    p.add_argument("--format", default="u8", choices=("bin", "u8"),
                   help="bin: one float32 .bin per image (ais_bench input); u8: compact uint8 shards (default)")
    p.add_argument("--workers", type=int_in(1, 1024), help="processes (default: all cores)")
    p.add_argument("--shard-size", type=int_in(1, 100_000), default=256, help="images per u8 shard (default: 256)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_preprocess(args) -> int:
    from .data.preprocess import preprocess

    res = preprocess(args.src, args.dst, fmt=args.format, workers=args.workers, shard_size=args.shard_size,
                     progress=not args.no_progress)
    print(f"{res.images} images -> {res.dst} ({res.fmt}): {res.written} written, {res.skipped} already done, "
          f"{len(res.errors)} unusable")
    for name, reason in list(res.errors.items())[:20]:
        print(f"  {name}: {reason}")
    return 0


# ------------------------------------------------------------------------------ build

def _build_args(p) -> None:
    from .artifacts.spec import TARGETS

    p.add_argument("--weights", required=True, help="Cadene-format checkpoint (.pth)")
    p.add_argument("--target", default="ort", choices=TARGETS,
                   help="onnx: verified ONNX; ort: + ONNX Runtime optimization; ov: + OpenVINO IR; om: + Ascend "
                        "ATC; trt: + TensorRT (default: ort)")
    p.add_argument("-b", "--batch-size", type=int_list(1, MAX_BATCH),
                   help="fixed batch size(s), comma-separated: one artifact each (default: dynamic batch)")
    p.add_argument("--gears", type=int_list(1, MAX_BATCH),
                   help="om: dynamic batch gears for ATC's --dynamic_batch_size, e.g. 1,4,8,16")
    p.add_argument("--opset", type=int_in(11, 21),
                   help="ONNX opset (default: 17; 11 for --target om, as ATC accepted in the seed)")
    p.add_argument("--soc-version", help="om: the chip, e.g. Ascend310P3 (see `npu-smi info`)")
    p.add_argument("--num-outputs", type=int, choices=(1001, 1000),
                   help="1000 drops the background class (default: the checkpoint's)")
    p.add_argument("--tolerance", type=seconds(), default=1e-4, metavar="RATIO",
                   help="max |logit diff| / max |logit| per step, above 0 (default: 1e-4)")
    p.add_argument("--accept-tolerance", action="store_true", help="keep an artifact that misses the tolerance")
    p.add_argument("--broker", help="Redis URL of a deployment with a build worker (default: $NASQ_BROKER_URL; none: private)")
    p.add_argument("--timeout", type=seconds(), help="give up waiting after this many seconds")
    p.add_argument("--json", metavar="PATH", help="write the artifact metadata here")


def cmd_build(args) -> int:
    from .api import build
    from .files import write_json

    _out_file("--json", args.json)
    results = []
    for bs in ([None] if args.gears else args.batch_size or [None]):
        res = build(weights=args.weights, target=args.target, batch_size=bs, gears=args.gears, opset=args.opset,
                    soc_version=args.soc_version, num_outputs=args.num_outputs, tolerance=args.tolerance,
                    accept_tolerance=args.accept_tolerance, broker=args.broker, timeout=args.timeout, log=_log)
        print(res.table + "\n")
        results.append({"key": res.key, "path": res.path, "cached": res.cached, "meta": res.meta})
    if args.json:
        write_json(results if len(results) > 1 else results[0], args.json)
    return 0


# ------------------------------------------------------------------------------ bench

def _bench_args(p) -> None:
    _backend_flags(p)
    p.add_argument("--device", default="cpu", type=_one_device, help="cpu or cuda:N (default: cpu)")
    p.add_argument("-b", "--batch-sizes", type=int_list(1, MAX_BATCH), default=[1, 4, 8],
                   help="comma-separated (default: 1,4,8)")
    p.add_argument("--mode", default="compute", choices=("compute", "e2e"),
                   help="compute: input already on the device; e2e: from JPEG files (decode, preprocess, transfer)")
    p.add_argument("--weights", help="checkpoint (default: a calibrated random-weight one, made once)")
    p.add_argument("--data", help="JPEG folder for e2e mode (default: generated images)")
    p.add_argument("--arch", default="large", choices=("large", "tiny"), help="with the default weights (default: large)")
    _torch_flags(p)
    p.add_argument("--device-decode", action="store_true",
                   help="torch backend, e2e mode: decode JPEGs on the device (nvjpeg on CUDA)")
    p.add_argument("--no-baseline", action="store_true", help="skip the eager baselines")
    p.add_argument("--min-time", type=seconds(3600), default=2.0,
                   help="seconds of timed iterations per point (default: 2)")
    p.add_argument("--json", metavar="PATH", help="write all rows and the environment here")


def cmd_bench(args) -> int:
    from .api import bench
    from .files import write_json

    _out_file("--json", args.json)
    res = bench(backend=args.backend, device=args.device, precision=args.precision, compile=args.compile,
                cuda_graphs=args.cuda_graphs, kernels=args.kernels, device_decode=args.device_decode,
                batch_sizes=args.batch_sizes,
                mode=args.mode, weights=args.weights, data=args.data, arch=args.arch, baseline=not args.no_baseline,
                min_time_s=args.min_time, log=_log)
    print(res.table)
    if args.json:
        write_json({"env": res.env, "rows": res.rows}, args.json)
        _log(f"results written to {args.json}")
    return 0


# ------------------------------------------------------------------------------ status, runs, resume

def _status_args(p) -> None:
    p.add_argument("run_id", nargs="?", help="the run (default: the most recent one)")
    p.add_argument("--watch", action="store_true", help="refresh until the run ends, then print its report")
    p.add_argument("--interval", type=seconds(3600), default=1.0, help="seconds between refreshes (default: 1)")
    p.add_argument("--json", action="store_true", help="print the status (and the report, once done) as JSON")
    p.add_argument("--broker", help="Redis URL (default: $NASQ_BROKER_URL)")


def cmd_status(args) -> int:
    import json

    from .results.report import render
    from .results.status import render_status, run_status, watch
    from .runstate import RunState

    store = _store(args)
    run_id = args.run_id or next(iter(store.run_ids(1)), None)
    if run_id is None:
        raise NasqError("no runs recorded in this Redis yet")
    if args.json:
        st = watch(store, run_id, interval=args.interval, out=open(os.devnull, "w")) if args.watch \
            else run_status(store, run_id)
        print(json.dumps({**st, "report": store.report(run_id)}, indent=2))
        return 0 if st["state"] not in (RunState.FAILED, RunState.CANCELLED) else 1
    st = watch(store, run_id, interval=args.interval) if args.watch else run_status(store, run_id)
    if not args.watch or not sys.stdout.isatty():
        print(render_status(st))
    report = store.report(run_id)
    if st["state"] == RunState.DONE and report:
        print()
        print(render(report))
        if report.get("files"):
            print(f"\nreport files: {', '.join(report['files'].values())}")
    return 0 if st["state"] != RunState.FAILED else 1


def _runs_args(p) -> None:
    p.add_argument("--limit", type=int_in(1, 100_000), default=20, help="how many (default: 20)")
    from .runstate import ALL

    p.add_argument("--state", choices=ALL, help="only these")
    p.add_argument("--backend", help="only runs of this backend")
    p.add_argument("--since", type=seconds(), metavar="DAYS", help="only runs created in the last DAYS days")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the rows as JSON")
    out.add_argument("--csv", action="store_true", help="print the rows as CSV")
    p.add_argument("--broker", help="Redis URL (default: $NASQ_BROKER_URL; without one: the run history only)")


def cmd_runs(args) -> int:
    import json

    from .api import list_runs
    from .results.history import COLUMNS
    from .results.status import runs_table

    rows = list_runs(state=args.state, backend=args.backend, since_days=args.since, limit=args.limit,
                     settings=_settings(args))
    if args.json:
        print(json.dumps(rows, indent=2))
    elif args.csv:
        w = csv.DictWriter(sys.stdout, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    else:
        print(runs_table(rows) if rows else "no runs recorded yet")
    return 0


def _compare_args(p) -> None:
    p.add_argument("run_a", help="the baseline run")
    p.add_argument("run_b", help="the run compared with it")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.add_argument("--broker", help="Redis URL (default: $NASQ_BROKER_URL; without one: the report dir)")


def cmd_compare(args) -> int:
    import json

    from .api import compare_runs
    from .results.compare import render

    c = compare_runs(args.run_a, args.run_b, settings=_settings(args))
    print(json.dumps(c, indent=2) if args.json else render(c))
    return 0


def _cancel_args(p) -> None:
    p.add_argument("run_id", help="the run to cancel")
    p.add_argument("--broker", help="Redis URL the run was submitted to (default: $NASQ_BROKER_URL)")


def cmd_cancel(args) -> int:
    from .api import cancel

    partial = cancel(args.run_id, settings=_settings(args), log=_log)
    if partial and partial.get("files"):
        _log(f"partial report: {partial['files'].get('json')}")
    return 0


def _resume_args(p) -> None:
    p.add_argument("run_id", help="the run to finish")
    p.add_argument("--broker", help="Redis URL the run was submitted to (default: $NASQ_BROKER_URL)")
    _report_flags(p)


def cmd_resume(args) -> int:
    from .api import resume

    _check_report_paths(args)
    return _finish(resume(args.run_id, broker=args.broker, progress=not args.no_progress, timeout=args.timeout,
                          log=_log), args)


# ------------------------------------------------------------------------------ sweep

def _sweep_args(p) -> None:
    p.add_argument("--weights", required=True, help="checkpoint (or built model for the backend)")
    p.add_argument("--data", required=True, help="dataset folder (images for bench mode, the dataset for eval mode)")
    p.add_argument("-b", "--batch-sizes", type=int_list(1, MAX_BATCH), required=True,
                   help="comma-separated, e.g. 1,4,8,16,32,64")
    _backend_flags(p)
    p.add_argument("--devices", type=lambda t: [x for x in t.split(",") if x],
                   help="worker names (with a broker; default: every live worker of the backend) or local devices "
                        "such as cpu,cuda:0 (without one)")
    p.add_argument("--workers", type=int_in(1, 64), help="without a broker: local CPU workers (default: 2)")
    p.add_argument("--mode", default="bench", choices=("bench", "eval"), help="default: bench")
    p.add_argument("--labels", help="eval mode: val_label.txt (default: beside the data)")
    p.add_argument("--images", type=int_in(1, 10_000_000), help="eval mode: only the first N images")
    p.add_argument("--min-time", type=seconds(3600), default=2.0, help="bench mode: timed seconds per point (default: 2)")
    p.add_argument("--broker", help="Redis URL (default: $NASQ_BROKER_URL; none: private local workers)")
    p.add_argument("--out", help="write the report files here (default: the sweep's folder)")
    p.add_argument("--no-wait", action="store_true", help="with a broker: print the sweep id and return")


def _finish_sweep(handle, args) -> int:
    if args.no_wait:
        if handle.cluster is not None:
            handle.close()
            raise NasqError("--no-wait needs a broker: without one the sweep's private workers stop with this command")
        print(handle.sweep_id)
        return 0
    try:
        handle.wait(progress=True, log=_log)
    finally:
        handle.close()
    rep = handle.report(args.out)
    print(rep.markdown)
    for kind, path in rep.files.items():
        print(f"{kind:<10} {path}")
    return 0


def _sweeps_args(p) -> None:
    p.add_argument("--resume", metavar="SWEEP_ID", help="run the points a recorded sweep has not measured yet (the "
                                                        "measured ones are reused), then report it")
    p.add_argument("--workers", type=int_in(1, 64), help="--resume without a broker: local CPU workers (default: 2)")
    p.add_argument("--json", action="store_true", help="list as JSON")
    p.add_argument("--out", help="--resume: write the report files here (default: the sweep's folder)")
    p.add_argument("--no-wait", action="store_true", help="--resume with a broker: print the sweep id and return")
    p.add_argument("--broker", help="Redis URL (default: $NASQ_BROKER_URL; none: private local workers)")


def cmd_sweeps(args) -> int:
    import json
    import time

    from .api import list_sweeps, resume_sweep
    from .tables import table

    settings = _settings(args)
    if args.resume:
        _out_dir("--out", args.out)
        return _finish_sweep(resume_sweep(args.resume, settings=settings, workers=args.workers, log=_log), args)
    sweeps = list_sweeps(settings=settings)
    if args.json:
        print(json.dumps([{k: v for k, v in s.items() if k != "spec"} for s in sweeps], indent=2))
        return 0
    if not sweeps:
        print(f"no sweeps in {os.path.join(settings.report_dir, 'sweeps')}")
        return 0
    print(table([[s["sweep_id"], time.strftime("%Y-%m-%d %H:%M", time.localtime(s["created"])), s["state"],
                  f"{s['done']}/{s['points']}", s["errors"], s["mode"], f"{s['backend']} {s['precision']}",
                  ",".join(map(str, s["batch_sizes"] or [])), ", ".join(s["devices"] or [])] for s in sweeps],
                ["sweep", "created", "state", "points", "errors", "mode", "backend", "batch sizes", "devices"]))
    return 0


def cmd_sweep(args) -> int:
    from .api import submit_sweep

    _out_dir("--out", args.out)
    handle = submit_sweep(batch_sizes=args.batch_sizes, weights=args.weights, data=args.data, backend=args.backend,
                          precision=args.precision, devices=args.devices, workers=args.workers, mode=args.mode,
                          labels=args.labels, images=args.images, min_time_s=args.min_time, broker=args.broker,
                          log=_log)
    return _finish_sweep(handle, args)


# ------------------------------------------------------------------------------ flower, worker

def _flower_args(p) -> None:
    p.add_argument("--port", type=int_in(1, 65535), default=5555, help="default: 5555")
    p.add_argument("--address", default="127.0.0.1", help="listen address (default: 127.0.0.1)")
    p.add_argument("--basic-auth-file", metavar="FILE",
                   help="a file holding user:password (several: one per line); it reaches Flower through its "
                        "environment, never its command line")
    p.add_argument("--basic-auth", help="user:password (prefer --basic-auth-file or $NASQ_FLOWER_BASIC_AUTH: a "
                                        "password on a command line is seen by every local user while it runs)")
    p.add_argument("--no-auth", action="store_true", help="start without authentication (anyone can revoke tasks)")
    p.add_argument("--max-tasks", type=int_in(1, 10_000_000), default=100000,
                   help="tasks Flower keeps in memory (default: 100000)")
    p.add_argument("--broker", help="Redis URL (default: $NASQ_BROKER_URL)")


def cmd_flower(args) -> int:
    from .config import redact

    settings = _settings(args)
    if not settings.broker_url:
        raise NasqError("no broker: pass --broker redis://HOST:6379/0 or set NASQ_BROKER_URL")
    auth = args.basic_auth or _read_auth_file(args.basic_auth_file) or os.environ.get("NASQ_FLOWER_BASIC_AUTH") \
        or os.environ.get("FLOWER_BASIC_AUTH")
    if not auth and not args.no_auth:
        raise NasqError("Flower lets anyone who reaches it revoke tasks and shut workers down, so nasq starts it with "
                        "authentication: pass --basic-auth user:password (or set NASQ_FLOWER_BASIC_AUTH); "
                        "--no-auth starts it open, on purpose")
    if auth and not all(":" in pair for pair in auth.split(",")):
        raise NasqError("--basic-auth takes user:password (several: user1:pw1,user2:pw2)")
    from .queue.broker import probe

    probe(settings)
    env = dict(os.environ, NASQ_BROKER_URL=settings.broker_url)
    if settings.result_backend:
        env["NASQ_RESULT_BACKEND"] = settings.result_backend
    cmd = [sys.executable, "-m", "celery", "-A", "nasq.queue.flower", "flower", f"--address={args.address}",
           f"--port={args.port}", f"--max_tasks={args.max_tasks}"]
    env.pop("FLOWER_BASIC_AUTH", None)
    if auth:
        env["FLOWER_BASIC_AUTH"] = auth  # Flower reads FLOWER_* options from its environment: not on argv
    else:
        env["FLOWER_UNAUTHENTICATED_API"] = "true"  # --no-auth: the REST API is open too, as asked
    _log(f"Flower on http://{args.address}:{args.port} for {redact(settings.broker_url)} "
         f"({'basic auth' if auth else 'NO AUTHENTICATION'})")
    os.execve(sys.executable, cmd, env)


def _read_auth_file(path: str | None) -> str | None:
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            pairs = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    except OSError as e:
        raise NasqError(f"--basic-auth-file {path}: {e.strerror}") from None
    if not pairs:
        raise NasqError(f"--basic-auth-file {path} holds no user:password line")
    return ",".join(pairs)


def _one_device(text: str) -> str:
    from .config import parse_device

    try:
        parse_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _metrics_args(p) -> None:
    p.add_argument("--port", type=int_in(1, 65535), default=9808, help="default: 9808")
    p.add_argument("--address", default="127.0.0.1", help="listen address (default: 127.0.0.1)")
    p.add_argument("--recent", type=int_in(1, 1000), default=20, help="ended runs to keep exporting (default: 20)")
    p.add_argument("--broker", help="Redis URL (default: $NASQ_BROKER_URL)")


def cmd_metrics(args) -> int:
    import time

    from .queue.metrics import serve

    store = _store(args)
    serve(store, port=args.port, address=args.address, recent=args.recent)
    _log(f"run metrics on http://{args.address}:{args.port}/metrics (Ctrl-C stops)")
    while True:
        time.sleep(3600)


def cmd_worker(argv: list[str]) -> int:
    # The worker runs in a fresh interpreter so its device pinning is in place before any
    # framework is imported; `python -m workers` owns the flags (see `nasq worker --help`).
    os.execv(sys.executable, [sys.executable, "-m", "workers", *argv])


# ------------------------------------------------------------------------------ the parser

COMMANDS = [
    ("eval", "evaluate a checkpoint on an image folder across workers",
     "Evaluate NASNet-Large on a dataset folder. Without a broker (--broker or NASQ_BROKER_URL) nasq starts a private "
     "Redis and one worker per device, runs, and stops them; with one, it submits to the workers already running and "
     "waits.", _eval_args, cmd_eval),
    ("demo", "generate images and a random-weight checkpoint, then run a full local evaluation",
     "Self-contained demo: generated natural-looking JPEGs, a Cadene-format checkpoint with random (calibrated) "
     "weights, labels from the fp32 reference model, and a full embedded distributed evaluation. A correct pipeline "
     "scores ~100%% top-1.", _demo_args, cmd_demo),
    ("preprocess", "JPEG folder -> .bin files (seed layout) or uint8 shards",
     "Preprocess images exactly as the seed (resize 378, crop 331). Parallel, resumable.",
     _preprocess_args, cmd_preprocess),
    ("build", "build (or reuse) a verified model artifact on the build queue",
     "Checkpoint -> ONNX (export, simplify, graph check) -> device artifact, each step verified against PyTorch "
     "fp32. Built once per key (weights, options, tool versions); a repeat is a cache hit. Without a broker a "
     "private Redis and build worker run it.", _build_args, cmd_build),
    ("bench", "latency and throughput per batch size, with eager baselines in the same process",
     "Benchmark a backend configuration: warm-up, enough iterations for stable numbers, min/mean/median/p99 latency, "
     "throughput (batch * 1000 / mean ms), peak memory; plus eager fp32 (and eager fp16 on CUDA) measured in the "
     "same process for a ratio.", _bench_args, cmd_bench),
    ("status", "progress of a run (shards, images/s, ETA, errors, workers)",
     "Show a run's progress from its records in Redis: any machine with the broker URL can watch. Without RUN_ID: "
     "the latest run.", _status_args, cmd_status),
    ("resume", "finish a failed run: rerun only its failed or missing shards, then merge",
     "Resubmit the shards of RUN_ID that failed or have no stored result (same task ids, same queue) and merge them "
     "with the results the run already has.", _resume_args, cmd_resume),
    ("runs", "list runs (the broker's and the history in the report dir) with state and headline numbers",
     "Recent runs, newest first, from the broker and from the run history in the report dir (which outlives "
     "Redis); filter by state, backend or age; --json or --csv to export.", _runs_args, cmd_runs),
    ("compare", "compare two runs: accuracy on the images both saw, with a significance test",
     "Top-1 of both runs on the images both saw, the difference with a 95%% confidence interval and McNemar's "
     "exact test, images whose top-1 class changed, throughput per device, and the configuration differences.",
     _compare_args, cmd_compare),
    ("cancel", "cancel a running run (its partial report is kept)",
     "Revoke the run's queued and running shards (a running one is stopped), mark it cancelled and keep what "
     "finished as a partial report.", _cancel_args, cmd_cancel),
    ("sweep", "queue a batch-size sweep on the workers and report it (tables and plots)",
     "One queued job per (device, batch size): bench mode times compute, eval mode evaluates the data (throughput "
     "plus top-1/top-5). Points an identical sweep already measured are reused. Writes JSON, CSV, Markdown and two "
     "PNG plots.", _sweep_args, cmd_sweep),
    ("sweeps", "list recorded batch-size sweeps, or resume one",
     "The sweeps in the report dir with their state (points measured of all, errors). --resume SWEEP_ID runs only "
     "the points not measured yet (a restarted worker on the same device continues its sweep).", _sweeps_args,
     cmd_sweeps),
    ("metrics", "serve run-level Prometheus metrics (images done, img/s, state, top-1 so far)",
     "An HTTP endpoint for Prometheus with what Flower lacks: per run its images done and total, img/s, state and "
     "top-1 so far, per worker its img/s, and the live workers. Each scrape reads the broker.", _metrics_args,
     cmd_metrics),
    ("flower", "start Flower on the nasq broker, with authentication",
     "Start Flower (task and worker monitoring) against the same broker, with basic auth on by default. Workers send "
     "task events, so runs show live.", _flower_args, cmd_flower),
]


EXAMPLES = {
    "eval": "nasq eval --weights nasnetalarge-a1897284.pth --data /data/imagenet/val -b 8 --json r.json\n  "
            "nasq eval --backend ais_bench --weights nasnetalarge-a1897284.pth --soc-version Ascend310P3 "
            "--gears 1,4,8 -b 8 --device npu:0,npu:1 --data /data/imagenet/val",
    "demo": "nasq demo --images 64 --workers 2",
    "preprocess": "nasq preprocess /data/imagenet/val /data/val-u8 --format u8",
    "build": "nasq build --weights nasnetalarge-a1897284.pth --target om --soc-version Ascend310P3 -b 1,8",
    "bench": "nasq bench --device cuda:0 --precision fp16 -b 1,8,64",
    "status": "nasq status 20261126-101500-ab12cd --watch --broker redis://head:6379/0",
    "resume": "nasq resume 20261126-101500-ab12cd --broker redis://head:6379/0",
    "runs": "nasq runs --state done --since 30 --csv > runs.csv",
    "compare": "nasq compare 20261120-090000-aaaaaa 20261126-101500-ab12cd",
    "cancel": "nasq cancel 20261126-101500-ab12cd --broker redis://head:6379/0",
    "sweep": "nasq sweep --weights w.pth --data /data/val -b 1,4,8,16,32,64 --broker redis://head:6379/0",
    "sweeps": "nasq sweeps --resume sweep-0123456789ab",
    "metrics": "nasq metrics --port 9808 --broker redis://head:6379/0",
    "flower": "nasq flower --basic-auth-file /etc/nasq/flower-users --broker redis://head:6379/0",
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog="nasq", description="Distributed NASNet-Large evaluation on device-pinned Celery workers.",
                epilog="Errors are one line; --debug (anywhere on the line) shows the traceback too.")
    p.add_argument("--version", action="version", version=f"nasq {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, help_, description, add_args, run in COMMANDS:
        add_args(sub.add_parser(name, help=help_, description=description or help_,
                                epilog=("examples:" if "\n" in EXAMPLES[name] else "example:") + "\n  " + EXAMPLES[name], formatter_class=argparse.RawDescriptionHelpFormatter))
        sub.choices[name].set_defaults(func=run)
    sub.add_parser("worker", add_help=False, help="start a Celery worker pinned to one device (see `nasq worker --help`)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "worker":
        return cmd_worker(argv[1:])
    debug = "--debug" in argv or os.environ.get("NASQ_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .queue.session import BROKER_ERRORS

    def fail(message: str, code: int = 2) -> int:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"nasq {args.command}: error: {message}", file=sys.stderr)
        return code

    try:
        return args.func(args)
    except NasqError as e:
        return fail(str(e))
    except BROKER_ERRORS as e:
        return fail(f"lost the broker ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); "
                    "check --broker / NASQ_BROKER_URL and that Redis is up")
    except OSError as e:
        return fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: one line, the traceback with --debug
        return fail(f"internal error ({type(e).__name__}: {e}); rerun with --debug for the traceback and report it", 1)


if __name__ == "__main__":
    sys.exit(main())
