"""What a shard costs the broker, and what the cuts keep: a shard's claim, progress and commit in
a few commands each on a Redis of their own (counted by Redis itself), a kept result that stops
every other copy, progress read from the leases, records that all expire, task events only when
asked for, and Celery's chord script with nasq's two edits."""
from __future__ import annotations

import os
import signal
import threading
import time
import uuid

from nasq.api import evaluate, submit_evaluation
from nasq.config import Settings
from nasq.queue.app import make_app
from nasq.queue.redis_server import RedisServer
from nasq.queue.store import RunStore
from plans import run_manifest


def _commands(r) -> int:
    """Commands Redis ran since the last call (INFO and CONFIG RESETSTAT themselves not counted)."""
    stats = r.info("commandstats")
    r.config_resetstat()
    return sum(v["calls"] for k, v in stats.items() if k not in ("cmdstat_info", "cmdstat_config|resetstat"))


def test_a_shards_ledger_costs_few_commands_and_a_kept_result_stops_every_other_copy(tmp_path):
    with RedisServer(str(tmp_path / "redis")) as url:
        store = RunStore(url)
        run_id = f"costs-{uuid.uuid4().hex[:6]}"
        shards = [{"shard_id": f"shard-{i:05d}", "start": 8 * i, "stop": 8 * i + 8} for i in range(2)]
        store.runs.save_manifest(run_manifest(run_id, shards))
        sid, info = shards[0]["shard_id"], {"worker": "w", "images": 8}
        for script in ("CLAIM", "TICK", "COMMIT", "RENEW", "FAIL"):  # loaded once per connection: not a shard's cost
            store._scripts[script].sha = store.r.script_load(store._scripts[script].script)
        _commands(store.r)

        assert store.ledger.claim_shard(run_id, sid, holder="a#1", lease_s=30, info=info, max_attempts=3) == ("ok", (1, 0))
        claim = _commands(store.r)
        # the same shard delivered again (a worker that seemed gone): the new copy takes the lease
        assert store.ledger.claim_shard(run_id, sid, holder="b#2", lease_s=30, info=info, max_attempts=3) == ("ok", (2, 0))
        _commands(store.r)
        assert store.ledger.shard_tick(run_id, sid, holder="b#2", done=3, lease_s=30) == ("ok", None)
        tick = _commands(store.r)
        assert store.ledger.shard_tick(run_id, sid, holder="a#1", done=5, lease_s=30) == ("stop", "superseded")
        assert store.ledger.images_done(run_id) == 3  # the running copy's progress, from its lease
        assert store.ledger.renew_lease(run_id, sid, "b#2", 30) and not store.ledger.renew_lease(run_id, sid, "a#1", 30)
        _commands(store.r)
        outcome = store.ledger.commit_shard(run_id, sid, holder="b#2", status="ok", result={"shard_id": sid},
                                     summary={"status": "ok", "images": 8, "finished_at": 5.0})
        first_commit = _commands(store.r)
        assert outcome == ("accepted", (1, 2, 1))
        other = shards[1]["shard_id"]
        assert store.ledger.claim_shard(run_id, other, holder="a#4", lease_s=30, info=info, max_attempts=3) == ("ok", (1, 0))
        _commands(store.r)
        assert store.ledger.commit_shard(run_id, other, holder="a#4", status="ok", result={"shard_id": other},
                                  summary={"status": "ok", "images": 8, "finished_at": 4.0}) == ("accepted", (2, 2, 2))
        commit = _commands(store.r)
        # EVALSHA and the commands inside each script: the claim reads what the run holds against
        # the worker (one HMGET); a commit before the run's last counts the finished shards (one
        # HLEN), and the run's first kept result also gives the run's four shard records their expiry
        assert (claim, tick, commit, first_commit) == (6, 3, 7, 12)
        # the kept result stops every other copy, without reading the results
        assert store.ledger.shard_tick(run_id, sid, holder="a#1", done=6, lease_s=30) == ("stop", "done-elsewhere")
        assert store.ledger.claim_shard(run_id, sid, holder="c#3", lease_s=30, info=info, max_attempts=3) == \
            ("has-result", None)
        assert store.ledger.commit_shard(run_id, sid, holder="a#1", status="ok", result={"shard_id": sid},
                                  summary={"status": "ok"}) == ("dropped", "duplicate")
        assert store.ledger.images_done(run_id) == 16 == store.ledger.images_done(run_id, accepted_only=True)
        assert store.ledger.last_accepted_at(run_id) == 5.0
        # the run's first kept result gave its records their expiry (no shard script writes one)
        for part in ("results", "finished", "attempts", "running", "dropped"):
            key = f"nasq:run:{run_id}:{part}"
            assert store.r.exists(key) == 0 or store.r.ttl(key) > 0, part
        store.r.close()


