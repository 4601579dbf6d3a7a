"""The library functions behind the tasks, without a broker: a shard (``run_shard``), the end
of a run (``finish_run``), a sweep point (``measure_point``), and the message checks."""
import json
import os
import subprocess
import sys

import pytest

from nasq.config import BackendOptions, Settings, WorkerConfig
from nasq.errors import RunError
from nasq.inference.resources import DeviceResources
from nasq.inference.shard import run_shard
from nasq.perf.sweep import measure_point, point_file, read_rows
from nasq.rundata import Report, RunManifest
from nasq.wire import EvalJob, MessageError, ShardTask, SweepPoint
from nasq.results.ending import MergeLater, finish_run


class MemoryLedger:
    """What the run store records for shards, in dicts, with the rules of its scripts (the first
    ok result of a shard is kept; a copy stops or is dropped once the run ended; a failure is
    recorded as ``failover`` decided it; a worker the run holds a shard against is refused)."""

    def __init__(self, live=()):
        self.attempts, self.running, self.progress, self.finished, self.dropped = {}, {}, {}, {}, {}
        self.leases, self.run_state, self.results = {}, None, {}
        self.failures, self.barred, self.excluded, self.redispatched, self.live = {}, {}, {}, {}, set(live)
        self.now_nobody = 0.0  # when "nobody else may take it" began (0: long ago, past any grace)

    def _state(self):
        return (self.run_state or {}).get("state", "running")

    def claim_shard(self, run_id, shard_id, *, holder, lease_s, info, max_attempts):
        if self._state() not in ("submitted", "running"):
            return "ended", self._state()
        if shard_id in self.results:
            return "has-result", None
        worker = info["worker"]
        if worker in self.barred:
            return "refused", "excluded"
        if f"{worker}|{shard_id}" in self.barred:
            return "refused", "failed-here"
        self.attempts[shard_id] = n = self.attempts.get(shard_id, 0) + 1
        self.leases[shard_id], self.running[shard_id], self.progress[shard_id] = holder, info, 0
        if n > max_attempts:
            return "exhausted", n
        return "ok", (n, int(self.barred.get(f"{worker}#streak", 0)))

    def shard_tick(self, run_id, shard_id, *, holder, done, lease_s):
        if self._state() in ("done", "cancelled"):
            return "stop", self._state()
        if self.leases.get(shard_id, holder) != holder:
            return "stop", "superseded"
        self.progress[shard_id] = done
        return "ok", None

    def commit_shard(self, run_id, shard_id, *, holder, status, summary, result=None, worker="", reset_streak=False):
        if self.leases.get(shard_id) == holder:
            del self.leases[shard_id]
        if status == "stopped" or self._state() in ("done", "cancelled") or shard_id in self.results:
            self.dropped[shard_id] = self.dropped.get(shard_id, 0) + 1
            return "dropped", "late"
        self.finished[shard_id] = summary
        self.running.pop(shard_id, None)
        if reset_streak:
            self.barred.pop(f"{worker}#streak", None)
        self.results[shard_id], self.progress[shard_id] = result, summary.get("images", 0) + summary.get("errors", 0)
        return "accepted", (len(self.results), 0, len(self.finished))

    def failure_view(self, run_id, shard_id, worker):
        from nasq.inference.failover import FailureView

        raw = json.dumps(self.failures[shard_id]) if shard_id in self.failures else ""
        return FailureView(raw=raw, failures=list(self.failures.get(shard_id, [])),
                           excluded={w: e for w, e in self.excluded.items() if w in self.barred},
                           streak=int(self.barred.get(f"{worker}#streak", 0)))

    def record_failure(self, run_id, shard_id, *, holder, worker, seen, failures, streak, exclusion, final, summary,
                       why):
        mine = self.leases.get(shard_id) == holder
        if mine:
            del self.leases[shard_id]
        if self._state() in ("done", "cancelled") or shard_id in self.results:
            return "dropped", "late"
        if (json.dumps(self.failures[shard_id]) if shard_id in self.failures else "") != seen:
            return "changed", None
        if mine:
            self.attempts[shard_id] = self.attempts.get(shard_id, 1) - 1  # a start that ended: not a death
        self.failures[shard_id] = failures
        if streak is not None:
            self.barred[f"{worker}|{shard_id}"], self.barred[f"{worker}#streak"] = 1, streak
        if exclusion:
            self.barred[worker], self.excluded[worker] = 1, exclusion
        self.running.pop(shard_id, None)
        if final:
            self.finished[shard_id] = summary
            return "failed", (len(self.finished), 0, len(self.running))
        self.redispatched[shard_id] = n = self.redispatched.get(shard_id, 0) + 1
        return "retry", n

    def live_consumers(self, queue):
        return set(self.live)

    def digest_list(self, content):
        return None

    def nobody_since(self, run_id, shard_id, *, clear=False):
        if clear:
            self.barred.pop(f"nobody|{shard_id}", None)
            return 0.0
        return self.barred.setdefault(f"nobody|{shard_id}", self.now_nobody)

    def renew_lease(self, run_id, shard_id, holder, ttl_s):
        return self.leases.get(shard_id) == holder


