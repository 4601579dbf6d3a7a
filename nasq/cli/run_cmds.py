"""The commands that run something: eval, demo, preprocess, build, bench, resume, cancel."""
from __future__ import annotations

import shlex
import sys

from ..config import DEFAULT_BATCH_SIZE, MAX_BATCH_SIZE
from ..flags import broker_flag, int_in, int_list, seconds
from ..errors import RunError
from ..request import request_from_args
from .common import (backend_flags, check_report_paths, ended_with, finish, log, one_device, out_dir, out_file,
                     report_flags, settings_of, show_numbers)


def cmd_eval(args) -> int:
    from ..api import evaluate

    check_report_paths(args)
    out_dir("--output", args.output_dir)
    return _followed(args, lambda: evaluate(
        request_from_args(args), device=args.device, workers=args.workers,
        compile=None if args.compile == "none" else args.compile, cuda_graphs=args.cuda_graphs, kernels=args.kernels,
        broker=args.broker, progress=not args.no_progress, timeout=args.timeout, log=log,
        on_report=lambda r: show_numbers(r, args), rerun=shlex.join(["nasq", *sys.argv[1:]])))


def _followed(args, run) -> int:
    """A run followed to its end: its numbers as soon as they are in (``on_report``), then its
    files; a failed or cancelled one still writes its partial report to ``--json``."""
    try:
        result = run()
    except RunError as e:
        ended_with(args, e)
        raise
    return finish(result, args, shown=True)


def _demo_args(p) -> None:
    p.add_argument("--images", type=int_in(1, 100_000), default=64, help="number of images (default: 64)")
    p.add_argument("--workers", type=int_in(1, 64), default=2, help="local CPU workers (default: 2)")
    p.add_argument("--workdir", help="keep images, labels and checkpoint here (default: a temporary folder, removed)")
    p.add_argument("--arch", default="large", choices=("large", "tiny"), help="model size (default: large = NASNet-A Large)")
    p.add_argument("--backend", default="torch", choices=("torch", "onnxruntime"), help="inference runtime (default: torch)")
    p.add_argument("-b", "--batch-size", type=int_in(1, MAX_BATCH_SIZE), default=DEFAULT_BATCH_SIZE,
                   help="images per forward pass (default: %(default)s)")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON here (- : stdout)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_demo(args) -> int:
    import shutil
    import tempfile

    from ..api import evaluate
    from ..config import redact
    from ..demo import prepare

    out_file("--json", args.json)
    workdir = args.workdir or tempfile.mkdtemp(prefix="nasq-demo-")
    log("nasq demo: the checkpoint has RANDOM weights (BatchNorm calibrated on generated images); "
         "accuracy below only shows the pipeline is correct, not how good NASNet-Large is.")
    paths = prepare(workdir, args.images, arch=args.arch, batch_size=args.batch_size, log=log)
    settings = settings_of(args)
    if settings.broker_url:
        log(f"note: using the broker {redact(settings.broker_url)} from the environment/config; unset NASQ_BROKER_URL "
             "for a self-contained demo")
    result = evaluate(weights=paths["weights"], data=paths["data"], labels=paths["labels"], backend=args.backend,
                      device="cpu", workers=args.workers, batch_size=args.batch_size,
                      progress=not args.no_progress, settings=settings, log=log,
                      on_report=lambda r: show_numbers(r, args))
    rc = finish(result, args, shown=True)
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        log(f"images, labels and checkpoint kept in {workdir}")
    log("reminder: random weights -- top-1 ~100% means every image got the reference model's prediction.")
    return rc


