"""The exit codes of every nasq command (``nasq --help`` lists them)."""
from __future__ import annotations

OK = 0
#: a bug in nasq: the one-line error says to rerun with --debug and report it
INTERNAL = 1
#: a bad flag or bad input (no such file, no such run, a bad checkpoint)
USAGE = 2
#: the run failed (a partial report names the failed shards)
RUN_FAILED = 3
#: the run was cancelled
RUN_CANCELLED = 4
#: the broker could not be reached, went away, or lost the run
BROKER = 5
#: ``nasq compare``: the runs share no labelled image, or were run on other datasets or labels
NOT_COMPARABLE = 6

TABLE = ((OK, "ok"), (INTERNAL, "internal error (a bug: rerun with --debug and report it)"),
         (USAGE, "usage or bad input (a flag, a file, no such run)"), (RUN_FAILED, "the run failed"),
         (RUN_CANCELLED, "the run was cancelled"), (BROKER, "the broker is unreachable, full, or lost the run"),
         (NOT_COMPARABLE, "compare: the runs are not comparable (no shared images, other dataset or labels)"))
