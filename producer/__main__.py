"""``python -m producer``: queue an evaluation on a running deployment and print its run id.

For jobs that should not wait (cron, CI, a notebook that submits many runs): follow the run
with ``nasq status RUN_ID --watch``, or ``nasq eval`` to submit and wait in one go.
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from nasq import backends
    from nasq.cli import MAX_BATCH, int_in, int_list

    p = argparse.ArgumentParser(prog="python -m producer", description=__doc__.splitlines()[0],
                                epilog="Example: python -m producer --broker redis://head:6379/0 --weights "
                                       "/shared/nasnetalarge-a1897284.pth --data /shared/val --batch-size 8")
    p.add_argument("--weights", required=True, help="Cadene-format checkpoint (.pth) or a built model for the backend")
    p.add_argument("--data", required=True, help="folder of JPEGs, of .bin files, or of u8 shards (same path on every worker)")
    p.add_argument("--labels", help="val_label.txt (default: one in or beside --data; none: no accuracy)")
    p.add_argument("--backend", default="torch", choices=backends.names(), help="inference runtime (default: torch)")
    p.add_argument("--precision", choices=backends.precisions(), help="default: each worker's")
    p.add_argument("-b", "--batch-size", type=int_in(1, MAX_BATCH), default=8,
                   help="images per forward pass (default: 8)")
    p.add_argument("--shard-size", type=int_in(1, 100_000),
                   help="images per shard task (default: <= 1000, several per worker)")
    p.add_argument("--allow-bad-labels", action="store_true",
                   help="go on when some labels are not ImageNet classes 0-999 (they count as misses)")
    p.add_argument("--queue", help="evaluation queue (default: eval.<backend>)")
    p.add_argument("--soc-version", help="ais_bench with a checkpoint: the chip to build the .om for, e.g. Ascend310P3")
    p.add_argument("--gears", type=int_list(1, MAX_BATCH),
                   help="ais_bench with a checkpoint: dynamic batch gears of the .om (default: a static .om of -b)")
    p.add_argument("--broker", help="Redis URL (default: $NASQ_BROKER_URL)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from nasq.api import submit_evaluation
    from nasq.errors import NasqError

    try:
        handle = submit_evaluation(weights=args.weights, data=args.data, labels=args.labels, backend=args.backend,
                                   precision=args.precision, batch_size=args.batch_size, shard_size=args.shard_size,
                                   queue=args.queue, broker=args.broker, allow_bad_labels=args.allow_bad_labels,
                                   soc_version=args.soc_version, gears=args.gears,
                                   log=lambda m: print(m, file=sys.stderr, flush=True))
    except NasqError as e:
        print(f"producer: error: {e}", file=sys.stderr)
        return 2
    print(handle.run_id)
    handle.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