def _preprocess_args(p) -> None:
    p.add_argument("src", help="folder of JPEG images")
    p.add_argument("dst", help="output folder")
    p.add_argument("--format", default="u8", choices=("bin", "u8"),
                   help="bin: one float32 .bin per image (ais_bench input); u8: compact uint8 shards (default)")
    p.add_argument("--workers", type=int_in(1, 1024), help="processes (default: all cores)")
    p.add_argument("--shard-size", type=int_in(1, 100_000), default=256, help="images per u8 shard (default: 256)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_preprocess(args) -> int:
    from ..data.preprocess import preprocess

    res = preprocess(args.src, args.dst, fmt=args.format, workers=args.workers, shard_size=args.shard_size,
                     progress=not args.no_progress)
    print(f"{res.images} images -> {res.dst} ({res.fmt}): {res.written} written, {res.skipped} already done, "
          f"{len(res.errors)} unusable")
    for name, reason in list(res.errors.items())[:20]:
        print(f"  {name}: {reason}")
    return 0


def _build_args(p) -> None:
    from ..artifacts.spec import TARGETS

    p.add_argument("--weights", required=True, help="Cadene-format checkpoint (.pth)")
    p.add_argument("--target", default="ort", choices=TARGETS,
                   help="onnx: verified ONNX; ort: + ONNX Runtime optimization; ov: + OpenVINO IR; om: + Ascend "
                        "ATC; trt: + TensorRT (default: ort)")
    p.add_argument("-b", "--batch-size", type=int_list(1, MAX_BATCH_SIZE),
                   help="fixed batch size(s), comma-separated: one artifact each (default: dynamic batch)")
    p.add_argument("--gears", type=int_list(1, MAX_BATCH_SIZE),
                   help="om: dynamic batch gears for ATC's --dynamic_batch_size, e.g. 1,4,8,16")
    p.add_argument("--opset", type=int_in(11, 21),
                   help="ONNX opset (default: 17; 11 for --target om, the opset the Ascend recipe gives ATC)")
    p.add_argument("--soc-version", help="om: the chip, e.g. Ascend310P3 (see `npu-smi info`)")
    p.add_argument("--num-outputs", type=int, choices=(1001, 1000),
                   help="1000 drops the background class (default: the checkpoint's)")
    p.add_argument("--tolerance", type=seconds(), default=1e-4, metavar="RATIO",
                   help="max |logit diff| / max |logit| per step, above 0 (default: 1e-4)")
    p.add_argument("--accept-tolerance", action="store_true", help="keep an artifact that misses the tolerance")
    broker_flag(p, "a private Redis and build worker for this command")
    p.add_argument("--timeout", type=seconds(), help="give up waiting after this many seconds (the build goes on)")
    p.add_argument("--json", metavar="PATH", help="write the artifact metadata here")


def cmd_build(args) -> int:
    from ..api import build
    from ..files import write_json

    out_file("--json", args.json)
    results = []
    for bs in ([None] if args.gears else args.batch_size or [None]):
        res = build(weights=args.weights, target=args.target, batch_size=bs, gears=args.gears, opset=args.opset,
                    soc_version=args.soc_version, num_outputs=args.num_outputs, tolerance=args.tolerance,
                    accept_tolerance=args.accept_tolerance, broker=args.broker, timeout=args.timeout, log=log)
        print(res.table + "\n")
        results.append({"key": res.key, "path": res.path, "cached": res.cached, "meta": res.meta})
    if args.json:
        write_json(results if len(results) > 1 else results[0], args.json)
    return 0


def _bench_args(p) -> None:
    backend_flags(p, ("compile", "cuda_graphs", "kernels", "device_decode"), helps={
        "device_decode": "torch backend, e2e mode: decode JPEGs on the device (nvjpeg on CUDA)"})
    p.add_argument("--device", default="cpu", type=one_device, help="cpu or cuda:N (default: cpu)")
    p.add_argument("-b", "--batch-sizes", type=int_list(1, MAX_BATCH_SIZE), default=[1, 4, 8],
                   help="comma-separated (default: 1,4,8)")
    p.add_argument("--mode", default="compute", choices=("compute", "e2e"),
                   help="compute: input already on the device; e2e: from JPEG files (decode, preprocess, transfer)")
    p.add_argument("--weights", help="checkpoint (default: a calibrated random-weight one, made once)")
    p.add_argument("--data", help="JPEG folder for e2e mode (default: generated images)")
    p.add_argument("--arch", default="large", choices=("large", "tiny"), help="with the default weights (default: large)")
    p.add_argument("--no-baseline", action="store_true", help="skip the eager baselines")
    p.add_argument("--min-time", type=seconds(3600), default=2.0,
                   help="seconds of timed iterations per point (default: 2)")
    p.add_argument("--json", metavar="PATH", help="write all rows and the environment here")


def cmd_bench(args) -> int:
    from ..api import bench
    from ..files import write_json

    out_file("--json", args.json)
    res = bench(backend=args.backend, device=args.device, precision=args.precision, compile=args.compile,
                cuda_graphs=args.cuda_graphs, kernels=args.kernels, device_decode=args.device_decode,
                batch_sizes=args.batch_sizes,
                mode=args.mode, weights=args.weights, data=args.data, arch=args.arch, baseline=not args.no_baseline,
                min_time_s=args.min_time, log=log)
    print(res.table)
    if args.json:
        write_json({"env": res.env, "rows": res.rows}, args.json)
        log(f"results written to {args.json}")
    return 0


def _resume_args(p) -> None:
    p.add_argument("run_id", help="the run to finish")
    broker_flag(p)
    report_flags(p)


def cmd_resume(args) -> int:
    from ..api import resume

    check_report_paths(args)
    return _followed(args, lambda: resume(args.run_id, broker=args.broker, progress=not args.no_progress,
                                          timeout=args.timeout, log=log, on_report=lambda r: show_numbers(r, args)))


def _cancel_args(p) -> None:
    p.add_argument("run_id", help="the run to cancel")
    broker_flag(p)


def cmd_cancel(args) -> int:
    from ..api import cancel

    partial = cancel(args.run_id, settings=settings_of(args), log=log)
    if partial and partial.files:
        log(f"partial report: {partial.files.get('json')}")
    return 0

