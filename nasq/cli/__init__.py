"""The ``nasq`` command: a thin adapter from flags to ``nasq.api``.

Each subcommand is a pair: ``_<name>_args(parser)`` (``eval_args`` for eval) declares its flags (choices come from the
registries: backends, precisions, compile modes, build targets; a worker's options from their
one declaration, ``config.BackendOptions``) and ``cmd_<name>(args)`` maps them onto one API call
and prints the result. Bad flags end in one line and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..config import debug_requested
from ..errors import NasqError
from ..flags import Parser
from . import exits
from .common import eval_args, finish
from .run_cmds import (_bench_args, _build_args, _cancel_args, _demo_args, _preprocess_args, _resume_args, cmd_bench,
                       cmd_build, cmd_cancel, cmd_demo, cmd_eval, cmd_preprocess, cmd_resume)
from .watch_cmds import (_cache_args, _compare_args, _flower_args, _metrics_args, _runs_args, _status_args,
                         _sweep_args, _sweeps_args, cmd_cache, cmd_compare, cmd_flower, cmd_metrics, cmd_runs,
                         cmd_status, cmd_sweep, cmd_sweeps)

__all__ = ["build_parser", "eval_args", "finish", "main"]


def cmd_worker(argv: list[str]) -> int:
    # The worker runs in a fresh interpreter so its device pinning is in place before any
    # framework is imported; `python -m workers` owns the flags (see `nasq worker --help`).
    os.execv(sys.executable, [sys.executable, "-P", "-m", "workers", *argv])


COMMANDS = [
    ("eval", "evaluate a checkpoint on an image folder across workers",
     "Evaluate NASNet-Large on a dataset folder. Without a broker (--broker or NASQ_BROKER_URL) nasq starts a private "
     "Redis and one worker per device, runs, and stops them; with one, it submits to the workers already running and "
     "waits.", eval_args, cmd_eval),
    ("demo", "generate images and a random-weight checkpoint, then run a full local evaluation",
     "Self-contained demo: generated natural-looking JPEGs, a Cadene-format checkpoint with random (calibrated) "
     "weights, labels from the fp32 reference model, and a full embedded distributed evaluation. A correct pipeline "
     "scores ~100% top-1.", _demo_args, cmd_demo),
    ("preprocess", "JPEG folder -> .bin files (ais_bench's input layout) or uint8 shards",
     "Preprocess images exactly as the reference model does (Cadene's TransformImage: resize 378 bilinear, center "
     "crop 331, mean = std = 0.5). Parallel, resumable.",
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
     "Resubmit the shards of RUN_ID that failed or have no stored result (each a new attempt, on the same queue) and merge them "
     "with the results the run already has.", _resume_args, cmd_resume),
    ("runs", "list runs (the broker's and the history in the report dir) with state and headline numbers",
     "Recent runs, newest first, from the broker and from the run history in the report dir (which outlives "
     "Redis); filter by state, backend or age; --json or --csv to export.", _runs_args, cmd_runs),
    ("compare", "compare two runs: accuracy on the images both saw, with a significance test",
     "Top-1 of both runs on the images both saw, the difference with a 95 % confidence interval for paired "
     "proportions (Newcombe) and McNemar's exact test, images whose top-1 class changed, throughput per device, and "
     "the configuration differences. Exits 6 with a warning when the runs share no labelled image or were run on "
     "other datasets or labels.",
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
    ("cache", "this host's cache of images read from shared storage: warm it with a dataset, or see what it holds",
     "Each worker host keeps the images its workers read on its local disk (host_cache_dir, host_cache_gb), named by "
     "their sha256 and verified when read. `warm` reads a whole dataset into it once (stage it before the runs: a run "
     "spreads its shards over the hosts, so each host caches only its share otherwise); `info` says what it holds.",
     _cache_args, cmd_cache),
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
    "cache": "nasq cache warm /shared/data/val_u8",
}


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = Parser(prog="nasq", description="Distributed NASNet-Large evaluation on device-pinned Celery workers.",
                epilog="Errors are one line; --debug (anywhere on the line) shows the traceback too.\n\nexit codes:\n"
                       + "\n".join(f"  {code}  {text}" for code, text in exits.TABLE),
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"nasq {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
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
    debug = "--debug" in argv or debug_requested()
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from ..queue.session import BROKER_ERRORS

    def fail(message: str, code: int = exits.USAGE) -> int:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"nasq {args.command}: error: {message}", file=sys.stderr)
        return code

    try:
        code = args.func(args)
        sys.stdout.flush()  # here, so that a reader that closed the pipe is met below
        return code
    except BrokenPipeError:  # `nasq runs --json | head`: the reader has what it wanted
        _quiet_stdout()
        return exits.OK
    except NasqError as e:
        return fail(str(e), e.exit_code)
    except BROKER_ERRORS as e:
        return fail(f"lost the broker ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); "
                    "check --broker / NASQ_BROKER_URL and that Redis is up", exits.BROKER)
    except OSError as e:
        return fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: one line, the traceback with --debug
        return fail(f"internal error ({type(e).__name__}: {e}); rerun with --debug for the traceback and report it",
                    exits.INTERNAL)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not complain about the
    pipe the reader closed."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass

