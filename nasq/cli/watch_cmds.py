"""The commands that watch and report: status, runs, compare, sweep, sweeps, metrics, flower."""
from __future__ import annotations

import json
import os
import sys

from ..config import MAX_BATCH_SIZE
from ..errors import NasqError
from ..flags import broker_flag, int_in, int_list, seconds
from .common import backend_flags, log, out_dir, settings_of, store_of


def _status_args(p) -> None:
    p.add_argument("run_id", nargs="?", help="the run (default: the most recent one)")
    p.add_argument("--watch", action="store_true", help="refresh until the run ends, then print its report")
    p.add_argument("--interval", type=seconds(3600), default=1.0, help="seconds between refreshes (default: 1)")
    p.add_argument("--json", action="store_true", help="print the status (and the report, once done) as JSON")
    broker_flag(p)


def cmd_status(args) -> int:
    from ..results.report import render
    from ..results.status import failing_devices, render_failing, render_status, run_status, watch
    from ..runstate import RunState, is_ended

    store = store_of(args)
    run_id = args.run_id or next(iter(store.runs.run_ids(1)), None)
    if run_id is None:
        raise NasqError("no runs recorded in this Redis yet")
    from .exits import OK, RUN_CANCELLED, RUN_FAILED

    code = {RunState.FAILED: RUN_FAILED, RunState.CANCELLED: RUN_CANCELLED}
    if args.json:
        st = watch(store, run_id, interval=args.interval, out=open(os.devnull, "w")) if args.watch \
            else run_status(store, run_id)
        report = store.runs.report(run_id)
        print(json.dumps({**st, "report": report.to_payload() if report else None,
                          "failing_devices": failing_devices(store)}, indent=2))
        return code.get(st["state"], OK)
    st = watch(store, run_id, interval=args.interval) if args.watch else run_status(store, run_id)
    if not args.watch:
        print(render_status(st))
    elif not sys.stdout.isatty():  # the watch printed each new first line: the rest of the last status
        rest = render_status(st).split("\n", 1)[1:]
        if rest:
            print(rest[0])
    failing = failing_devices(store)
    if failing:
        print(render_failing(failing))
    report = store.runs.report(run_id)
    if is_ended(st["state"]) and report:  # a failed or cancelled run's report names what it lacks, and why
        print()
        print(render(report))
        if report.files:  # (--watch: once the plots are rendered too)
            absent = store.runs.wait_rendered(run_id, report, timeout_s=120.0 if args.watch else 0.0)
            print(f"\nreport files: {', '.join(p for p in report.files.values() if os.path.basename(p) not in absent)}")
            if absent:
                print(f"not there: {', '.join(absent)} ({next(iter(absent.values()))})")
    return code.get(st["state"], OK)


def _runs_args(p) -> None:
    p.add_argument("--limit", type=int_in(1, 100_000), default=20, help="how many (default: 20)")
    from ..runstate import ALL

    p.add_argument("--state", choices=ALL, help="only these")
    p.add_argument("--backend", help="only runs of this backend")
    p.add_argument("--since", type=seconds(), metavar="DAYS", help="only runs created in the last DAYS days")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the rows as JSON")
    out.add_argument("--csv", action="store_true", help="print the rows as CSV")
    broker_flag(p, "the run history only")


def cmd_runs(args) -> int:
    from ..api import list_runs
    from ..results.status import iso_times, runs_csv, runs_table

    rows = list_runs(state=args.state, backend=args.backend, since_days=args.since, limit=args.limit,
                     settings=settings_of(args))
    if args.json:
        print(json.dumps(iso_times(rows), indent=2))
    elif args.csv:
        sys.stdout.write(runs_csv(rows))
    else:
        print(runs_table(rows) if rows else "no runs recorded yet")
    return 0


def _compare_args(p) -> None:
    p.add_argument("run_a", help="the baseline run")
    p.add_argument("run_b", help="the run compared with it")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    broker_flag(p, "the report dir")


def cmd_compare(args) -> int:
    from ..api import compare_runs
    from ..results.compare import render

    from .exits import NOT_COMPARABLE, OK

    c = compare_runs(args.run_a, args.run_b, settings=settings_of(args))
    print(json.dumps(c, indent=2) if args.json else render(c))
    if not c["comparable"]:
        print(f"nasq compare: warning: {c['warnings'][0]} (exit {NOT_COMPARABLE})", file=sys.stderr)
        return NOT_COMPARABLE
    return OK


def _sweep_args(p) -> None:
    p.add_argument("--weights", required=True, help="checkpoint (or built model for the backend)")
    p.add_argument("--data", required=True, help="dataset folder (images for bench mode, the dataset for eval mode)")
    p.add_argument("-b", "--batch-sizes", type=int_list(1, MAX_BATCH_SIZE), required=True,
                   help="comma-separated, e.g. 1,4,8,16,32,64")
    backend_flags(p)
    p.add_argument("--devices", type=lambda t: [x for x in t.split(",") if x],
                   help="worker names (with a broker; default: every live worker of the backend) or local devices "
                        "such as cpu,cuda:0 (without one)")
    p.add_argument("--workers", type=int_in(1, 64), help="without a broker: local CPU workers (default: 2)")
    p.add_argument("--mode", default="bench", choices=("bench", "eval"), help="default: bench")
    p.add_argument("--labels", help="eval mode: val_label.txt (default: beside the data)")
    p.add_argument("--images", type=int_in(1, 10_000_000), help="eval mode: only the first N images")
    p.add_argument("--min-time", type=seconds(3600), default=2.0, help="bench mode: timed seconds per point (default: 2)")
    p.add_argument("--stability", type=seconds(100, "a percentage"), default=5.0, metavar="PCT",
                   help="bench mode: time a point until the median of its last window is within PCT %% of the one "
                        "before, up to 5 x --min-time (default: 5)")
    broker_flag(p, "private local workers")
    _decision_flags(p)
    p.add_argument("--no-wait", action="store_true", help="with a broker: print the sweep id and return")


