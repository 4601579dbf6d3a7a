"""Run-level Prometheus metrics (``nasq metrics``): what Flower cannot say, since it knows tasks
and not runs. Each scrape reads the run store: the active runs and the most recent ended ones.

    nasq_run_images_total{run_id,backend,queue}      images in the run's dataset
    nasq_run_images_done{run_id,backend,queue}       images of accepted results so far (and of running copies)
    nasq_run_shards_done{run_id,backend,queue}       shards whose result was kept
    nasq_run_shards_failed{run_id,backend,queue}     shards that failed (until `nasq resume` sends them again)
    nasq_run_info{run_id,backend,queue,state}        1, with the run's state as a label
    nasq_run_throughput_img_s{run_id,...}            images / s over the shards' span so far
    nasq_run_top1_so_far_percent{run_id,...}         top-1 over the finished shards' labelled images
    nasq_run_device_throughput_img_s{run_id,worker,device}  per worker (device: host/device), over its kept
                                                     shards' time
    nasq_run_devices_excluded{run_id,backend,queue}  workers excluded from the run (failed shards in a row)
    nasq_run_device_excluded{run_id,worker,device}   1 per excluded worker (device: host/device)
    nasq_queue_live_workers{queue}                   live workers consuming the queue of an active run
    nasq_workers_alive                               workers with a recent heartbeat
"""
from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily

from ..results.status import run_status
from .store import RunStore


class RunCollector:
    """A prometheus_client collector over a run store."""

    def __init__(self, store: RunStore, *, recent: int = 20):
        self.store, self.recent = store, recent

    def collect(self):
        labels = ["run_id", "backend", "queue"]
        g = {name: GaugeMetricFamily(f"nasq_run_{name}", doc, labels=labels) for name, doc in (
            ("images_total", "Images in the run's dataset"),
            ("images_done", "Images of accepted shard results so far, plus the progress of running copies"),
            ("shards_done", "Shards whose result was kept"),
            ("shards_failed", "Shards that failed (until nasq resume sends them again)"),
            ("throughput_img_s", "Images per second over the shards' span so far"),
            ("top1_so_far_percent", "Top-1 accuracy over the labelled images of the finished shards"),
            ("devices_excluded", "Workers excluded from the run after failing shards in a row"))}
        info = GaugeMetricFamily("nasq_run_info", "1 per run, its state as a label", labels=[*labels, "state"])
        dev = GaugeMetricFamily("nasq_run_device_throughput_img_s", "Per worker: images / s over its shards' time",
                                labels=["run_id", "worker", "device"])
        excluded = GaugeMetricFamily("nasq_run_device_excluded", "1 per worker excluded from the run",
                                     labels=["run_id", "worker", "device"])
        active = self.store.active_runs()
        runs = list(dict.fromkeys([*active, *self.store.run_ids(self.recent)]))
        for run_id in runs:
            manifest = self.store.manifest(run_id)
            if manifest is None:
                continue
            st = run_status(self.store, run_id)
            values = [run_id, str(manifest.get("backend") or ""), str(manifest.get("queue") or "")]
            g["images_total"].add_metric(values, st["images_total"])
            g["images_done"].add_metric(values, st["images_done"])
            g["shards_done"].add_metric(values, st["shards_done"])
            g["shards_failed"].add_metric(values, st["shards_failed"])
            g["throughput_img_s"].add_metric(values, st["rate_img_s"] or 0.0)
            finished = [s for s in self.store.finished(run_id).values() if s.get("status") == "ok"]
            labelled = sum(s.get("labelled", 0) for s in finished)
            if labelled:
                g["top1_so_far_percent"].add_metric(values, 100.0 * sum(s.get("top1_correct", 0) for s in finished)
                                                    / labelled)
            info.add_metric([*values, st["state"]], 1)
            barred = {w: e for w, e in st["excluded_devices"].items() if not e.get("lifted")}
            g["devices_excluded"].add_metric(values, len(barred))
            for worker, e in barred.items():
                excluded.add_metric([run_id, worker, f"{e.get('host')}/{e.get('device')}"], 1)
            for worker, w in st["workers"].items():
                where = f"{w['host']}/{w.get('device')}" if w.get("host") else str(w.get("device"))
                dev.add_metric([run_id, worker, where], w.get("rate_img_s") or 0.0)
        yield from g.values()
        yield info
        yield dev
        yield excluded
        live = GaugeMetricFamily("nasq_queue_live_workers", "Live workers consuming the queue of an active run",
                                 labels=["queue"])
        for queue in sorted({(self.store.manifest(r) or {}).get("queue") for r in active} - {None}):
            live.add_metric([queue], len(self.store.live_consumers(queue)))
        yield live
        alive = GaugeMetricFamily("nasq_workers_alive", "Workers with a recent heartbeat")
        alive.add_metric([], sum(1 for w in self.store.workers().values() if w["alive"]))
        yield alive


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
