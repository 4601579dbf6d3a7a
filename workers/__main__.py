"""``nasq worker`` / ``python -m workers``: a Celery worker pinned to one device.

The pinning environment is set first, before anything imports torch, onnxruntime or
Ascend's runtime. Then the flags and the settings become one frozen ``WorkerConfig``, handed
to the tasks (``workers.app.configure``). The worker runs the prefork pool with one child
(the parent stays responsive for heartbeats and Flower; a crashed child turns into a
requeue), consumes the backend's evaluation queue by default plus its own queue, sends task
events when asked (the ``task_events`` setting, or Flower's enable_events), and prefetches one
task.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from dataclasses import replace

from workers import pinning


def build_parser() -> argparse.ArgumentParser:
    from nasq import backends
    from nasq.flags import Parser, add_option_flags, broker_flag, int_in

    p = Parser(
        prog="nasq worker", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Start a Celery worker pinned to one device. It loads the model once, on its "
                    "first task, and reuses it for every shard.",
        epilog="Example: nasq worker --device cuda:0 --backend torch --broker redis://head:6379/0\n"
               "Other Celery worker options are passed through (e.g. --max-tasks-per-child 100); the pool is "
               "always one process, so -c/--concurrency other than 1 is refused.")
    p.add_argument("--device", default="cpu", help="cpu, cuda:N or npu:N (default: cpu)")
    p.add_argument("--backend", default="torch", choices=backends.names(), help="inference runtime (default: torch)")
    add_option_flags(p)
    p.add_argument("-Q", "--queues", default=None,
                   help="comma-separated queues to consume (default: eval.<backend>; 'build' makes a build-only worker)")
    p.add_argument("-n", "--name", "--hostname", dest="name", default=None,
                   help="Celery node name (default: <device>-<pid>@<host>)")
    p.add_argument("--read-root", action="append", default=[], metavar="DIR",
                   help="a folder this worker may read (data, weights, labels); repeatable; added to the read_roots "
                        "setting. Its artifact and report directories are always allowed")
    p.add_argument("--write-root", action="append", default=[], metavar="DIR",
                   help="a folder this worker may write (--output of runs, sweeps); repeatable; added to the "
                        "write_roots setting")
    broker_flag(p)
    p.add_argument("--settings", metavar="FILE", help=argparse.SUPPRESS)  # an embedded run's own settings file
    p.add_argument("-l", "--loglevel", default="INFO", help="log level (default: INFO)")
    p.add_argument("-c", "--concurrency", type=int_in(1, 1), default=1,
                   help="always 1: one process per device (a second would load a second model on it)")
    p.add_argument("--logfile", default=None, help="write the worker log here instead of stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, celery_extra = parser.parse_known_args(argv)
    _check_celery_options(parser, celery_extra)
    from nasq import backends
    from nasq.errors import NasqError

    try:  # the device is there (before pinning: indices count what this process may see)
        backends.backend_class(args.backend).check_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    except NasqError as e:
        parser.exit(2, f"nasq worker: error: {e}\n")
    try:
        local_device, physical = pinning.apply(args.device, args.threads)
    except ValueError as e:
        parser.error(str(e))
    from nasq.config import WorkerConfig, load_settings, settings_from_file
    from nasq.flags import options_from
    from nasq.wire import BUILD_QUEUE, eval_queue, worker_queue

    options = options_from(args)
    try:
        backends.check_options(args.backend, options.precision, options.compile)
    except NasqError as e:
        parser.error(str(e))
    if args.sim is not None and args.backend != "sim":
        parser.error("--sim goes with --backend sim (a simulated device)")
    if args.backend == "sim":
        from nasq.backends.sim_backend import parse_sim

        try:
            parse_sim(args.sim)
        except NasqError as e:
            parser.error(str(e))
        print(f"nasq worker: SIMULATED device ({args.sim or 'rate=310p3'}): for queue tests, not a measurement",
              file=sys.stderr)
    try:
        settings = settings_from_file(args.settings, broker_url=args.broker) if args.settings \
            else load_settings(broker_url=args.broker)
    except NasqError as e:
        parser.error(str(e))
    if not settings.broker_url:
        parser.error("no broker. Pass --broker redis://HOST:6379/0 or set NASQ_BROKER_URL "
                     "(`nasq eval` without a broker starts its own private Redis and workers)")
    roots = [os.pathsep.join([getattr(settings, f"{kind}_roots"), *map(os.path.abspath, extra)]).strip(os.pathsep)
             for kind, extra in (("read", args.read_root), ("write", args.write_root))]
    settings = replace(settings, read_roots=roots[0], write_roots=roots[1])
    _wait_for_broker(settings, parser)
    name = (args.name or f"{args.device.replace(':', '')}-{os.getpid()}@%h").replace("%h", socket.gethostname())
    queues = (args.queues or eval_queue(args.backend)).split(",")
    if BUILD_QUEUE not in queues:
        queues.append(worker_queue(name))  # sweeps send a point to this one device
    config = WorkerConfig(settings=settings, device=args.device, local_device=local_device, backend=args.backend,
                          options=options, queues=tuple(queues), name=name, physical_device=physical)
    from workers.app import app, configure

    try:
        configure(config)
    except NasqError as e:
        parser.exit(2, f"nasq worker: error: {e}\n")
    if _answers(settings, name):
        parser.error(f"a worker named {name} is already running on this broker; give this one another --name")
    worker_argv = ["worker", "--pool", "prefork", "--concurrency", "1", "--queues", ",".join(queues),
                   "--hostname", name, "--prefetch-multiplier", "1",
                   "--loglevel", args.loglevel, "--without-gossip", "--without-mingle", "-O", "fair",
                   "--heartbeat-interval", f"{settings.worker_heartbeat_s:g}"]
    if settings.task_events:
        worker_argv.append("--task-events")
    if args.logfile:
        worker_argv += ["--logfile", args.logfile]
    worker_argv += celery_extra  # other Celery worker options, as given
    app.worker_main(worker_argv)
    return 0


def _check_celery_options(parser, extra: list[str]) -> None:
    """Options not ours must be Celery worker options (passed through); anything else is a typo."""
    if not extra:
        return
    from celery.bin.worker import worker as celery_worker

    known = {o.split("=")[0] for p in celery_worker.params for o in (*p.opts, *p.secondary_opts)}
    # the pool is one prefork child per device: options that change it would load more models
    fixed = ("-P", "--pool", "--autoscale", "--concurrency")
    if not extra[0].startswith("-"):
        parser.error(f"unexpected argument {extra[0]!r}")
    for a in extra:
        opt = a.split("=")[0]
        if any(opt == f or (len(f) == 2 and opt.startswith(f)) for f in fixed):
            parser.error(f"{opt}: the pool is one process per device (a second would load a second model on it)")
        if a.startswith("-") and opt not in known and not (len(opt) > 2 and opt[:2] in known and opt[1] != "-"):
            parser.error(f"unrecognized argument {opt} (neither a nasq worker nor a Celery worker option)")


def _wait_for_broker(settings, parser) -> None:
    """Until the broker answers a PING (each try bounded by the settings' timeouts). A refused
    password ends the worker at once, with one line; an unreachable broker is waited for (a
    compose stack starts its workers with Redis), saying so every 30 s. Celery's signal
    handlers are not installed yet: SIGTERM ends the process at once."""
    import time

    from nasq.config import redact
    from nasq.queue.broker import BrokerAuthError, BrokerError, probe

    said = 0.0
    while True:
        try:
            probe(settings)
            return
        except BrokerAuthError as e:
            parser.exit(2, f"nasq worker: error: {e}\n")
        except BrokerError as e:
            if time.time() - said >= 30:
                said = time.time()
                print(f"nasq worker: waiting for the broker {redact(settings.broker_url)}: {e}", file=sys.stderr,
                      flush=True)
            time.sleep(2.0)


def _answers(settings, name: str) -> bool:
    """Does a live worker of that name answer a ping? Asked from a forked child: a process that
    has talked to the broker through kombu cannot fork a working pool afterwards."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            from nasq.queue.app import make_app

            code = 0 if make_app(settings).control.ping(destination=[name], timeout=1.0) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


if __name__ == "__main__":
    sys.exit(main())
