"""What the commands share: the report, output-path and shared flags, the settings and the
run store of a command, and ``finish``, which prints a run's report and writes what was asked."""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import NasqError
from ..rundata import Report
from ..flags import EMBEDDED_ONLY, add_option_flags, broker_flag, int_in, wait_flags
from ..request import add_request_flags

EMBEDDED_NOTE = "; for the workers of an embedded run (with a broker, it is `nasq worker`'s and refused here)"


def backend_flags(p, options: tuple[str, ...] = (), *, precision_default: str | None = "fp32",
                  helps: dict | None = None) -> None:
    """--backend, --precision (default: ``precision_default``; None: the worker's) and the device
    ``options`` named, as declared once in ``config.BackendOptions``."""
    from .. import backends

    p.add_argument("--backend", default="torch", choices=backends.names(), help="inference runtime (default: torch)")
    what = "the run's precision" if precision_default is None else "the precision measured"
    add_option_flags(p, ["precision", *options], defaults={"precision": precision_default},
                     helps={"precision": f"{what}; fp16/bf16 take the CUDA fast path", **(helps or {})})


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def devices(text: str) -> str:
    from ..config import parse_device

    if text in ("auto", "cpu", "cuda"):
        return text
    for d in (x.strip() for x in text.split(",")):
        try:
            parse_device(d)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or a list such as cuda:0,cuda:1, not {d!r}") \
                from None
    return text


def one_device(text: str) -> str:
    from ..config import parse_device

    try:
        parse_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def ready(what: str, folder: str) -> None:
    """``folder`` exists (made if need be) and is writable, else one line naming ``what``."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise NasqError(f"{what}: cannot create {folder} ({e.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise NasqError(f"{what}: {folder} is not writable")


def out_file(flag: str, path: str | None) -> None:
    """Make sure ``path`` can be written before a long run: its folder is ready and it is not a
    folder itself (``-``: stdout)."""
    if path and path != "-":
        if os.path.isdir(path):
            raise NasqError(f"{flag} {path} is a folder; give a file name")
        ready(f"{flag} {path}", os.path.dirname(os.path.abspath(path)))


def out_dir(flag: str, path: str | None) -> None:
    if path:
        ready(f"{flag} {path}", path)


def settings_of(args):
    from ..config import load_settings

    return load_settings(broker_url=getattr(args, "broker", None))


def store_of(args):
    from ..queue.broker import probe
    from ..queue.store import RunStore

    settings = settings_of(args)
    if not settings.broker_url:
        raise NasqError("no broker: pass --broker redis://HOST:6379/0 or set NASQ_BROKER_URL (the runs of an embedded "
                        "`nasq eval` live in its private Redis and end with it)")
    probe(settings)
    return RunStore.for_settings(settings)


def report_flags(p) -> None:
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON here, whatever the run's ending "
                                                   "(its state field says which); - writes it to stdout (the table "
                                                   "goes to stderr)")
    p.add_argument("--predictions", metavar="PATH", help="write per-image top-5 here (.csv or .json)")
    wait_flags(p)


def check_report_paths(args) -> None:
    out_file("--json", args.json)
    out_file("--predictions", getattr(args, "predictions", None))


def show_numbers(result, args=None) -> None:
    """The run's table, printed as soon as the numbers are in (its plots come after): on stdout,
    or on stderr when stdout carries the JSON report (``--json -``)."""
    print(result.table, flush=True, file=sys.stderr if _json_on_stdout(args) else sys.stdout)


def _json_on_stdout(args) -> bool:
    return getattr(args, "json", None) == "-"


def write_report_json(args, report: Report | None, *, kept: str = "") -> None:
    """``--json``: the report (of any ending: done, failed, cancelled; its ``state`` says which)
    to the file, or to stdout for ``-``."""
    from ..files import write_json

    if not getattr(args, "json", None) or report is None:
        return
    if args.json == "-":
        sys.stdout.write(json.dumps(report.to_payload(), indent=2) + "\n")
        sys.stdout.flush()
        return
    try:
        write_json(report.to_payload(), args.json)
    except OSError as e:
        raise NasqError(f"could not write {args.json}: {e.strerror or e}" + (f"; {kept}" if kept else "")) from None
    log(f"report written to {args.json}")


def ended_with(args, error) -> None:
    """A run that failed or was cancelled: its partial report to ``--json`` all the same."""
    write_report_json(args, getattr(error, "report", None))


def finish(result, args, *, shown: bool = False) -> int:
    """The end of a command that ran an evaluation: its table (unless ``shown`` already), where
    its report files are (only once they are published, and only those that exist), what could
    not be written, and --json / --predictions."""
    from ..results.predictions import write_predictions

    if not shown:
        show_numbers(result, args)
    report = result.report
    files = report.files or {}
    on_disk = files.get("json")
    if result.embedded:  # the private Redis ends with this command
        kept = f"the report is in {on_disk}" if on_disk else "the report is the one printed above (no copy was kept)"
    else:
        kept = (f"the report is in {on_disk} and " if on_disk and not result.unpublished else "the report is ") + \
            f"in Redis (`nasq status {result.run_id} --json`, until it expires)"
    missing = {**(report.files_not_written or {}), **result.not_rendered}
    if result.unpublished:
        log(f"the report files are not in place yet ({result.unpublished}); {kept}")
    else:
        gone = [p for kind, p in files.items() if os.path.basename(p) not in result.not_rendered
                and not os.path.exists(p)]
        for kind, path in files.items():
            if os.path.basename(path) not in result.not_rendered and path not in gone:
                log(f"run report ({kind}): {path}")
        missing |= {os.path.basename(p): "not found where the report names it" for p in gone}
        if missing:
            folder = os.path.dirname(on_disk or next(iter(files.values()), ""))
            log(f"not written by the merging worker: {', '.join(missing)} ({next(iter(missing.values()))})"
                + (f"; the rest are in {folder}" if folder and os.path.isdir(folder) else ""))
    for text in (result.notes or {}).values():
        log(f"note: {text}")
    if missing or result.notes:
        log(kept)
    write_report_json(args, report, kept=kept)
    pred = result.predictions
    if getattr(args, "predictions", None) and pred is not None:
        try:
            write_predictions(pred, args.predictions)
        except OSError as e:
            raise NasqError(f"could not write {args.predictions}: {e.strerror or e}; {kept}") from None
        log(f"per-image predictions written to {args.predictions}")
    if not report.images:
        raise NasqError(f"no image could be evaluated ({report.error_count} unusable, listed above); "
                        "check the data folder")
    return 0


def submission_args(p) -> None:
    """The flags of a submission, made from its one declaration (``request.EvalRequest``):
    ``nasq eval`` and ``python -m producer`` share them; ``request_from_args`` reads them back."""
    add_request_flags(p)


def eval_args(p) -> None:
    submission_args(p)
    p.add_argument("--device", default="auto", type=devices,
                   help="embedded runs: auto, cpu, cuda or a list like cuda:0,cuda:1; indices count the GPUs "
                        "CUDA_VISIBLE_DEVICES leaves visible (default: auto)")
    p.add_argument("--workers", type=int_in(1, 256), help="embedded runs: number of local workers (default: one per device)")
    add_option_flags(p, EMBEDDED_ONLY, help_suffix=EMBEDDED_NOTE)
    broker_flag(p, "an embedded run: a private Redis and local workers for this command")
    report_flags(p)
