"""Run-level Prometheus metrics (``nasq metrics``): what Flower cannot say, since it knows tasks
and not runs. Each scrape reads the run store: the active runs and the most recent ended ones.
Names follow Prometheus' conventions (``promtool check metrics`` accepts them): counters end in
``_total``, times are seconds, accuracies ratios; per-device series carry ``host``, ``device``
and ``worker``.

Counters and histograms, per run and device, from the shards' records (``kept``: the result
that counts; ``failed``: every failed attempt, also of shards that then ran elsewhere)::

    nasq_images_total{run_id,host,device,worker}                     images evaluated in kept shards
    nasq_image_errors_total{run_id,host,device,worker}               images of kept shards that could not be used
    nasq_shards_total{run_id,host,device,worker,outcome}             outcome: kept | failed
    nasq_shard_duration_seconds{run_id,host,device,worker}           histogram, kept shards' wall time
    nasq_batch_latency_seconds{run_id,host,device,worker}            histogram, measured batches

Gauges, per run (``backend``, ``queue``) and per device::

    nasq_run_info{run_id,backend,queue,state}                        1, the run's state as a label
    nasq_run_images{run_id,backend,queue}                            images in the run's dataset
    nasq_run_images_done{run_id,backend,queue}                       kept shards' images + running copies' progress
    nasq_run_shards{run_id,backend,queue}                            shards of the run
    nasq_run_shards_done{run_id,backend,queue}                       shards whose result was kept
    nasq_run_shards_failed{run_id,backend,queue}                     shards failed for good (until nasq resume)
    nasq_run_throughput_images_per_second{run_id,backend,queue}      over the shards' span so far
    nasq_run_top1_ratio{run_id,backend,queue}                        top-1 (0..1) over the kept shards' labelled images
    nasq_run_devices_excluded{run_id,backend,queue}                  workers excluded from the run
    nasq_run_device_excluded{run_id,host,device,worker}              1 per excluded worker
    nasq_run_device_throughput_images_per_second{run_id,host,device,worker}  over the worker's kept shards' time
    nasq_queue_live_workers{queue}                                   live workers on the queue of an active run
    nasq_workers_alive                                               workers with a recent heartbeat

A counter never goes down while the exporter runs: a value read lower than before (a run's
records expired) keeps the earlier one.
"""
from __future__ import annotations

import math

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from ..inference.shard import BATCH_BUCKETS_S
from ..wire import MessageError
from ..results.status import run_status
from ..runstate import ShardStatus
from .store import RunStore

#: upper bounds (seconds) of the shard-duration buckets
SHARD_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
_DEVICE = ["run_id", "host", "device", "worker"]
_RUN = ["run_id", "backend", "queue"]


class _Histogram:
    """Bucket counts (not cumulative; one more than the bounds), sum and count."""

    def __init__(self, bounds):
        self.bounds, self.counts, self.sum, self.count = bounds, [0] * (len(bounds) + 1), 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))] += 1
        self.sum += value
        self.count += 1

    def add(self, counts, total: float, n: int) -> None:
        if len(counts) == len(self.counts):
            self.counts = [a + int(b) for a, b in zip(self.counts, counts)]
            self.sum += float(total)
            self.count += int(n)

    def exposition(self) -> tuple[list, float]:
        cumulative, run = [], 0
        for bound, n in zip([*self.bounds, math.inf], self.counts):
            run += n
            cumulative.append(("+Inf" if bound == math.inf else repr(float(bound)), run))
        return cumulative, self.sum


def _device_labels(run_id: str, rec: dict) -> tuple:
    return run_id, str(rec.get("host") or ""), str(rec.get("device") or ""), str(rec.get("worker") or "")