def test_a_run_leaves_no_record_without_expiry(assets, workers, settings, redis_url):
    res = evaluate(weights=assets["weights"], data=assets["data"], labels=assets["labels"], batch_size=4,
                   shard_size=8, queue=workers.queue, settings=settings, progress=False, log=lambda *_: None)
    r = RunStore(redis_url).r
    keys = list(r.scan_iter(f"*{res.run_id}*", count=1000))
    assert len(keys) > 8
    assert {k.decode(): -1 for k in keys if r.ttl(k) == -1} == {}  # -1: no expiry (-2: gone meanwhile)


def test_task_events_only_when_asked_for(assets, workers, settings):
    """Workers send no task events by default (four messages a shard that only a monitor reads);
    Celery's enable_events, which `nasq flower` and Flower send, turns them on."""
    app = make_app(settings)
    seen: list[str] = []
    stop = threading.Event()

    def listen():
        with app.connection_for_read() as conn:
            recv = app.events.Receiver(conn, handlers={"*": lambda e: seen.append(e["type"])})
            while not stop.is_set():
                try:
                    recv.capture(limit=None, timeout=0.5, wakeup=False)
                except TimeoutError:
                    pass
                except OSError:
                    time.sleep(0.1)

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    try:
        # the receiver listens once it gets an event sent after it started (no fixed wait)
        with app.events.default_dispatcher() as probe:
            deadline = time.time() + 60
            while "nasq-probe" not in seen:
                assert time.time() < deadline, "the event receiver never started"
                probe.send("nasq-probe")
                time.sleep(0.2)
        run = lambda: evaluate(weights=assets["weights"], data=assets["data"], labels=assets["labels"],  # noqa: E731
                               batch_size=4, shard_size=8, queue=workers.queue, settings=settings, progress=False,
                               log=lambda *_: None)
        run()
        assert not [e for e in seen if e.startswith("task-")], seen
        app.control.enable_events()
        run()
        deadline = time.time() + 20
        while time.time() < deadline and "task-succeeded" not in seen:
            time.sleep(0.2)
        assert {"task-received", "task-started", "task-succeeded"} <= set(seen), seen
    finally:
        app.control.disable_events()  # the module's workers go back to the default
        stop.set()
        t.join(5)
        app.close()


def test_plots_whose_merging_worker_died_are_rendered_by_the_next(assets, redis_url, start_workers, tmp_path):
    """The numbers are stored before the plots and the page are rendered: a merging worker
    SIGKILLed then leaves them unrendered, and the waiting client has the run's merge sent again,
    which a live worker turns into the rendering (the report itself is not changed)."""
    from nasq.queue.store import RunStore

    settings = Settings(broker_url=redis_url, report_dir=str(tmp_path / "reports"), merge_wait_s=20,
                        artifact_dir=str(tmp_path / "art"), work_dir=str(tmp_path / "runs"))
    queue = f"eval.render-{uuid.uuid4().hex[:6]}"
    first = start_workers(redis_url, queue, settings=settings)
    store, later = RunStore(redis_url), {}

    def kill_the_merging_worker(result):
        for _, proc, _ in first.procs:
            os.killpg(proc.pid, signal.SIGKILL)
        # whatever it managed before the kill is undone: the rendering is left to the next worker
        store.r.delete(f"nasq:run:{result.run_id}:rendered", f"nasq:run:{result.run_id}:rendering")
        for kind in result.report.files_to_come:
            if os.path.exists(result.report.files[kind]):
                os.remove(result.report.files[kind])
        later["report"] = result.report
        later["workers"] = start_workers(redis_url, queue, settings=settings)

    h = submit_evaluation(weights=assets["weights"], data=assets["data"], labels=assets["labels"], batch_size=4,
                          shard_size=8, queue=queue, settings=settings, log=lambda *_: None)
    try:
        res = h.wait(progress=False, timeout=300, log=lambda *_: None, on_report=kill_the_merging_worker)
    finally:
        h.close()
    assert res.report.files_to_come == ("plot", "devices", "html") and res.not_rendered == {}
    assert all(os.path.getsize(res.report.files[k]) > 0 for k in res.report.files_to_come)
    assert store.runs.report(h.run_id) == later["report"] == res.report  # rendering changed no number
    later["workers"].stop()


def test_celerys_chord_script_takes_nasqs_two_edits():
    """nasq counts a chord's parts with Celery's own script, edited in two places; a Celery
    release that changes those lines makes the edit a no-op, and this test says so."""
    from celery.backends.redis import CHORD_PART_RETURN_LUA

    from nasq.queue.transport import CHORD_PART_RETURN

    assert CHORD_PART_RETURN != CHORD_PART_RETURN_LUA, "Celery's chord script changed: update _CHORD_EDITS"
    assert "if expires > 0 and readycount == 1 then" in CHORD_PART_RETURN
    assert "redis.call('MGET', tkey, skey)" in CHORD_PART_RETURN and "redis.call('GET', tkey)" not in CHORD_PART_RETURN
