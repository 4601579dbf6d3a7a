"""A run's life: its states and the transitions between them, in one table.

    submitted --start--> running --merge--> done
    running --fail--> failed --resume--> running
    submitted, running, failed --cancel--> cancelled
    submitted --resume--> running   (a submission that was cut short)

The run store carries the table out atomically (``nasq.queue.store``: each transition is one
Redis script that checks the state it starts from), so a merge, a failure, a cancel and a
resume that race each other cannot both win: a done or cancelled run is never changed again,
and a failed one only by ``resume`` or ``cancel`` (its shards may still be running). Shard
results are accepted while a run is submitted, running or failed (a failed run's finished
shards are kept for ``nasq resume``) and dropped, and counted, once it is done or cancelled.

The shards' own vocabulary is here too: how a copy of a shard ends (``ShardStatus``), what the
run store's scripts answer (``Outcome``: the scripts are written with these names, never
spelled there), how a shard is taken to be sent again (``Redispatch``) and what an unfinished
shard is doing as ``nasq resume`` sees it (``Unfinished``).
"""
from __future__ import annotations

from enum import Enum


class _Named(str, Enum):
    """A name that is its value: printed, compared and hashed as that string (so a state read
    from Redis as text finds its member in a set or a dict)."""

    def __str__(self) -> str:
        return self.value

    __hash__ = str.__hash__


class RunState(_Named):
    SUBMITTED = "submitted"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Transition(_Named):
    START = "start"
    MERGE = "merge"
    FAIL = "fail"
    CANCEL = "cancel"
    RESUME = "resume"


#: the states a run ends in (nothing runs for it; a waiting client stops)
ENDED = frozenset({RunState.DONE, RunState.FAILED, RunState.CANCELLED})
#: the states in which a finished shard's result is kept
ACCEPTS_RESULTS = frozenset({RunState.SUBMITTED, RunState.RUNNING, RunState.FAILED})
#: the states in which a shard may start: a failed run's queued shards still run, so that
#: `nasq resume` has only the failed ones left to do (`nasq cancel` stops them)
MAY_START = ACCEPTS_RESULTS

#: transition -> (the states it may start from, the state it ends in)
TRANSITIONS: dict[Transition, tuple[frozenset, RunState]] = {
    Transition.START: (frozenset({RunState.SUBMITTED}), RunState.RUNNING),
    Transition.MERGE: (frozenset({RunState.SUBMITTED, RunState.RUNNING}), RunState.DONE),
    Transition.FAIL: (frozenset({RunState.SUBMITTED, RunState.RUNNING}), RunState.FAILED),
    # a failed run's shards may still be running (their results are kept for resume): it can be cancelled
    Transition.CANCEL: (frozenset({RunState.SUBMITTED, RunState.RUNNING, RunState.FAILED}), RunState.CANCELLED),
    # a run left submitted (its submission was cut short) is finished by a resume too
    Transition.RESUME: (frozenset({RunState.SUBMITTED, RunState.RUNNING, RunState.FAILED}), RunState.RUNNING),
}

ALL = tuple(s.value for s in RunState)


def may(transition: Transition, state) -> bool:
    """Whether a run in ``state`` (a ``RunState``, its value, or None: no such run) may go
    through ``transition`` (the question every "may this happen now" check asks this table)."""
    return state is not None and str(state) in {s.value for s in TRANSITIONS[transition][0]}


def ends_in(transition: Transition) -> RunState:
    """The state ``transition`` leaves a run in."""
    return TRANSITIONS[transition][1]


def is_ended(state: str | None) -> bool:
    return state in {s.value for s in ENDED}


def names(states) -> list[str]:
    return sorted(str(s) for s in states)


class ShardStatus(_Named):
    """How a copy of a shard ended (its result's ``status``)."""

    OK = "ok"
    ERROR = "error"
    #: not run, and nothing to do: its run ended, or its result is kept already
    SKIPPED = "skipped"
    #: not run by this worker (it may not take it): back on the queue for another
    REFUSED = "refused"
    #: given up while it ran: another copy holds it, or its run ended
    STOPPED = "stopped"


class Outcome(_Named):
    """What the run store's scripts answer (``nasq.queue.scripts``), with the reasons they give."""

    OK = "ok"
    #: no such run (its records expired or were flushed)
    GONE = "gone"
    #: the run is in a state that does not allow it (the state follows)
    ENDED = "ended"
    STATE = "state"
    #: the shard's result is kept already
    HAS_RESULT = "has-result"
    #: the shard was started ``max_attempts`` times
    EXHAUSTED = "exhausted"
    #: the run holds the shard against this worker: it is ``EXCLUDED`` from the run, or the shard
    #: ``FAILED_HERE`` before
    REFUSED = "refused"
    EXCLUDED = "excluded"
    FAILED_HERE = "failed-here"
    #: a running copy stops: the run's state, ``SUPERSEDED`` (another copy holds the lease) or
    #: ``DONE_ELSEWHERE`` (another copy's result was kept)
    STOP = "stop"
    SUPERSEDED = "superseded"
    DONE_ELSEWHERE = "done-elsewhere"
    #: the broker is full: progress was not recorded
    FULL = "full"
    #: a copy's end: its result is kept, or dropped and counted (``LATE``: the run no longer
    #: accepts results; ``DUPLICATE``: another copy's is kept; ``SUPERSEDED``)
    ACCEPTED = "accepted"
    DROPPED = "dropped"
    LATE = "late"
    DUPLICATE = "duplicate"
    #: a copy's failure: the shard fails for good, is taken to be sent again (``RETRY``), or
    #: another failure came first (``CHANGED``: read again, decide again)
    FAILED = "failed"
    RETRY = "retry"
    CHANGED = "changed"


class Redispatch(_Named):
    """How a shard is taken to be sent again: its copy's worker was ``LOST`` (lease expired),
    its message is nowhere (``STRANDED``), ``nasq resume`` sends it (``RESUME``), or a failed
    run's in-flight copy was ``REVOKED``."""

    LOST = "lost"
    STRANDED = "stranded"
    RESUME = "resume"
    REVOKED = "revoked"


class Unfinished(_Named):
    """What a shard without a result is doing, as ``nasq resume`` sees it."""

    #: its last copy failed
    FAILED = "failed"
    #: recorded as running, its lease expired
    LOST = "lost"
    #: on a live worker
    RUNNING = "running"
    #: a message of it waits in the queue, was delivered less than a lease ago, or was just sent again
    QUEUED = "queued"
    #: its message is nowhere: lost with a broker, or discarded
    MISSING = "missing"


#: the unfinished shards ``nasq resume`` sends again (the others are on their way)
RESENT = (Unfinished.FAILED, Unfinished.LOST, Unfinished.MISSING)
