"""A run recorded by the previous release is read by this one: its records in Redis as that
release wrote them (``tests/data/previous_release_run.json``: a done run of 16 images in 4
shards on a SIMULATED device, with labels, dumped key by key from its Redis) are restored into
a Redis of their own, then read through the store, the merge, the status and the CLI."""
from __future__ import annotations

import json
import os

import pytest

from nasq.queue.redis_server import RedisServer
from nasq.queue.store import RunStore
from nasq.results.merge import merge
from nasq.results.report import render
from nasq.results.status import run_status
from nasq.rundata import Report, RunManifest
from nasq.wire import MessageError

RUN_ID = "20261207-093626-0e3a96"
RECORDS = os.path.join(os.path.dirname(__file__), "..", "data", "previous_release_run.json")


def _restore(store: RunStore) -> dict:
    """Every key of the run as the previous release left it; returns the records as written."""
    with open(RECORDS) as f:
        records = json.load(f)
    for key, rec in records.items():
        value = rec["value"]
        if rec["type"] == "string":
            store.r.set(key, value)
        elif rec["type"] == "hash":
            store.r.hset(key, mapping=value)
        elif rec["type"] == "set":
            store.r.sadd(key, *value)
    store.r.zadd("nasq:runs", {RUN_ID: 1796636186.0})
    return records


def test_a_run_of_the_previous_release_reads_and_writes_back_unchanged(tmp_path, cli):
    with RedisServer(str(tmp_path / "redis")) as url:
        store = RunStore(url)
        records = _restore(store)
        raw_manifest = json.loads(records[f"nasq:run:{RUN_ID}:manifest"]["value"])
        raw_report = json.loads(records[f"nasq:run:{RUN_ID}:report"]["value"])
        # the typed records write back exactly what was read
        assert RunManifest.from_payload(raw_manifest).to_payload() == raw_manifest
        assert Report.from_payload(raw_report).to_payload() == raw_report

        manifest, report = store.runs.manifest(RUN_ID), store.runs.report(RUN_ID)
        assert manifest.job.backend == "sim" and manifest.shard_ids == [f"shard-{k:05d}" for k in range(4)]
        assert manifest.job.labels_sha256 and manifest.command[:2] == ("nasq", "eval")
        assert report.images == 16 and report.top1 == 62.5 and report.top1_ci95[0] < 62.5 < report.top1_ci95[1]
        assert report.environment.command == manifest.command and report.dataset == manifest.job.dataset
        assert "62.50%" in render(report) and "SIMULATED" in render(report)

        # its shard results merge into the same numbers
        again, pred = merge(manifest, list(store.ledger.shard_results(RUN_ID).values()))
        assert (again.images, again.top1, again.top5, again.correct) == (16, 62.5, 100.0, report.correct)
        assert again.per_device[0]["latency_ms"] == report.per_device[0]["latency_ms"] and len(pred["names"]) == 16

        st = run_status(store, RUN_ID)
        assert st["state"] == "done" and st["images_done"] == 16 and st["shards_done"] == st["shards_total"] == 4

        shown = cli(["status", RUN_ID, "--json"], broker=url, report_dir=tmp_path / "rep")
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["report"] == raw_report
        listed = cli(["runs", "--json"], broker=url, report_dir=tmp_path / "rep")
        (row,) = [r for r in json.loads(listed.stdout) if r["run_id"] == RUN_ID]
        assert row["top1"] == 62.5 and row["state"] == "done" and row["images"] == 16

        # a record changed by hand is refused by name, not read half
        store.r.set(f"nasq:run:{RUN_ID}:report", "{not json")
        with pytest.raises(MessageError, match="is not JSON"):
            store.runs.report(RUN_ID)
        store.r.set(f"nasq:run:{RUN_ID}:manifest", json.dumps({**raw_manifest, "shards": "all"}))
        with pytest.raises(MessageError, match="shards must be a list"):
            store.runs.manifest(RUN_ID)


def test_a_partial_report_of_the_earliest_releases_stays_partial_and_is_never_final(tmp_path):
    """Releases before runs had a ``state`` marked a failed run's report ``partial`` only: it
    reads as incomplete, is never taken for a final report (write once does not hold a failed
    run), and is written back as it was."""
    from nasq.results.publish import ended_on_disk
    from nasq.results.report import state_line

    old = {"run_id": "20261101-120000-abcdef", "created": 1.0, "finished": 2.0, "images": 8, "images_total": 24,
           "top1": 50.0, "top5": 100.0, "throughput_img_s": 4.0, "wall_s": 2.0,
           "throughput": {"shard_span_img_s": 4.0, "end_to_end_img_s": None, "end_to_end_s": None,
                          "compute_img_s": 5.0},
           "model_load_s": 0.5, "error_count": 0, "errors": [], "per_device": [],
           "backend": {"name": "torch", "versions": {"torch": "2.5.0"}}, "model": {"weights": "/w.pth"},
           "num_outputs": 1001, "batch_size": 8, "precision": "fp32",
           "dataset": {"root": "/d", "kind": "jpeg", "images": 24, "fingerprint": "f"}, "labels_file": None,
           "shards": 3, "duplicate_shard_results_dropped": [], "partial": True, "failure": "boom", "shards_ok": 1,
           "shards_not_ok": ["shard-00001", "shard-00002"]}
    report = Report.from_payload(old)
    assert report.to_payload() == old and report.state is None and not report.complete
    assert report.shown_state == "partial" and state_line(report).startswith("PARTIAL: 8 of 24 images")
    folder = tmp_path / old["run_id"]
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps(old))
    assert ended_on_disk(str(tmp_path), old["run_id"]) is None  # not final: the run may be resumed


def test_a_manifest_rewritten_in_redis_is_left_alone_by_healing_and_listings(tmp_path, caplog):
    """A running run whose manifest was rewritten by hand (no signing): healing refuses to act
    on it, once in the log, naming the field; `nasq runs` leaves it out; nothing is sent."""
    from nasq.config import Settings
    from nasq.queue.app import make_app
    from nasq.queue.healing import Healer
    from nasq.results.status import runs_rows

    with RedisServer(str(tmp_path / "redis")) as url:
        store = RunStore(url)
        records = _restore(store)
        bad = {**json.loads(records[f"nasq:run:{RUN_ID}:manifest"]["value"]), "shards": "all"}
        store.r.set(f"nasq:run:{RUN_ID}:manifest", json.dumps(bad))
        store.r.set(f"nasq:run:{RUN_ID}:state", json.dumps({"state": "running", "at": 0, "shards": 4}))
        store.r.delete(f"nasq:run:{RUN_ID}:results", f"nasq:run:{RUN_ID}:finished")
        settings = Settings(broker_url=url, report_dir=str(tmp_path / "rep"))
        app = make_app(settings)
        healer = Healer.for_settings(app, store, settings)
        with caplog.at_level("WARNING"):
            assert healer.heal(RUN_ID) == [] and healer.heal(RUN_ID) == []
        refusals = [r.getMessage() for r in caplog.records if "refused to act on its record" in r.getMessage()]
        assert len(refusals) == 1 and "shards must be a list" in refusals[0]
        assert store.ledger.redispatched(RUN_ID) == {} and store.r.llen("eval.sim") == 0  # nothing sent
        assert RUN_ID not in {r["run_id"] for r in runs_rows(store, str(tmp_path / "rep"))}
