"""Run records in Redis: a run's manifest (and its signed copy), its state and the transitions
of ``nasq.runstate`` (one atomic script each), its merges, report and notes."""
from __future__ import annotations

import json
import os
import socket
import time

import redis

from ..rundata import Report, RunManifest
from ..wire import MessageError
from ..runstate import ENDED, TRANSITIONS, Outcome, RunState, Transition
from .redis_store import ACTIVE, DIGESTS, EXPIRING, RUNS, StorePart, run_keys, _rides_out_full, _states, log


class RunRecords(StorePart):
    """``nasq:run:<id>:{manifest,sealed,state,merges,resumes,report,predictions,notes,published,rendered,rendering}``
    and the run indexes (``nasq:runs``, ``nasq:runs:active``)."""

    @_rides_out_full
    def save_manifest(self, manifest: RunManifest, sealed: str | None = None) -> None:
        """A new run: its manifest (and, with message signing on, the manifest signed by the
        submitting client), state ``submitted``."""
        run_id = manifest.run_id
        with self.r.pipeline() as p:
            p.set(run_keys(run_id).manifest, json.dumps(manifest.to_payload()), ex=self.expires)
            if sealed is not None:
                p.set(run_keys(run_id).sealed, sealed, ex=self.expires)
            p.zadd(RUNS, {run_id: manifest.created or time.time()})
            p.set(run_keys(run_id).state, json.dumps({"state": str(RunState.SUBMITTED), "at": time.time(),
                                                        "shards": len(manifest.shards)}), ex=self.expires)
            p.sadd(ACTIVE, run_id)
            p.execute()

    @_rides_out_full
    def save_digests(self, content: str, raw: bytes) -> None:
        """A dataset's digest list (``nasq.data.digests``), named by its content hash: runs of
        the same bytes share it, and each submission gives it the run's expiry again."""
        self.r.set(f"{DIGESTS}{content}", raw, ex=self.expires)

    def digest_list(self, content: str) -> bytes | None:
        return self.r.get(f"{DIGESTS}{content}")

    def manifest(self, run_id: str) -> RunManifest | None:
        """The manifest as stored (see ``nasq.queue.trust`` for one that must be signed); None:
        no such run.

        Raises:
            MessageError: the stored manifest is malformed (the field is named).
        """
        return self._record(run_keys(run_id).manifest, RunManifest)

    def sealed_manifest(self, run_id: str) -> str | None:
        v = self.r.get(run_keys(run_id).sealed)
        return v.decode() if v else None

    def has_run(self, run_id: str) -> bool:
        return bool(self.r.exists(run_keys(run_id).manifest))

    def broker_warnings(self) -> list[str]:
        """What this Redis lacks for runs to survive it (read with CONFIG GET; managed Redis
        services that forbid it are not second-guessed)."""
        try:
            conf = {k: v for part in ("appendonly", "appendfsync", "maxmemory-policy")
                    for k, v in self.r.config_get(part).items()}
        except redis.exceptions.ResponseError:
            return []
        out = []
        if conf.get("appendonly") != "yes":
            out.append("the broker runs without appendonly: a Redis restart loses queued shards and run records "
                       "(redis-server --appendonly yes --appendfsync always)")
        elif conf.get("appendfsync") not in (None, "always"):
            out.append(f"the broker's appendfsync is {conf['appendfsync']}: a Redis crash can lose the last writes "
                       "(a finished shard, a queued message); such a run then needs `nasq resume` "
                       "(appendfsync always keeps them)")
        if conf.get("maxmemory-policy") not in (None, "noeviction"):
            out.append(f"the broker's maxmemory-policy is {conf['maxmemory-policy']}: Redis may evict run records "
                       "and results (set it to noeviction)")
        return out

    def state(self, run_id: str) -> dict | None:
        return self._get(run_keys(run_id).state)

    def state_name(self, run_id: str) -> str | None:
        return (self.state(run_id) or {}).get("state")

    def active_runs(self) -> list[str]:
        """Runs submitted or running: the ones whose shards a healthy component watches."""
        return sorted(x.decode() for x in self.r.smembers(ACTIVE))

    def run_ids(self, limit: int = 50) -> list[str]:
        return [x.decode() for x in self.r.zrevrange(RUNS, 0, limit - 1)]

    @_rides_out_full
    def transition(self, run_id: str, name: Transition, *, report: Report | None = None, predictions: dict | None = None,
                   clear_running: bool = False, merge_id: str | None = None, forget: tuple[str, ...] = (),
                   **fields) -> tuple[bool, str | None]:
        """Move the run along ``nasq.runstate.TRANSITIONS[name]`` if its state allows it, writing
        ``report``/``predictions`` with it; returns (done, the state the run was in). A resume
        forgets the attempts, progress and failures of the shards it sends again (``forget``)
        and lifts the run's exclusions."""
        sources, target = TRANSITIONS[name]
        record = {"state": str(target), "at": time.time(), **fields}
        k = run_keys(run_id)
        named = ("running", "attempts", "finished", "failures", "barred", "merges")
        out = self._run("TRANSITION",
                        [k.state, ACTIVE, k.report, k.predictions, k.published, k.rendered, k.rendering,
                         *k.parts(*named, *(p for p in EXPIRING if p not in named))],
                        [_states(sources), record, str(target), run_id, self.expires,
                         json.dumps(report.to_payload()) if report is not None else "",
                         json.dumps(predictions) if predictions is not None else "",
                         "1" if clear_running else "0", merge_id or "", _states(ENDED),
                         "1" if name == Transition.RESUME else "0", *forget])
        done = out[0] == Outcome.OK
        return done, (str(target) if done else out[1] if len(out) > 1 else None)

    @_rides_out_full
    def next_resume(self, run_id: str) -> int:
        key = run_keys(run_id).resumes
        n = int(self.r.incr(key))
        self.r.expire(key, self.expires)
        return n

    def resumes(self, run_id: str) -> int:
        return int(self.r.get(run_keys(run_id).resumes) or 0)

    def merge_ids(self, run_id: str) -> list[str]:
        """The task ids of the run's merges: the chord's and one per resume."""
        return sorted(x.decode() for x in self.r.smembers(run_keys(run_id).merges))

    @_rides_out_full
    def add_merge_id(self, run_id: str, task_id: str) -> None:
        self.r.sadd(run_keys(run_id).merges, task_id)
        self.r.expire(run_keys(run_id).merges, self.expires)

    def report(self, run_id: str) -> Report | None:
        """The run's report; None: none yet.

        Raises:
            MessageError: the stored report is malformed (the field is named).
        """
        return self._record(run_keys(run_id).report, Report)

    def _record(self, key: str, kind):
        """The ``kind`` (``RunManifest``, ``Report``) stored at ``key``, or None.

        Raises:
            MessageError: what is stored there is not that (not even JSON: written by hand).
        """
        raw = self.r.get(key)
        if raw is None:
            return None
        try:
            stored = json.loads(raw)
        except ValueError as e:  # written by hand: refused as a malformed record is
            raise MessageError(f"{key} is not JSON ({e})") from None
        return kind.from_payload(stored)

    def predictions(self, run_id: str) -> dict | None:
        return self._get(run_keys(run_id).predictions)

    @_rides_out_full
    def save_report_of_ended(self, run_id: str, report: Report, predictions: dict | None) -> None:
        """The partial report of a run that already ended (a cancelled one, written after the
        cancel took effect)."""
        self._set(run_keys(run_id).report, report.to_payload())
        if predictions is not None:
            self._set(run_keys(run_id).predictions, predictions)

    def mark_published(self, run_id: str) -> None:
        """The ended run's report files are in place and its history row written (or noted as not)."""
        self._mark(run_keys(run_id).published, run_id, "its report as published")

    def published(self, run_id: str) -> bool:
        return bool(self.r.exists(run_keys(run_id).published))

    def mark_rendered(self, run_id: str, not_written: dict[str, str] | None = None) -> None:
        """The ended run's plots and HTML page are written too, but for ``not_written`` (file
        name -> reason)."""
        self._mark(run_keys(run_id).rendered, run_id, "its plots as rendered", json.dumps(not_written or {}))

    def rendered(self, run_id: str) -> bool:
        return bool(self.r.exists(run_keys(run_id).rendered))

    def not_rendered(self, run_id: str) -> dict[str, str]:
        """File name -> reason, of the files the merging worker could not render."""
        return self._get(run_keys(run_id).rendered) or {}

    def claim_render(self, run_id: str, ttl_s: float = 60.0, *, renew: bool = False) -> bool:
        """True for the one worker that renders the run's plots and HTML page now; the claim
        lapses after ``ttl_s`` unless renewed (a worker that died rendering leaves it to the next)."""
        return self._claim(run_keys(run_id).rendering, ttl_s, renew=renew)

    def claim_publish(self, run_id: str, ttl_s: float, *, renew: bool = False) -> bool:
        """True for the one worker that publishes the run's report files now (``renew``: the
        merging worker, which takes it whatever holds it); it lapses after ``ttl_s``, so that a
        worker that died publishing leaves it to the next within seconds."""
        return self._claim(run_keys(run_id).publishing, ttl_s, renew=renew, take=renew)

    def _claim(self, key: str, ttl_s: float, *, renew: bool = False, take: bool = False) -> bool:
        """A claim held by this process (its value: ``process_token()``): taken if free, or
        ``take``n, or renewed (``renew``) while this process holds it, in one atomic step. A
        claim whose holder is a process of this host and PID namespace that is gone (a pool
        process killed mid-way, its task redelivered) counts as free."""
        me, px = process_token(), max(1, int(ttl_s * 1000))
        held = (self.r.get(key) or b"").decode()
        dead = held if held and held != me and _gone(held) else ""
        return bool(self._run("CLAIM_KEY", [key], [me, px, "take" if take else "renew" if renew else "nx", dead]))

    def _unclaim(self, key: str) -> None:
        """Drop a claim this process holds (never another's)."""
        self._run("UNCLAIM_KEY", [key], [process_token()])

    def drop_publish(self, run_id: str) -> None:
        self._unclaim(run_keys(run_id).publishing)

    def publishing(self, run_id: str) -> bool:
        return bool(self.r.exists(run_keys(run_id).publishing))

    def restore_ended(self, run_id: str, report: Report, predictions: dict | None) -> None:
        """Write a finished run's records back as its published report says (someone changed
        them in Redis): its state, report and predictions, published and rendered, not active."""
        record = {"state": report.state, "at": report.finished, "error": report.error,
                  "restored": "from its published report"}
        with self.r.pipeline() as p:
            p.set(run_keys(run_id).state, json.dumps(record), ex=self.expires)
            p.set(run_keys(run_id).report, json.dumps(report.to_payload()), ex=self.expires)
            if predictions is not None:
                p.set(run_keys(run_id).predictions, json.dumps(predictions), ex=self.expires)
            p.set(run_keys(run_id).published, "1", ex=self.expires)
            p.set(run_keys(run_id).rendered, "{}", ex=self.expires)
            p.srem(ACTIVE, run_id)
            p.execute()

    def wait_published(self, run_id: str, *, timeout_s: float = 60.0, publish_again=None) -> bool:
        """Wait for the ended run's report files to be published (``mark_published``): while a
        worker holds the claim to publish, up to ``timeout_s``; when none does for a second
        (the merging worker died after storing the report), ``publish_again()`` (which sends the
        run's merge again: a merge of an ended run publishes what is missing) is called, at
        most every 5 s. False if they are not published by then."""
        deadline, idle_since, asked = time.time() + timeout_s, None, 0.0
        while not self.published(run_id):
            if time.time() >= deadline:
                return False
            if self.publishing(run_id):
                idle_since = None
            elif idle_since is None:
                idle_since = time.time()
            elif time.time() - idle_since > 1.0 and publish_again is not None and time.time() - asked > 5.0:
                publish_again()
                asked = time.time()
            time.sleep(0.05)
        return True

    def wait_rendered(self, run_id: str, report: Report, *, timeout_s: float = 300.0,
                      render_again=None) -> dict[str, str]:
        """Wait for the merging worker to render the files the report has to come (plots, HTML
        page); returns file name -> reason for those that are not there. While a worker holds
        the rendering claim this waits, up to ``timeout_s``; when none does and nothing was
        rendered (the merging worker died after storing the numbers), ``render_again()`` (which
        sends the run's merge again: a merge of a done run renders what is missing) is called
        once."""
        files = report.files or {}
        to_come = [files[k] for k in report.files_to_come or () if k in files]
        if not to_come:
            return {}
        deadline, idle_since, asked = time.time() + timeout_s, None, render_again is None

        def absent(why: str) -> dict[str, str]:
            return {os.path.basename(path): why for path in to_come}

        while not self.rendered(run_id):
            if timeout_s <= 0:
                return absent("being rendered by the merging worker")
            if time.time() >= deadline:
                return absent(f"not rendered within {timeout_s:g} s of the numbers")
            if self.r.exists(run_keys(run_id).rendering):
                idle_since = None
            elif idle_since is None:
                idle_since = time.time()
            elif time.time() - idle_since > 3.0:  # no worker renders them
                if asked:
                    return absent("its merging worker went away before rendering it")
                render_again()
                asked, idle_since = True, None
                deadline = max(deadline, time.time() + 60.0)
            time.sleep(0.05)
        return self.not_rendered(run_id)

    def _mark(self, key: str, run_id: str, what: str, value="1") -> None:
        try:
            self.r.set(key, value, ex=self.expires)
        except redis.exceptions.OutOfMemoryError:
            log.warning("run %s: could not mark %s (the broker is full)", run_id, what)

    def record_refusal(self, run_id: str, worker: str, *, signed: bool, text: str) -> bool:
        """A worker refused a message of the run for its signature (``signed``: the message was
        signed, and the worker takes unsigned ones only; else it was not, and the worker takes
        signed ones only). Written only for a run that exists, and read only by an unsigned
        client (a signed run's client ignores it: this record cannot harm a signed run)."""
        if not self.has_run(run_id):
            return False
        key = run_keys(run_id).refused
        try:
            with self.r.pipeline(transaction=False) as p:
                p.hset(key, worker, json.dumps({"signed": signed, "text": text[:500], "at": time.time()}))
                p.expire(key, self.expires)
                p.execute()
        except redis.exceptions.OutOfMemoryError:
            return False
        return True

    def refusals(self, run_id: str) -> dict[str, dict]:
        """Worker -> {signed, text, at}: the workers that refused the run's messages for their signature."""
        return self._hash(run_keys(run_id).refused)

    def add_note(self, run_id: str, what: str, text: str) -> None:
        try:
            self.r.hset(run_keys(run_id).notes, what, text)
            self.r.expire(run_keys(run_id).notes, self.expires)
        except redis.exceptions.OutOfMemoryError:
            log.warning("run %s: %s (could not record it: the broker is full)", run_id, text)

    def notes(self, run_id: str) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.r.hgetall(run_keys(run_id).notes).items()}



def process_token() -> str:
    """This process, as a claim names it: host, PID namespace, pid and the pid's start time
    (so a pid reused by another process, or one of another container, is not taken for it)."""
    return f"{socket.gethostname()}|{_pid_ns()}|{os.getpid()}|{_started(os.getpid())}"


def _pid_ns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return "?"


def _started(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()  # field 22: starttime
    except (OSError, IndexError):
        return "?"


def _gone(token: str) -> bool:
    """Is the process a claim names gone? Only a process of this host and PID namespace can be
    told gone; any other counts as alive (its claim lapses by itself)."""
    host, ns, pid, started = (token.split("|") + ["", "", "", ""])[:4]
    if host != socket.gethostname() or ns != _pid_ns() or ns == "?" or not pid.isdigit():
        return False
    return _started(int(pid)) != started

