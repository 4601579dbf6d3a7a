"""The Python API: keyword-only functions that return dataclasses; the CLI maps flags onto them.

Example::

    from nasq.api import evaluate
    result = evaluate(weights="nasnetalarge-a1897284.pth", data="/data/imagenet/val",
                      labels="/data/imagenet/val_label.txt", batch_size=32)
    print(result.report.top1, result.report.throughput_img_s)

Every check of the user's input (weights, data, labels, precision) happens before a Redis or a
worker starts (``checks``); the queue layer (``nasq.queue``) does the rest. By job: ``builds``,
``runs`` (evaluate, submit, resume), ``history`` (runs, compare, cancel), ``sweeps`` (bench, sweeps).
"""
from ..artifacts.store import BuildResult
from ..perf.bench import BenchResult
from .builds import build, cached_build, prepare_model
from .checks import check_weights, needs_build
from .history import cancel, compare_runs, list_runs, load_run
from .runs import EvalResult, RunHandle, evaluate, evaluate_local, resume, submit_evaluation
from .sweeps import SweepHandle, SweepReport, bench, list_sweeps, resume_sweep, submit_sweep

__all__ = ["BenchResult", "BuildResult", "EvalResult", "RunHandle", "SweepHandle", "SweepReport", "bench", "build",
           "cached_build", "cancel", "check_weights", "compare_runs", "evaluate", "evaluate_local", "list_runs",
           "list_sweeps", "load_run", "needs_build", "prepare_model", "resume", "resume_sweep", "submit_evaluation",
           "submit_sweep"]
