"""``nasq metrics`` as Prometheus reads it: names and types that ``promtool check metrics``
accepts (run when promtool is installed; prometheus_client's parser always), counters that only
grow, and histograms of shard durations and batch latencies per device, scraped while a run goes
on and after it ended. Real Redis, real simulated-device workers."""
import shutil
import subprocess
import uuid

from prometheus_client import generate_latest
from prometheus_client.core import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from nasq.api import submit_evaluation
from nasq.config import Settings
from nasq.queue.metrics import RunCollector
from nasq.queue.store import RunStore
from waiting import Waiter, sim_weights, until


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _promtool_accepts(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool:  # Prometheus' own linter (Debian: apt install prometheus)
        p = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stdout + p.stderr


def _samples(fams: dict, family: str, run_id: str, suffix: str = "") -> list:
    return [s for s in fams[family].samples if s.labels.get("run_id") == run_id and s.name == family + suffix]


def test_metrics_during_and_after_a_run_pass_promtool_with_counters_and_histograms(redis_url, start_workers, tmp_path):
    queue = f"eval.metrics-{uuid.uuid4().hex[:6]}"
    settings = Settings(broker_url=redis_url, report_dir=str(tmp_path / "rep"), lease_s=5)
    fleet = start_workers(redis_url, queue, backend="sim", devices=["npu:0", "npu:1"], sim="rate=400",
                          settings=settings)
    h = submit_evaluation(weights=sim_weights(tmp_path), data="index:960", backend="sim", batch_size=8,
                          shard_size=40, queue=queue, settings=settings)
    waiter = Waiter(h, timeout=180)
    store = RunStore(redis_url)
    registry = CollectorRegistry()
    collector = RunCollector(store)
    registry.register(collector)
    # during the run: some shards kept, not all
    until(lambda: 2 <= sum(1 for s in store.ledger.finished(h.run_id).values() if s.get("status") == "ok") < 24,
          120, "a run part done")
    during = generate_latest(registry).decode()
    _promtool_accepts(during)
    fams = _families(during)
    state = [s.labels["state"] for s in _samples(fams, "nasq_run_info", h.run_id)]
    assert state == ["running"], during
    early = {tuple(sorted(s.labels.items())): s.value for s in _samples(fams, "nasq_images", h.run_id, "_total")}
    assert early and all(v % 40 == 0 and v > 0 for v in early.values())
    assert {s.labels["outcome"] for s in _samples(fams, "nasq_shards", h.run_id, "_total")} == {"kept"}
    assert fams["nasq_shard_duration_seconds"].type == "histogram"
    assert _samples(fams, "nasq_shard_duration_seconds", h.run_id, "_bucket")
    waiter.join(200)
    assert waiter.error is None and waiter.result.report.images == 960
    after = generate_latest(registry).decode()
    _promtool_accepts(after)
    fams = _families(after)
    images = {tuple(sorted(s.labels.items())): s.value for s in _samples(fams, "nasq_images", h.run_id, "_total")}
    assert sum(images.values()) == 960 and all(images[k] >= v for k, v in early.items())  # counters only grow
    assert {dict(k)["worker"] for k in images} == set(fleet.names)  # both devices, one series each
    assert all(dict(k)["host"] and dict(k)["device"] in ("npu:0", "npu:1") for k in images)
    kept = sum(s.value for s in _samples(fams, "nasq_shards", h.run_id, "_total") if s.labels["outcome"] == "kept")
    assert kept == 24
    for family, low, high in (("nasq_shard_duration_seconds", 24, 24), ("nasq_batch_latency_seconds", 24 * 4, 24 * 5)):
        counts = _samples(fams, family, h.run_id, "_count")
        infinite = [s for s in _samples(fams, family, h.run_id, "_bucket") if s.labels["le"] == "+Inf"]
        assert low <= sum(s.value for s in counts) <= high, family
        assert sorted(s.value for s in infinite) == sorted(s.value for s in counts)
    # a simulated batch of 8 at 400 img/s takes 20 ms: none in the buckets up to 10 ms
    assert all(s.value == 0 for s in _samples(fams, "nasq_batch_latency_seconds", h.run_id, "_bucket")
               if float(s.labels["le"]) <= 0.01)
    (rate,) = _samples(fams, "nasq_run_throughput_images_per_second", h.run_id)
    assert rate.value > 0
    assert [s.value for s in _samples(fams, "nasq_run_images", h.run_id)] == [960.0]
    # the same collector after the run's records are gone keeps its counters (they never go down)
    collector._high = {k: v + (1000 if k[0] == "nasq_images" else 0) for k, v in collector._high.items()}
    again = _families(generate_latest(registry).decode())
    assert sum(s.value for s in _samples(again, "nasq_images", h.run_id, "_total")) == 960 + 1000 * len(images)
