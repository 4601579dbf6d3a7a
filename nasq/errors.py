"""Errors that reach the user: each message says what went wrong and what to do."""


class NasqError(Exception):
    """Base class: the CLI prints the message (no traceback) and exits with status 2."""


class CheckpointError(NasqError):
    """A checkpoint file that cannot be used (missing, corrupt, wrong layout, md5 mismatch)."""


class DatasetError(NasqError):
    """A dataset folder, shard set or label file that cannot be used."""


class BackendError(NasqError):
    """An unknown backend, or one that cannot run here."""


class RunError(NasqError):
    """An evaluation run that failed: missing or failed shards, lost workers."""


class ShardFailed(RunError):
    """A shard that could not be evaluated (its task ends in FAILURE, visible as such in Flower)."""