class MemoryStore:
    """What the merge reads and writes in the run store, in dicts; ``states`` lists the
    transitions that took effect (the run starts running)."""

    runs = ledger = property(lambda self: self)  # it plays the parts of the run store the merge uses

    def __init__(self, manifest, running=(), stored=()):
        from nasq.runstate import TRANSITIONS

        self._manifest, self._running, self._transitions = manifest, {sid: {} for sid in running}, TRANSITIONS
        self.states, self.reports, self.stored = [], {}, {r["shard_id"]: r for r in stored}

    def shard_results(self, run_id):
        return dict(self.stored)

    def manifest(self, run_id):
        return self._manifest

    def state(self, run_id):
        return self.states[-1] if self.states else {"state": "running"}

    def report(self, run_id):
        return self.reports.get(run_id, (None,))[0]

    def redispatched(self, run_id):
        return {}

    def dropped(self, run_id):
        return {}

    def running(self, run_id):
        return self._running

    def transition(self, run_id, name, *, report=None, predictions=None, clear_running=False, merge_id=None,
                   forget=(), **fields):
        sources, target = self._transitions[name]
        if self.state(run_id)["state"] not in sources:
            return False, self.state(run_id)["state"]
        self.states.append({"state": str(target), **fields})
        if report is not None:
            self.reports[run_id] = (report, predictions)
        return True, str(target)

    def add_note(self, run_id, what, text):
        raise AssertionError(f"unexpected note: {text}")

    def finished(self, run_id):
        return {}

    def redispatched_at(self, run_id):
        return {}

    def attempts(self, run_id):
        return {sid: 1 for sid in self._running}

    def failures(self, run_id):
        return {}

    def exclusions(self, run_id):
        return {}

    def mark_published(self, run_id):
        self.published = True

    def mark_rendered(self, run_id, not_written=None):
        self.rendered = not_written or {}

    def claim_render(self, run_id, ttl_s=60.0, *, renew=False):
        return True

    def claim_publish(self, run_id, ttl_s, *, renew=False):
        return True

    def drop_publish(self, run_id):
        pass


def _job(assets, **over) -> dict:
    from nasq.data import open_source

    job = {"dataset": open_source(assets["data"]).describe(), "labels": assets["labels"],
           "model": {"weights": assets["weights"], "num_outputs": None, "options": {}}, "backend": "torch",
           "batch_size": 4, "precision": None, "output": None}
    return job | over


