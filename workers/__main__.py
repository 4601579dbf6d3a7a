"""``nasq worker`` / ``python -m workers``: a Celery worker pinned to one device.

The pinning environment is set first, before anything imports torch, onnxruntime or
Ascend's runtime. The worker runs the prefork pool with one child (the parent stays
responsive for heartbeats and Flower; a crashed child turns into a requeue), consumes the
backend's evaluation queue by default, sends task events, and prefetches one task.
"""
from __future__ import annotations

import argparse
import os
import sys

from workers import pinning


def build_parser() -> argparse.ArgumentParser:
    from nasq import backends

    p = argparse.ArgumentParser(
        prog="nasq worker",
        description="Start a Celery worker pinned to one device. It loads the model once, on its "
                    "first task, and reuses it for every shard.",
        epilog="Example: nasq worker --device cuda:0 --backend torch --broker redis://head:6379/0")
    p.add_argument("--device", default="cpu", help="cpu, cuda:N or npu:N (default: cpu)")
    p.add_argument("--backend", default="torch", choices=backends.names(), help="inference runtime (default: torch)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"),
                   help="precision when a run does not set one; fp16/bf16 take the CUDA fast path (default: fp32)")
    p.add_argument("--queues", default=None,
                   help="comma-separated queues to consume (default: eval.<backend>; 'build' makes a build-only worker)")
    p.add_argument("--name", default=None, help="Celery node name (default: <device>-<pid>@<host>)")
    p.add_argument("--compile", choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   help="torch backend: torch.compile mode (compiled once per process; cache in the artifact dir)")
    p.add_argument("--cuda-graphs", action="store_true", help="torch backend: replay a CUDA graph per batch size")
    p.add_argument("--device-decode", action="store_true",
                   help="torch backend: decode JPEGs on the device (nvjpeg on CUDA; within 1/255 of Pillow per pixel)")
    p.add_argument("--decode-threads", type=int, default=None,
                   help="threads decoding JPEGs ahead of the device (default: 1 on cpu, 4 on cuda/npu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the runtime (default: the runtime's choice)")
    p.add_argument("--broker", default=None, help="Redis URL of the broker (default: $NASQ_BROKER_URL or the config file)")
    p.add_argument("--loglevel", default="INFO", help="log level (default: INFO)")
    p.add_argument("--logfile", default=None, help="write the worker log here instead of stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        pinning.apply(args.device, args.threads)
    except ValueError as e:
        print(f"nasq worker: error: {e}", file=sys.stderr)
        return 2
    os.environ["NASQ_WORKER_BACKEND"] = args.backend
    os.environ["NASQ_WORKER_PRECISION"] = args.precision
    os.environ["NASQ_DECODE_THREADS"] = str(args.decode_threads or (1 if args.device == "cpu" else 4))
    if args.compile:
        os.environ["NASQ_TORCH_COMPILE"] = args.compile
    if args.cuda_graphs:
        os.environ["NASQ_TORCH_CUDA_GRAPHS"] = "1"
    if args.device_decode:
        os.environ["NASQ_TORCH_DEVICE_DECODE"] = "1"
    if args.broker:
        os.environ["NASQ_BROKER_URL"] = args.broker

    from nasq.celery_app import eval_queue
    from nasq.config import load_settings

    settings = load_settings()
    if not settings.broker_url:
        print("nasq worker: error: no broker. Pass --broker redis://HOST:6379/0 or set NASQ_BROKER_URL "
              "(`nasq eval` without a broker starts its own private Redis and workers).", file=sys.stderr)
        return 2
    from workers.app import app

    import socket

    from nasq.celery_app import BUILD_QUEUE, worker_queue

    name = (args.name or f"{args.device.replace(':', '')}-{os.getpid()}@%h").replace("%h", socket.gethostname())
    queues = args.queues or eval_queue(args.backend)
    if BUILD_QUEUE not in queues.split(","):
        queues += "," + worker_queue(name)  # sweeps send a point to this one device
    os.environ["NASQ_WORKER_NAME"] = name
    os.environ["NASQ_WORKER_QUEUES"] = queues
    worker_argv = ["worker", "--pool", "prefork", "--concurrency", "1", "--queues", queues,
                   "--hostname", name, "--task-events", "--prefetch-multiplier", "1",
                   "--loglevel", args.loglevel, "--without-gossip", "--without-mingle", "-O", "fair"]
    if args.logfile:
        worker_argv += ["--logfile", args.logfile]
    app.worker_main(worker_argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