class RunCollector:
    """A prometheus_client collector over a run store."""

    def __init__(self, store: RunStore, *, recent: int = 20):
        self.store, self.recent = store, recent
        self._high: dict[tuple, float] = {}  # (metric, labels) -> highest counter value served
        self._hist_high: dict[tuple, _Histogram] = {}

    def _counter(self, family: CounterMetricFamily, labels: tuple, value: float) -> None:
        key = (family.name, labels)
        value = max(value, self._high.get(key, 0.0))
        self._high[key] = value
        family.add_metric(list(labels), value)

    def _histogram(self, family: HistogramMetricFamily, labels: tuple, h: _Histogram) -> None:
        key = (family.name, labels)
        if h.count < getattr(self._hist_high.get(key), "count", 0):
            h = self._hist_high[key]
        self._hist_high[key] = h
        buckets, total = h.exposition()
        family.add_metric(list(labels), buckets, total)

    def collect(self):
        run_g = {name: GaugeMetricFamily(f"nasq_run_{name}", doc, labels=_RUN) for name, doc in (
            ("images", "Images in the run's dataset"),
            ("images_done", "Images of kept shard results so far, plus the progress of running copies"),
            ("shards", "Shards of the run"),
            ("shards_done", "Shards whose result was kept"),
            ("shards_failed", "Shards that failed for good (until nasq resume sends them again)"),
            ("throughput_images_per_second", "Images per second over the shards' span so far"),
            ("top1_ratio", "Top-1 accuracy (0 to 1) over the labelled images of the kept shards"),
            ("devices_excluded", "Workers excluded from the run after failing shards in a row"))}
        info = GaugeMetricFamily("nasq_run_info", "1 per run, its state as a label", labels=[*_RUN, "state"])
        dev_rate = GaugeMetricFamily("nasq_run_device_throughput_images_per_second",
                                     "Per worker: images per second over its kept shards' time", labels=_DEVICE)
        excluded = GaugeMetricFamily("nasq_run_device_excluded", "1 per worker excluded from the run", labels=_DEVICE)
        images = CounterMetricFamily("nasq_images", "Images evaluated in kept shards, per run and device",
                                     labels=_DEVICE)
        errors = CounterMetricFamily("nasq_image_errors", "Images of kept shards that could not be used (unreadable, "
                                     "changed, not an image), per run and device", labels=_DEVICE)
        shards = CounterMetricFamily("nasq_shards", "Shard attempts that ended, per run, device and outcome "
                                     "(kept: the result that counts; failed: a failed attempt)",
                                     labels=[*_DEVICE, "outcome"])
        shard_s = HistogramMetricFamily("nasq_shard_duration_seconds", "Wall time of the kept shards",
                                        labels=_DEVICE)
        batch_s = HistogramMetricFamily("nasq_batch_latency_seconds",
                                        "Latency of the measured batches of the kept shards", labels=_DEVICE)
        active = self.store.runs.active_runs()
        queue_of: dict[str, str | None] = {}  # the runs served now, and their queues
        for run_id in dict.fromkeys([*active, *self.store.runs.run_ids(self.recent)]):
            try:
                manifest = self.store.runs.manifest(run_id)
            except MessageError:
                continue  # a record written by hand: nasq status names what is wrong with it
            if manifest is None:
                continue
            queue_of[run_id] = manifest.queue
            st = run_status(self.store, run_id, manifest)
            values = [run_id, manifest.job.backend, manifest.queue]
            for name, value in (("images", st["images_total"]), ("images_done", st["images_done"]),
                                ("shards", st["shards_total"]), ("shards_done", st["shards_done"]),
                                ("shards_failed", st["shards_failed"]),
                                ("throughput_images_per_second", st["rate_img_s"] or 0.0)):
                run_g[name].add_metric(values, value)
            kept = [s for s in self.store.ledger.finished(run_id).values() if s.get("status") == ShardStatus.OK]
            labelled = sum(s.get("labelled", 0) for s in kept)
            if labelled:
                run_g["top1_ratio"].add_metric(values, sum(s.get("top1_correct", 0) for s in kept) / labelled)
            info.add_metric([*values, st["state"]], 1)
            barred = {w: e for w, e in st["excluded_devices"].items() if not e.get("lifted")}
            run_g["devices_excluded"].add_metric(values, len(barred))
            for worker, e in barred.items():
                excluded.add_metric(list(_device_labels(run_id, {**e, "worker": worker})), 1)
            for worker, w in st["workers"].items():
                dev_rate.add_metric(list(_device_labels(run_id, {**w, "worker": worker})), w.get("rate_img_s") or 0.0)
            self._per_device(run_id, kept, images, errors, shards, shard_s, batch_s)
        for memo in (self._high, self._hist_high):  # a run no longer served is forgotten (labels[0]: its id)
            for key in [k for k in memo if k[1][0] not in queue_of]:
                del memo[key]
        yield from run_g.values()
        yield from (info, dev_rate, excluded, images, errors, shards, shard_s, batch_s)
        live = GaugeMetricFamily("nasq_queue_live_workers", "Live workers consuming the queue of an active run",
                                 labels=["queue"])
        for queue in sorted({queue_of.get(r) for r in active} - {None}):
            live.add_metric([queue], len(self.store.registry.live_consumers(queue)))
        yield live
        alive = GaugeMetricFamily("nasq_workers_alive", "Workers with a recent heartbeat")
        alive.add_metric([], sum(1 for w in self.store.registry.workers().values() if w["alive"]))
        yield alive

    def _per_device(self, run_id: str, kept: list[dict], images, errors, shards, shard_s, batch_s) -> None:
        count: dict[tuple, int] = {}
        unusable: dict[tuple, int] = {}
        done: dict[tuple, int] = {}
        failed: dict[tuple, int] = {}
        durations: dict[tuple, _Histogram] = {}
        batches: dict[tuple, _Histogram] = {}
        for rec in kept:
            labels = _device_labels(run_id, rec)
            count[labels] = count.get(labels, 0) + int(rec.get("images", 0))
            unusable[labels] = unusable.get(labels, 0) + int(rec.get("errors", 0))
            done[labels] = done.get(labels, 0) + 1
            if isinstance(rec.get("wall_s"), (int, float)):
                durations.setdefault(labels, _Histogram(SHARD_BUCKETS_S)).observe(float(rec["wall_s"]))
            b = rec.get("batch_s")
            if isinstance(b, dict):
                batches.setdefault(labels, _Histogram(BATCH_BUCKETS_S)).add(b.get("counts", ()), b.get("sum_s", 0.0),
                                                                            b.get("count", 0))
        for copies in self.store.ledger.failures(run_id).values():
            for rec in copies:
                labels = _device_labels(run_id, rec)
                failed[labels] = failed.get(labels, 0) + 1
        for labels, n in count.items():
            self._counter(images, labels, n)
            self._counter(errors, labels, unusable.get(labels, 0))
        for outcome, table in (("kept", done), ("failed", failed)):
            for labels, n in table.items():
                self._counter(shards, (*labels, outcome), n)
        for family, table in ((shard_s, durations), (batch_s, batches)):
            for labels, h in table.items():
                self._histogram(family, labels, h)


def serve(store: RunStore, *, port: int, address: str = "127.0.0.1", recent: int = 20):
    """Serve /metrics on ``address:port`` in a background thread; returns the HTTP server."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(RunCollector(store, recent=recent))
    server, _thread = start_http_server(port, addr=address, registry=registry)
    return server


def serve_forever(store: RunStore, *, port: int, address: str = "127.0.0.1", recent: int = 20, log=print) -> None:
    """``nasq metrics``: serve /metrics until interrupted."""
    import time

    serve(store, port=port, address=address, recent=recent)
    log(f"run metrics on http://{address}:{port}/metrics (Ctrl-C stops)")
    while True:
        time.sleep(3600)