def _worker(tmp_path, precision: str = "fp32", **over) -> WorkerConfig:
    settings = Settings(artifact_dir=str(tmp_path / "art"), report_dir=str(tmp_path / "rep"), max_attempts=2,
                        read_roots=str(tmp_path.parent.parent))  # the session's temporary folders: the assets
    options = BackendOptions(threads=1, precision=precision)
    return WorkerConfig(**({"settings": settings, "name": "w0@test", "options": options} | over))


def test_run_shard_evaluates_its_range_and_records_it(assets, tmp_path):
    from nasq.api import evaluate_local

    ledger, resources = MemoryLedger(), DeviceResources("cpu")
    task = ShardTask.from_payload("r1", "shard-00001", 8, 16, _job(assets))
    out = run_shard(task, ledger=ledger, resources=resources, worker=_worker(tmp_path))
    assert out["status"] == "ok" and out["worker"] == "w0@test" and out["precision"] == "fp32"
    ref = evaluate_local(weights=assets["weights"], data=assets["data"], labels=assets["labels"], batch_size=4)
    mine = [ref["indices"].index(i) for i in out["indices"]]
    assert out["top5"] == [ref["top5"][k] for k in mine]
    assert len(out["indices"]) + len(out["errors"]) == 8
    assert ledger.attempts == {"shard-00001": 1} and ledger.progress["shard-00001"] == 8
    assert ledger.finished["shard-00001"]["status"] == "ok" and ledger.running == {}  # not shown as running
    assert ledger.leases == {}  # held while it ran, dropped when it finished
    # the loaded model is kept for the next shard of the same run
    first = resources.backend
    run_shard(ShardTask.from_payload("r1", "shard-00000", 0, 8, _job(assets)), ledger=ledger, resources=resources,
              worker=_worker(tmp_path))
    assert resources.backend is first


def test_run_shard_reports_failures_instead_of_raising(assets, tmp_path):
    ledger = MemoryLedger()
    task = ShardTask.from_payload("r1", "shard-00000", 0, 4, _job(assets))
    out = run_shard(task, ledger=ledger, resources=DeviceResources("cpu"), worker=_worker(tmp_path, backend="onnxruntime"),
                    queue="q")
    assert out["status"] == "error" and "runs backend 'onnxruntime' but the run asked for 'torch'" in out["error"]
    assert out["final"] and "no other live worker consumes queue q" in out["error"]  # nobody else to run it
    assert ledger.finished["shard-00000"]["status"] == "error"
    # a shard whose worker died max_attempts times is failed, not run again
    ledger.finished.clear()
    ledger.attempts["shard-00000"] = 2
    out = run_shard(task, ledger=ledger, resources=DeviceResources("cpu"), worker=_worker(tmp_path, name="w1@test"))
    assert out["status"] == "error" and "max_attempts=2" in out["error"] and out["final"]
    # a late redelivery of a run that is already merged does nothing
    ledger.run_state = {"state": "done"}
    assert run_shard(task, ledger=ledger, resources=DeviceResources("cpu"), worker=_worker(tmp_path))["status"] == "skipped"
    assert ledger.attempts["shard-00000"] == 2  # starts that never ended; a late delivery is none


