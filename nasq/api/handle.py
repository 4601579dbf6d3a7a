"""A submitted evaluation followed to its report: ``RunHandle.wait`` (the run's record, its
progress, healing, and what the client tells of the workers that serve it: ``_FleetWatch``)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import redis

from ..errors import NasqError, RunCancelled, RunError, RunLost
from ..queue import messages
from ..queue.healing import Healer
from ..queue.session import BROKER_ERRORS, Progress, Session
from ..queue.store import BrokerFull
from ..results.report import render
from ..rundata import Report, RunManifest
from ..runstate import RunState, Transition, is_ended
from ..wire import MessageError


@dataclass
class EvalResult:
    run_id: str
    report: Report
    predictions: dict | None
    #: what the merging worker could not do once the report was final (the run history not
    #: updated, files not moved into place), by what
    notes: dict | None = None
    #: the run's Redis was the command's own (an embedded run): it is gone once the command ends
    embedded: bool = False
    #: file name -> reason, for the files of the report's ``files_to_come`` that were not rendered
    not_rendered: dict = field(default_factory=dict)
    #: why the report's files are not in place (None: they are published, every path exists)
    unpublished: str | None = None

    @property
    def table(self) -> str:
        return render(self.report)


@dataclass
class RunHandle:
    """A submitted evaluation: ``wait()`` follows it to its report."""

    run_id: str
    manifest: RunManifest
    result: object
    session: Session
    #: the command that submits the same run again (said when a broker lost the run)
    rerun: str = "submit the evaluation again"

    def wait(self, *, progress: bool = True, timeout: float | None = None, log=print, files: bool = True,
             on_report: Callable[[EvalResult], None] | None = None) -> EvalResult:
        """Follow the run's record to its report. While waiting, shards whose worker is gone
        (lease expired) are dispatched again (``nasq.queue.healing``); a broker that goes away
        is waited for (until ``timeout``).

        The merging worker stores the numbers first, then renders the plots and the HTML page
        (the report's ``files_to_come``): ``on_report`` gets the result as soon as the numbers
        are in; ``files`` (default) waits for the rendering too, so that every file the report
        names exists (or ``EvalResult.not_rendered`` says which does not, and why)."""
        store, run_id, total = self.session.store, self.run_id, self.manifest.images
        every = max(1.0, self.session.settings.lease_s / 3)
        last_heal, full, last = [time.time()], [None], [0.0, None]
        healer = Healer.for_settings(self.session.app, store, self.session.settings)
        fleet = _FleetWatch(store, run_id, self.manifest, signing=healer.trust.signing,
                            embedded=self.session.cluster is not None)

        def poll() -> Progress:  # the record's progress, read at most once a second
            if time.time() - last[0] < 1.0 and last[1] is not None:
                return last[1]
            last[0], last[1] = time.time(), read()
            return last[1]

        def read() -> Progress:
            if not store.runs.has_run(run_id):
                return Progress(failed=RunLost(f"the broker lost run {run_id} (it restarted without persistence, or "
                                               f"the records expired); rerun it with: {self.rerun}"))
            if time.time() - last_heal[0] >= every:
                last_heal[0] = time.time()
                full[0] = None
                try:
                    for sid in healer.heal(run_id):
                        log(f"run {run_id}: {sid} dispatched again (its worker or its message was lost)")
                except (BrokerFull, redis.exceptions.OutOfMemoryError):
                    full[0] = store.full_message()
            st = store.runs.state(run_id) or {}
            failed = _ended_error(store, run_id, st) if st.get("state") in (RunState.FAILED, RunState.CANCELLED) \
                else None
            seen = fleet.look()
            return Progress(done=min(total, store.ledger.images_done(run_id, self.manifest)), failed=failed or seen.failed,
                            status=full[0] or seen.status, notes=seen.notes, on_timeout=seen.on_timeout)

        try:
            report = self.session.wait(_RunRecord(store, run_id), label=f"run {run_id}", poll=poll, total=total,
                                       timeout=timeout, progress=progress, log=log)
        finally:
            if self.result is not None:
                self.session.app.backend.remove_pending_result(self.result)
        # the merging worker publishes the files (one rename) and records the run after the state
        # says done: wait for that, so that every path printed exists (a merge sent again finishes
        # what a merging worker that died left undone)
        def merge_again(what: str):
            return lambda: messages.merge(self.session.app, run_id, self.manifest.queue,
                                          about=f"({what}: its merging worker went away)").apply_async()

        published = store.runs.wait_published(run_id, publish_again=merge_again("its report files"))
        result = EvalResult(run_id, report, store.runs.predictions(run_id), store.runs.notes(run_id),
                            embedded=self.session.cluster is not None,
                            unpublished=None if published else "its merging worker has not put them in place yet")
        if on_report is not None:
            on_report(result)
        if files and published:  # then it renders the plots and the HTML page
            result.not_rendered = store.runs.wait_rendered(run_id, report,
                                                      render_again=merge_again("its plots and HTML page"))
        return result

    def close(self) -> None:
        """Drop the connections of a handle from ``submit_evaluation`` (the run goes on)."""
        self.session.close()


class _RunRecord:
    """A run's record as something to wait on: ready once the run is done (its report) or failed.
    The chord's own result is not enough: a run that heals is merged outside the chord."""

    def __init__(self, store, run_id: str):
        self.store, self.run_id = store, run_id

    def ready(self) -> bool:
        return is_ended((self.store.runs.state(self.run_id) or {}).get("state"))

    def get(self, **_) -> Report:
        st = self.store.runs.state(self.run_id) or {}
        if st.get("state") != RunState.DONE:
            raise _ended_error(self.store, self.run_id, st)
        return self.store.runs.report(self.run_id)


@dataclass
class _Seen:
    status: str | None = None
    notes: tuple[str, ...] = ()
    failed: Exception | None = None
    on_timeout: str | None = None


class _FleetWatch:
    """What a waiting client tells of the workers of its run: none live on the run's queue
    (within two heartbeats of the last one's death: ``WorkerRegistry``), every live one excluded,
    a worker excluded (once), the queue served again, and, for a client without the signing
    key, workers refusing its unsigned messages (exit 2, the run marked failed)."""

    def __init__(self, store, run_id: str, manifest: RunManifest, *, signing: bool, embedded: bool):
        self.store, self.run_id, self.signing, self.embedded = store, run_id, signing, embedded
        self.queue, self.backend = manifest.queue, manifest.job.backend
        self.served: bool | None = None
        self.told: set[str] = set()

    def look(self) -> _Seen:
        from ..inference.failover import who

        notes = []
        if not self.signing and (refused := {w: r for w, r in self.store.runs.refusals(self.run_id).items()
                                             if not r.get("signed")}):
            if not self.store.ledger.running(self.run_id) and not self.store.ledger.result_ids(self.run_id):
                return _Seen(failed=self._refused(refused))  # nothing of the run runs anywhere
            if "refused" not in self.told:  # some workers run it all the same: said, not ended
                self.told.add("refused")
                notes.append(f"{', '.join(sorted(refused))} refuse this client's unsigned messages (they require "
                             "signed ones); other workers run the run")
        live = self.store.registry.live_consumers(self.queue)
        excluded = {w: e for w, e in self.store.ledger.exclusions(self.run_id).items() if not e.get("lifted")}
        for w, e in excluded.items():
            if w not in self.told:
                self.told.add(w)
                notes.append(f"{who(e)} is EXCLUDED from the run after {e.get('shards_failed')} failed shards in a "
                             f"row ({e.get('reason')}); its shards go to the other workers")
        serving = live - set(excluded)
        start = f"`nasq worker --backend {self.backend} --queues {self.queue}` with this broker"
        status = on_timeout = None
        if not live:
            status = (f"no live worker consumes queue {self.queue}: nothing runs until one starts ({start})")
            on_timeout = (f"nothing is running: no live worker consumes queue {self.queue}. The run waits in Redis: "
                          f"start one ({start}) and it goes on, or `nasq cancel {self.run_id}`")
        elif not serving:
            status = (f"every live worker of queue {self.queue} is excluded from the run "
                      f"({', '.join(sorted(live))}): start another ({start})")
            on_timeout = f"nothing is running: every live worker of queue {self.queue} is excluded from the run"
        elif self.served is False:
            notes.append(f"a live worker consumes queue {self.queue} again: {', '.join(sorted(serving))}")
        if self.embedded:
            status = None  # the command's own workers: a dead one ends the wait with its log
        self.served = bool(serving)
        return _Seen(status=status, notes=tuple(notes), on_timeout=on_timeout or (
            f"it goes on on the workers ({len(serving)} live on queue {self.queue}; `nasq status {self.run_id}` "
            "follows it)"))

    def _refused(self, refused: dict[str, dict]) -> NasqError:
        """Workers refuse this client's unsigned messages: the run is marked failed (nothing of
        it can run) and the client ends with one line (exit 2)."""
        names = ", ".join(sorted(refused))
        text = (f"the workers require signed messages: {names} refused run {self.run_id}'s messages because this "
                "client does not sign them. Enable message signing here: set signing_key, signing_cert and "
                "signing_cert_store (NASQ_SIGNING_KEY, NASQ_SIGNING_CERT, NASQ_SIGNING_CERT_STORE, or the [nasq] "
                "table of the settings file) as the workers have them (docs/SECURITY.md)")
        try:
            self.store.runs.transition(self.run_id, Transition.FAIL, error=text)
        except (BrokerFull, *BROKER_ERRORS):
            pass
        return NasqError(text)


def _ended_error(store, run_id: str, st: dict) -> RunError:
    """The error a client ends with for a failed or cancelled run: its reason, and where its
    report (what it finished, the shards it lacks and why) is, once its files are published
    (waited for a little: a cancel writes its report after the cancel takes effect)."""
    published = store.runs.wait_published(run_id, timeout_s=30.0)
    try:
        report = store.runs.report(run_id)
    except MessageError:  # changed in Redis by hand: the run's end is still told
        report = None
    where = (report.files or {}).get("json") if published and report else None
    done = f"{report.images} of {report.planned_images} images evaluated" if report else ""
    text = st.get("error") or f"run {run_id} {st.get('state', 'failed')}"
    more = "; ".join(filter(None, [done, f"report: {where}" if where else f"`nasq status {run_id}` shows it"]))
    cls = RunCancelled if st.get("state") == RunState.CANCELLED else RunError
    error = cls(f"{text} ({more})")
    error.report = report  # the partial report (``--json`` writes it)
    return error
