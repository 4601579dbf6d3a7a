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
"""
from __future__ import annotations

from enum import Enum


class RunState(str, Enum):
    SUBMITTED = "submitted"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


#: the states a run ends in (nothing runs for it; a waiting client stops)
ENDED = frozenset({RunState.DONE, RunState.FAILED, RunState.CANCELLED})
#: the states in which a finished shard's result is kept
ACCEPTS_RESULTS = frozenset({RunState.SUBMITTED, RunState.RUNNING, RunState.FAILED})
#: the states in which a shard may start: a failed run's queued shards still run, so that
#: `nasq resume` has only the failed ones left to do (`nasq cancel` stops them)
MAY_START = ACCEPTS_RESULTS

#: transition -> (the states it may start from, the state it ends in)
TRANSITIONS: dict[str, tuple[frozenset, RunState]] = {
    "start": (frozenset({RunState.SUBMITTED}), RunState.RUNNING),
    "merge": (frozenset({RunState.SUBMITTED, RunState.RUNNING}), RunState.DONE),
    "fail": (frozenset({RunState.SUBMITTED, RunState.RUNNING}), RunState.FAILED),
    # a failed run's shards may still be running (their results are kept for resume): it can be cancelled
    "cancel": (frozenset({RunState.SUBMITTED, RunState.RUNNING, RunState.FAILED}), RunState.CANCELLED),
    # a run left submitted (its submission was cut short) is finished by a resume too
    "resume": (frozenset({RunState.SUBMITTED, RunState.RUNNING, RunState.FAILED}), RunState.RUNNING),
}

ALL = tuple(s.value for s in RunState)


def may(transition: str, state) -> bool:
    """Whether a run in ``state`` (a ``RunState``, its value, or None: no such run) may go
    through ``transition`` (the question every "may this happen now" check asks this table)."""
    return state is not None and str(state) in {s.value for s in TRANSITIONS[transition][0]}


def ends_in(transition: str) -> RunState:
    """The state ``transition`` leaves a run in."""
    return TRANSITIONS[transition][1]


def is_ended(state: str | None) -> bool:
    return state in {s.value for s in ENDED}


def names(states) -> list[str]:
    return sorted(str(s) for s in states)