def test_a_failed_shard_goes_to_another_worker_and_a_failing_worker_is_excluded(assets, tmp_path):
    """The failover rules with the library's own run_shard: a device failure is sent again while
    another live worker may take it; the second failure in a row excludes the worker, which then
    refuses the run's shards; once no other worker may take a shard, it fails for good."""
    ledger = MemoryLedger(live={"w0@test", "w1@test"})
    bad = _worker(tmp_path, backend="onnxruntime")  # fails every shard of a torch run
    first = ShardTask.from_payload("r1", "shard-00000", 0, 4, _job(assets))
    second = ShardTask.from_payload("r1", "shard-00001", 4, 8, _job(assets))
    out = run_shard(first, ledger=ledger, resources=DeviceResources("cpu"), worker=bad, queue="q")
    assert out["status"] == "error" and not out["final"] and out["dispatches"] == 1 and not out["excluded"]
    assert "sent again for another worker" in out["error"] and "shard-00000" not in ledger.finished
    out = run_shard(second, ledger=ledger, resources=DeviceResources("cpu"), worker=bad, queue="q")
    assert out["excluded"] and not out["final"] and "EXCLUDED" in out["error"]
    assert ledger.excluded["w0@test"]["shards_failed"] == 2
    # excluded: the next shard is not evaluated, it goes back to the queue
    third = ShardTask.from_payload("r1", "shard-00002", 8, 12, _job(assets))
    assert run_shard(third, ledger=ledger, resources=DeviceResources("cpu"), worker=bad, queue="q")["status"] == "refused"
    # the other worker runs the shards the bad one failed
    good = _worker(tmp_path, name="w1@test")
    assert run_shard(first, ledger=ledger, resources=DeviceResources("cpu"), worker=good, queue="q")["kept"]
    # with the other worker gone, a shard the excluded one may not take fails for good, saying why
    ledger.live = {"w0@test"}
    out = run_shard(third, ledger=ledger, resources=DeviceResources("cpu"), worker=bad, queue="q")
    assert out["status"] == "error" and out["final"] and "is excluded from the run" in out["error"]
    assert "no other live worker consumes queue q" in out["error"]


def test_run_precision_wins_over_the_workers(assets, tmp_path):
    w = _worker(tmp_path, precision="bf16")
    assert w.backend_options(None).precision == "bf16" and w.backend_options("fp32").precision == "fp32"
    out = run_shard(ShardTask.from_payload("r1", "s", 0, 4, _job(assets, precision="fp16")), ledger=MemoryLedger(),
                    resources=DeviceResources("cpu"), worker=w)
    assert out["status"] == "error" and "fp16 runs on CUDA only" in out["error"]  # the flag reached the backend


def _planned(assets) -> RunManifest:
    """A run of 12 images in shards of 4."""
    job = EvalJob.from_payload(_job(assets) | {"dataset": {**_job(assets)["dataset"], "images": 12}})
    return RunManifest.plan(job, shard_size=4, queue="q")


def _results(manifest, drop=()):
    out = []
    for s in manifest.shards:
        if s.shard_id in drop:
            continue
        idx = list(range(s.start, s.stop))
        out.append({"run_id": manifest.run_id, "shard_id": s.shard_id, "status": "ok", "worker": "w0",
                    "device": "cpu", "backend": "torch", "indices": idx, "names": [f"{i}.JPEG" for i in idx],
                    "labels": idx, "top5": [[i, 0, 0, 0, 0] for i in idx], "scores": [[1.0] * 5 for _ in idx],
                    "errors": [], "num_outputs": 1001,
                    "timing": {"data_s": 0.1, "compute_s": 1.0, "wall_s": 1.0, "started_at": 10.0, "finished_at": 11.0}})
    return out


def test_merge_run_writes_the_report_and_fetches_late_shards(assets, tmp_path):
    manifest = _planned(assets)
    results = _results(manifest)
    late = results.pop(1)  # its result is only in the run store (a redelivered or re-dispatched shard)
    store = MemoryStore(manifest, stored=[late])
    report = finish_run(manifest.run_id, results, store=store, report_dir=str(tmp_path), merge_wait_s=60,
                       first_try=0.0)
    assert report.images == 12 and report.top1 == 100.0 and report.shards == 3
    assert store.states[-1]["state"] == "done" and os.path.isfile(report.files["json"])
    assert store.reports[manifest.run_id][1]["indices"] == list(range(12))
    # the plots and the page come after the numbers are stored, into the folder the report names
    assert report.files_to_come == ("plot", "devices", "html") and store.rendered == {}
    assert all(os.path.getsize(report.files[k]) > 0 for k in report.files_to_come)
    assert Report.from_payload(json.load(open(report.files["json"]))) == store.reports[manifest.run_id][0] == report


