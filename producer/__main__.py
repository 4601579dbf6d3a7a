"""``python -m producer``: queue an evaluation on a running deployment and print its run id.

For jobs that should not wait (cron, CI, a notebook that submits many runs): follow the run
with ``nasq status RUN_ID --watch``, or ``nasq eval`` to submit and wait in one go.
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from nasq.cli.common import submission_args
    from nasq.flags import Parser, broker_flag

    p = Parser(prog="python -m producer", description=__doc__.splitlines()[0],
               epilog="Example: python -m producer --broker redis://head:6379/0 --weights "
                      "/shared/nasnetalarge-a1897284.pth --data /shared/val --batch-size 8")
    submission_args(p)
    broker_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from nasq.api import submit_evaluation
    from nasq.errors import NasqError
    from nasq.request import request_from_args

    try:
        handle = submit_evaluation(request_from_args(args), broker=args.broker,
                                   log=lambda m: print(m, file=sys.stderr, flush=True))
    except NasqError as e:
        print(f"producer: error: {e}", file=sys.stderr)
        return e.exit_code  # 2 bad input, 5 the broker (nasq --help lists the codes)
    print(handle.run_id)
    handle.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
