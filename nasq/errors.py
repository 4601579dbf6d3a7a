"""Errors that reach the user: each message says what went wrong and what to do. Each carries
the exit status the CLI ends with (the table in ``nasq --help`` and docs/OPERATIONS.md)."""


class NasqError(Exception):
    """Base class: the CLI prints the message (no traceback) and exits with ``exit_code``: 2, a
    usage error or bad input (a flag, a file, no such run)."""

    exit_code = 2


class CheckpointError(NasqError):
    """A checkpoint file that cannot be used (missing, corrupt, wrong layout, md5 mismatch)."""


class DatasetError(NasqError):
    """A dataset folder, shard set or label file that cannot be used."""


class BackendError(NasqError):
    """An unknown backend, or one that cannot run here."""


class RunError(NasqError):
    """An evaluation run that failed: missing or failed shards, lost workers (exit 3)."""

    exit_code = 3


class RunCancelled(RunError):
    """The run was cancelled (exit 4)."""

    exit_code = 4


class BrokerTrouble(NasqError):
    """The broker is unreachable, went away, is full, or lost the run (exit 5)."""

    exit_code = 5


class RunLost(BrokerTrouble, RunError):
    """The broker lost the run's records (a restart without persistence, expiry): exit 5."""

    exit_code = 5


class ShardFailed(RunError):
    """A shard that could not be evaluated (its task ends in FAILURE, visible as such in Flower)."""