def test_merge_run_waits_for_a_running_shard_then_fails_keeping_the_rest(assets, tmp_path):
    import time

    manifest = _planned(assets)
    gone = manifest.shards[2].shard_id
    results = _results(manifest, drop={gone})
    store = MemoryStore(manifest, running=[gone])
    kw = dict(store=store, report_dir=str(tmp_path), merge_wait_s=60)
    with pytest.raises(MergeLater):
        finish_run(manifest.run_id, results, first_try=time.time(), **kw)
    assert store.states == []  # nothing decided yet
    with pytest.raises(RunError, match=gone):
        finish_run(manifest.run_id, results, first_try=time.time() - 120, **kw)
    assert store.states[-1]["state"] == "failed" and "nasq resume" in store.states[-1]["error"]
    partial, _ = store.reports[manifest.run_id]
    assert partial.partial and partial.images == 8 and partial.shards_not_ok == (gone,)


def test_measure_point_writes_its_row(assets, tmp_path):
    from nasq.data import open_source

    src = open_source(assets["data"])
    folder = str(tmp_path / "rep" / "sweeps" / "sweep-x")  # under the worker's report dir: a write root
    point = SweepPoint.from_payload({"sweep_id": "sweep-x", "point_id": "w0@test|bs2", "folder": folder,
                                     "worker": "w0@test", "batch_size": 2, "mode": "bench", "backend": "torch",
                                     "precision": "fp32", "weights": assets["weights"], "data": src.root,
                                     "dataset_fingerprint": src.fingerprint, "min_time_s": 0.1})
    row = measure_point(point, resources=DeviceResources("cpu"), worker=_worker(tmp_path))
    assert not row.get("error") and row["img_s"] == pytest.approx(2000 / row["mean_ms"], rel=1e-3)
    assert os.path.isfile(point_file(folder, point.point_id))
    assert read_rows(folder, [point.point_id]) == [row]


@pytest.mark.parametrize("change, field", [
    ({"start": -4}, "start"), ({"start": 8, "stop": 8}, "below stop"), ({"stop": 10_000}, "past the dataset"),
    ({"start": True}, "start"), ({"job": {"batch_size": 0}}, "batch_size"), ({"job": {"precision": "fp64"}}, "precision"),
    ({"job": {"backend": "tensorflow"}}, "backend"), ({"job": {"output": {"dir": "/x", "fmt": "EXE"}}}, "output.fmt"),
    ({"job": {"model": {"weights": 3}}}, "weights"), ({"job": "not a dict"}, "job"),
])
def test_shard_messages_are_checked(assets, change, field):
    args = {"run_id": "r", "shard_id": "s", "start": 0, "stop": 4, "job": _job(assets)}
    job_change = change.pop("job", None)
    args |= change
    if isinstance(job_change, dict):
        args["job"] = args["job"] | job_change
    elif job_change is not None:
        args["job"] = job_change
    with pytest.raises(MessageError, match=field):
        ShardTask.from_payload(**args)


def test_a_valid_message_round_trips(assets):
    task = ShardTask.from_payload("r", "s", 0, 4, _job(assets, precision="fp32"))
    assert ShardTask.from_payload(*task.args()) == task
    assert task.argsrepr == "run=r s images=[0,4) batch=4 backend=torch"


def test_a_bad_precision_flag_is_one_line_before_anything_starts(tmp_path):
    env = dict(os.environ, NASQ_WORK_DIR=str(tmp_path / "runs"))
    env.pop("NASQ_BROKER_URL", None)
    for argv, names in ((["--precision", "fp64"], "'bf16', 'fp16', 'fp32'"),
                        (["--backend", "onnxruntime", "--precision", "fp16"], "fp32")):
        p = subprocess.run([sys.executable, "-m", "nasq.cli", "eval", "--weights", "w.pth", "--data", str(tmp_path),
                            *argv], capture_output=True, text=True, timeout=120, env=env)
        assert p.returncode == 2, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and names in p.stderr, p.stderr
        assert not (tmp_path / "runs").exists()  # no private Redis or worker was started