def _decision_flags(p) -> None:
    p.add_argument("--latency-budget", type=seconds(what="a number of milliseconds"), metavar="MS",
                   help="also name per device the batch size of the highest throughput whose latency at "
                        "--percentile is at most MS milliseconds")
    p.add_argument("--percentile", type=int, choices=(50, 90, 95, 99), default=99,
                   help="the latency percentile --latency-budget is judged at (default: 99)")
    p.add_argument("--out", help="write the report files here (default: the sweep's folder)")



def _finish_sweep(handle, args) -> int:
    if args.no_wait:
        if handle.cluster is not None:
            handle.close()
            raise NasqError("--no-wait needs a broker: without one the sweep's private workers stop with this command")
        print(handle.sweep_id)
        return 0
    try:
        handle.wait(progress=True, log=log)
    finally:
        handle.close()
    rep = handle.report(args.out, latency_budget_ms=args.latency_budget, percentile=args.percentile)
    print(rep.markdown)
    for kind, path in rep.files.items():
        print(f"{kind:<10} {path}")
    return 0


def cmd_sweep(args) -> int:
    from ..api import submit_sweep

    out_dir("--out", args.out)
    handle = submit_sweep(batch_sizes=args.batch_sizes, weights=args.weights, data=args.data, backend=args.backend,
                          precision=args.precision, devices=args.devices, workers=args.workers, mode=args.mode,
                          labels=args.labels, images=args.images, min_time_s=args.min_time,
                          stability_pct=args.stability, broker=args.broker, log=log)
    return _finish_sweep(handle, args)


def _sweeps_args(p) -> None:
    broker_flag(p, "private local workers")
    p.add_argument("--resume", metavar="SWEEP_ID", help="run the points a recorded sweep has not measured yet (the "
                                                        "measured ones are reused), then report it")
    p.add_argument("--workers", type=int_in(1, 64), help="--resume without a broker: local CPU workers (default: 2)")
    p.add_argument("--json", action="store_true", help="list as JSON")
    _decision_flags(p)
    p.add_argument("--no-wait", action="store_true", help="--resume with a broker: print the sweep id and return")


def cmd_sweeps(args) -> int:
    from ..api import list_sweeps, resume_sweep
    from ..results.sweeps import sweeps_table

    settings = settings_of(args)
    if not args.resume and (args.latency_budget is not None or args.out or args.percentile != 99):
        raise NasqError("--latency-budget, --percentile and --out report a sweep: give it with --resume SWEEP_ID "
                        "(a sweep measured already reports at once, without running anything)")
    if args.resume:
        out_dir("--out", args.out)
        return _finish_sweep(resume_sweep(args.resume, settings=settings, workers=args.workers, log=log), args)
    sweeps = list_sweeps(settings=settings)
    if args.json:
        print(json.dumps([{k: v for k, v in s.items() if k != "spec"} for s in sweeps], indent=2))
        return 0
    if not sweeps:
        print(f"no sweeps in {os.path.join(settings.report_dir, 'sweeps')}")
        return 0
    print(sweeps_table(sweeps))
    return 0


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
    broker_flag(p)


def cmd_flower(args) -> int:
    from ..queue.flower import launch, read_auth_file

    from ..config import flower_auth_from_env

    auth = args.basic_auth or read_auth_file(args.basic_auth_file) or flower_auth_from_env()
    launch(settings_of(args), address=args.address, port=args.port, auth=auth, open_=args.no_auth,
           max_tasks=args.max_tasks, log=log)


def _metrics_args(p) -> None:
    p.add_argument("--port", type=int_in(1, 65535), default=9808, help="default: 9808")
    p.add_argument("--address", default="127.0.0.1", help="listen address (default: 127.0.0.1)")
    p.add_argument("--recent", type=int_in(1, 1000), default=20, help="ended runs to keep exporting (default: 20)")
    broker_flag(p)


def cmd_metrics(args) -> int:
    from ..queue.metrics import serve_forever

    serve_forever(store_of(args), port=args.port, address=args.address, recent=args.recent, log=log)


def _cache_args(p) -> None:
    p.add_argument("action", choices=("warm", "info"), help="warm: read a dataset into this host's cache; info: what "
                                                          "the cache holds")
    p.add_argument("data", nargs="?", help="warm: the dataset folder (JPEGs, .bin files or u8 shards)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_cache(args) -> int:
    from ..api.hostcache import host_cache_info, warm_host_cache

    if args.action == "warm":
        if not args.data:
            raise NasqError("nasq cache warm needs the dataset folder: nasq cache warm /shared/data/val_u8")
        warm_host_cache(data=args.data, settings=settings_of(args), progress=not args.no_progress, log=log)
        return 0
    info = host_cache_info(settings=settings_of(args))
    print(f"{info.root}: {info.entries} images, {info.bytes / 1e9:.2f} GB of {info.bound_gb:g} GB")
    return 0