def test_fail_run_heals_what_was_only_lost_and_fails_what_failed(assets, tmp_path):
    from nasq.results.ending import fail_run

    manifest = _planned(assets)
    ids = manifest.shard_ids

    class Store(MemoryStore):
        def __init__(self, *a, finished=None, **kw):
            super().__init__(*a, **kw)
            self._finished, self.claimed = finished or {}, []

        def finished(self, run_id):
            return self._finished

        def claim_lost(self, run_id, sid, running=True):
            self.claimed.append(sid)
            return 1

        def redispatched(self, run_id):
            return {sid: 1 for sid in self.claimed}

    sent = []
    # one shard revoked in flight (no result, no failure): dispatched again, the run goes on
    store = Store(manifest, stored=_results(manifest, drop={ids[1]}))
    fail_run(manifest.run_id, RuntimeError("revoked"), store=store, report_dir=str(tmp_path / "case1"),
             redispatch=lambda m, sids: sent.extend(sids))
    assert sent == [ids[1]] and store.states == []
    # a shard that failed on a device and was sent again for another is on its way: nothing happens
    store = Store(manifest, stored=_results(manifest, drop={ids[0]}))
    store.failures = lambda run_id: {ids[0]: [{"worker": "w9", "error": "device lost"}]}
    fail_run(manifest.run_id, RuntimeError("a header part failed"), store=store, report_dir=str(tmp_path / "case2"),
             redispatch=lambda m, sids: sent.extend(sids))
    assert sent == [ids[1]] and store.states == []
    # every shard finished after all: the run is merged and done
    store = Store(manifest, stored=_results(manifest))
    fail_run(manifest.run_id, RuntimeError("late"), store=store, report_dir=str(tmp_path / "case3"),
             redispatch=lambda m, sids: sent.extend(sids))
    assert store.states[-1]["state"] == "done" and store.reports[manifest.run_id][0].images == 12
    # a shard that failed for real: the run fails with a partial report naming it
    store = Store(manifest, stored=_results(manifest, drop={ids[2]}),
                  finished={ids[2]: {"status": "error", "error": "boom", "worker": "w0"}})
    fail_run(manifest.run_id, RuntimeError("chord"), store=store, report_dir=str(tmp_path / "case4"),
             redispatch=lambda m, sids: sent.extend(sids))
    assert store.states[-1]["state"] == "failed" and "boom" in store.states[-1]["error"]
    assert store.reports[manifest.run_id][0].shards_not_ok == (ids[2],)


def test_the_simulated_device_is_deterministic_and_says_what_it_is(tmp_path):
    from nasq import backends
    from nasq.config import BackendOptions
    from nasq.data import open_source
    from nasq.errors import BackendError, DatasetError
    from nasq.inference.evaluate import evaluate_range
    from nasq.model.spec import ModelRef

    weights = tmp_path / "w.sim"
    weights.write_bytes(b"any bytes will do")
    src = open_source("index:30")

    def run(spec):
        b = backends.create("sim", "cpu")
        b.load(ModelRef(str(weights)), batch_size=8, options=BackendOptions(sim=spec))
        return b, evaluate_range(src, b, 0, 30, batch_size=8)

    b, one = run("rate=1000")
    _, two = run("rate=2000,slow=1")
    assert one["top5"] == two["top5"] and len(one["indices"]) == 30
    assert "SIMULATED" in b.describe_device() and "not a measurement" in b.versions()["sim"]
    assert b.seconds_for(8) == pytest.approx(0.008)
    with pytest.raises(BackendError, match="crash_after"):
        run("explode=1")
    with pytest.raises(DatasetError, match="index:N"):
        open_source("index:zero")
