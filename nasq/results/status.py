"""``nasq status`` and ``nasq runs``: what is running, from the run records (the run store)."""
from __future__ import annotations

import os
import sys
import time

from ..errors import NasqError
from ..rundata import RunManifest
from ..runstate import ShardStatus, is_ended
from ..wire import MessageError
from ..tables import num, table


def _bar(done: int, total: int, width: int = 30) -> str:
    """tqdm's progress bar (ASCII: it goes to logs and pipes too) of ``width`` characters."""
    from tqdm import tqdm

    return tqdm.format_meter(min(done, total) if total else 1, total or 1, 0, ncols=width + 2, bar_format="|{bar}|",
                             ascii=True)


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def run_status(store, run_id: str, manifest: RunManifest | None = None) -> dict:
    """Progress numbers of one run: shards, images, rate, ETA, errors, per-worker activity.
    Images and rates count accepted results only (a kept shard's images, and while the run goes
    on the progress of the copies running now): never a failed, lost or cancelled copy's.
    ``manifest``: the run's, when read already."""
    manifest = manifest or store.runs.manifest(run_id)
    if manifest is None:
        raise NasqError(f"no run {run_id!r} in this Redis (runs expire after result_expires)")
    state = store.runs.state(run_id) or {}
    finished, running = store.ledger.finished(run_id), store.ledger.running(run_id)
    ok = {sid: s for sid, s in finished.items() if s.get("status") == ShardStatus.OK}
    failed = {sid: s for sid, s in finished.items() if s.get("status") != ShardStatus.OK}
    total_images = manifest.images
    ended = is_ended(state.get("state"))
    if ended:
        running = {}
    done = min(total_images, store.ledger.images_done(run_id, manifest, accepted_only=ended))
    if ended:  # an ended run's rate is over its kept shards' span, as in its report (throughput_img_s)
        t0 = min((s["started_at"] for s in ok.values() if "started_at" in s), default=None)
        t_end = max((s["finished_at"] for s in ok.values() if "finished_at" in s), default=None)
        evaluated = sum(s.get("images", 0) for s in ok.values())
    else:
        t0 = min([s["started_at"] for s in finished.values() if "started_at" in s]
                 + [r["at"] for r in running.values()], default=None)
        t_end, evaluated = time.time(), done
    lost = set() if ended else set(store.ledger.lost_shards(run_id))
    registry = store.registry.workers()
    full = None if ended or not store.is_full() else store.full_message()
    queue = manifest.queue
    consumers = sorted(n for n, w in registry.items() if w["alive"] and queue in w.get("queues", []))
    exclusions = store.ledger.exclusions(run_id)
    rate = evaluated / (t_end - t0) if t0 and t_end and evaluated and t_end > t0 else None
    eta = (total_images - done) / rate if rate and not ended and not lost and not full else None
    per_worker: dict[str, dict] = {}

    def worker(name: str, rec: dict) -> dict:
        return per_worker.setdefault(name, {"host": rec.get("host"), "device": rec.get("device"), "shards": 0,
                                            "images": 0, "wall_s": 0.0, "failed": 0, "from_cache": 0,
                                            "from_source": 0})

    for s in ok.values():
        w = worker(s.get("worker", "?"), s)
        w["shards"] += 1
        w["images"] += s.get("images", 0)
        w["wall_s"] += s.get("wall_s", 0.0)
        w["from_cache"] += s.get("from_cache", 0)
        w["from_source"] += s.get("from_source", 0)
    for s in failed.values():
        worker(s.get("worker", "?"), s)["failed"] += 1
    for sid, r in running.items():
        worker(r["worker"], r)["current"] = {"shard_id": sid, "images": r.get("images"), "since": r["at"],
                                             "lost": sid in lost}
    for name, e in exclusions.items():
        worker(name, e)
    for name, w in per_worker.items():
        w["rate_img_s"] = w["images"] / w["wall_s"] if w["wall_s"] else None
        w["alive"] = registry.get(name, {}).get("alive", False)
        if name in exclusions:
            w["excluded"] = exclusions[name]
    return {"run_id": run_id, "state": state.get("state", "unknown"), "error": state.get("error"),
            "shards_total": len(manifest.shards), "shards_done": len(ok), "shards_failed": len(failed),
            "shard_errors": len(failed), "failed_shards": {sid: s.get("error") for sid, s in sorted(failed.items())},
            "images_total": total_images, "images_done": done,
            "image_errors": sum(s.get("errors", 0) for s in ok.values()),
            "rate_img_s": rate, "eta_s": eta,
            "backend": manifest.job.backend, "batch_size": manifest.job.batch_size,
            "precision": manifest.job.precision, "model": os.path.basename(manifest.job.model.weights) or None,
            "simulated": manifest.job.backend == "sim", "workers": per_worker,
            "lost_shards": sorted(lost), "redispatched": store.ledger.redispatched(run_id),
            "redispatched_why": store.ledger.redispatched_why(run_id), "queue": queue, "live_consumers": consumers,
            "excluded_devices": exclusions, "shard_failures": store.ledger.failures(run_id),
            "refused": store.runs.refusals(run_id),
            "duplicate_shard_results_dropped": sorted(sid for sid, n in store.ledger.dropped(run_id).items() for _ in range(n)),
            "broker_full": full, "attempts": store.ledger.attempts(run_id),
            "from_cache_by_host": _by_host(per_worker)}


def _by_host(per_worker: dict) -> dict[str, dict]:
    """Per host: the images its kept shards read, and how many of them came from the host cache."""
    out: dict[str, dict] = {}
    for w in per_worker.values():
        h = out.setdefault(w.get("host") or "?", {"read": 0, "from_cache": 0})
        h["read"] += w.get("from_cache", 0) + w.get("from_source", 0)
        h["from_cache"] += w.get("from_cache", 0)
    return out


def render_status(st: dict) -> str:
    from ..inference.failover import who

    what = (f"  {st.get('model') or '?'}  backend {st.get('backend')}  precision {st.get('precision') or 'worker default'}"
            f"  batch {st.get('batch_size')}" + ("  SIMULATED (not a measurement)" if st.get("simulated") else ""))
    ended = is_ended(st["state"])
    lines = [f"run {st['run_id']}  {st['state']:<9} {_bar(st['images_done'], st['images_total'])} "
             f"shards {st['shards_done']}/{st['shards_total']}"
             + (f" ({st['shards_failed']} failed)" if st.get("shards_failed") else "")
             + f"  images {st['images_done']}/{st['images_total']}  {num(st['rate_img_s'])} img/s  "
               f"ETA {_eta(st['eta_s'])}  errors {st['image_errors']} images", what]
    if not ended and st.get("queue"):
        live = st.get("live_consumers") or []
        barred = {n for n, e in (st.get("excluded_devices") or {}).items() if not e.get("lifted")}
        serving = [n for n in live if n not in barred]
        if not live:
            lines.append(f"  queue {st['queue']}: NO live worker consumes it: nothing runs until one starts "
                         f"(`nasq worker --backend {st.get('backend')} --queues {st['queue']}` with this broker)")
        elif not serving:
            lines.append(f"  queue {st['queue']}: every live worker is excluded from the run ({', '.join(live)})")
        else:
            lines.append(f"  queue {st['queue']}: {len(serving)} live worker(s)" + (
                f" ({', '.join(serving)})" if len(serving) <= 8 else ""))
    for name, w in sorted(st["workers"].items()):
        cur = w.get("current")
        excluded = w.get("excluded")
        if excluded and not excluded.get("lifted"):
            doing = f"EXCLUDED ({excluded.get('shards_failed')} failed shards in a row)"
        elif st.get("broker_full") and w.get("alive", True):
            doing = "blocked: the broker is full" + (f" ({cur['shard_id']})" if cur else "")
        elif cur and cur.get("lost"):
            doing = f"LOST: {cur['shard_id']} (lease expired; dispatched again)"
        elif cur:
            doing = f"{cur['shard_id']} ({cur['images']} img, {time.time() - cur['since']:.0f} s)"
        else:
            doing = "idle" if w.get("alive", True) or ended else "gone (no heartbeat)"
        where = f"{w['host']}/{w.get('device')}" if w.get("host") else str(w.get("device"))
        lines.append(f"  {name:<30} {where:<16} {doing:<28} done {w['shards']} shards, "
                     f"{w['images']} img, {num(w['rate_img_s'])} img/s"
                     + (f", {w['from_cache']} from the host cache" if w.get("from_cache") else "")
                     + (f", {w['failed']} failed" if w.get("failed") else ""))

    def counts(d: dict) -> str:
        return ", ".join(f"{sid} (x{n})" for sid, n in sorted(d.items()))

    why = st.get("redispatched_why") or {}
    again = ", ".join(f"{sid} (x{n}{': ' + why[sid] if sid in why else ''})"
                      for sid, n in sorted((st.get("redispatched") or {}).items()))
    excluded = "; ".join(f"{who(e)} at {time.strftime('%H:%M:%S', time.localtime(e.get('at') or 0))} after "
                         f"{e.get('shards_failed')} failed shards in a row: {e.get('reason')}"
                         + (" (lifted by nasq resume)" if e.get("lifted") else "")
                         for e in (st.get("excluded_devices") or {}).values())
    elsewhere = "; ".join(f"{sid}: " + ", ".join(f"{f.get('worker')} ({'worker lost' if f.get('kind') == 'lost' else f.get('error')})"
                                                  for f in fs)
                          for sid, fs in sorted((st.get("shard_failures") or {}).items())
                          if sid not in (st.get("failed_shards") or {}))
    refused = "; ".join(f"{w}: {r.get('text')}" for w, r in sorted((st.get("refused") or {}).items()))
    notes = [("failed shards", "; ".join(f"{sid}: {why}" for sid, why in (st.get("failed_shards") or {}).items())),
             ("EXCLUDED devices", excluded),
             ("failed on a device (or its worker was lost), sent again", elsewhere),
             ("dispatched again", again),
             ("started more than once (a worker died, or a copy was sent again)",
              counts({sid: n for sid, n in (st.get("attempts") or {}).items() if n > 1})),
             ("copies of shards dropped (late or duplicate)", ", ".join(st.get("duplicate_shard_results_dropped") or [])),
             ("messages refused by workers for their signature", refused),
             ("images from the host cache", "; ".join(f"{h}: {x['from_cache']} of {x['read']} read" for h, x in
                                                      sorted((st.get("from_cache_by_host") or {}).items())
                                                      if x.get("from_cache"))),
             ("BROKER FULL", st.get("broker_full")), ("error", st.get("error"))]
    return "\n".join(lines + [f"  {label}: {text}" for label, text in notes if text])


def failing_devices(store, *, recent: int = 20) -> list[dict]:
    """Workers excluded from every one of the recent runs they took part in (at least two):
    a device that fails every run it touches. Each: worker, host, device, runs, the last reason."""
    seen: dict[str, dict] = {}
    for run_id in store.runs.run_ids(recent):
        touched = {s.get("worker") for s in store.ledger.finished(run_id).values()}
        touched |= {f.get("worker") for fs in store.ledger.failures(run_id).values() for f in fs}
        excluded = store.ledger.exclusions(run_id)
        for name in touched | set(excluded):
            if not name or name == "healing":
                continue
            rec = seen.setdefault(name, {"worker": name, "runs": 0, "excluded": 0})
            rec["runs"] += 1
            if name in excluded:
                e = excluded[name]
                rec["excluded"] += 1
                rec.setdefault("reason", e.get("reason"))
                rec.setdefault("host", e.get("host"))
                rec.setdefault("device", e.get("device"))
    return [r for r in seen.values() if r["runs"] >= 2 and r["excluded"] == r["runs"]]


def render_failing(devices: list[dict]) -> str:
    from ..inference.failover import who

    return "\n".join(f"device to look at: {who(d)} was excluded from each of the {d['runs']} recent runs it took "
                     f"part in (last: {d.get('reason')})" for d in devices)


def watch(store, run_id: str, *, interval: float = 1.0, out=sys.stdout) -> dict:
    """Redraw the status until the run ends; returns the last status."""
    tty = out.isatty()
    last = None
    while True:
        st = run_status(store, run_id)
        text = render_status(st)
        if tty:
            out.write("\x1b[H\x1b[2J" + text + "\n")
        elif text.splitlines()[0] != last:
            out.write(text.splitlines()[0] + "\n")
        last = text.splitlines()[0]
        out.flush()
        if is_ended(st["state"]):
            return st
        time.sleep(interval)


def runs_rows(store, report_dir: str, *, state: str | None = None, backend: str | None = None,
              since: float | None = None, limit: int = 20) -> list[dict]:
    """Recent runs, newest first: the broker's records (``store``, None without a broker) for
    runs it still holds, the history index in ``report_dir`` for the rest."""
    from .history import query, row_of

    rows: dict[str, dict] = {r["run_id"]: r for r in query(report_dir, state=state, backend=backend, since=since,
                                                            limit=limit)}
    if store is not None:
        for rid in store.runs.run_ids(limit):
            try:
                m = store.runs.manifest(rid)
                report = store.runs.report(rid) if m is not None else None
            except MessageError:
                continue  # a record written by hand: `nasq status` names what is wrong with it
            if m is None:
                continue
            st = (store.runs.state(rid) or {}).get("state", "?")
            row = row_of(m, st, report)
            if not is_ended(st):
                from .report import device_cell

                row.update(finished=None, images=store.ledger.images_done(rid, m),
                           excluded_devices=[device_cell(e) for e in store.ledger.exclusions(rid).values()] or None)
            if (state and st != state) or (backend and m.job.backend != backend) or \
                    (since and (m.created or 0) < since):
                continue
            rows[rid] = {**rows.get(rid, {}), **{k: v for k, v in row.items() if v is not None or k not in rows.get(rid, {})}}
    return sorted(rows.values(), key=lambda r: r.get("created") or 0, reverse=True)[:limit]


def runs_table(rows: list[dict]) -> str:
    def pct(v):
        return f"{v:.2f}" if isinstance(v, (int, float)) else "-"

    def images(r):
        if r.get("images") is None:
            return "-"
        planned = r.get("images_planned")
        return f"{r['images']}/{planned}" if planned and r["images"] != planned else str(r["images"])

    return table([[r["run_id"], time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"])) if r.get("created") else "?",
                   r.get("state") or "?", r.get("model") or "?",
                   (r.get("backend") or "?") + (" (SIMULATED)" if r.get("simulated") else ""), r.get("precision") or "-",
                   r.get("devices") or "-", r.get("batch_size") or "-", images(r), pct(r.get("top1")),
                   pct(r.get("top5")), num(r.get("throughput_img_s")),
                   ", ".join(r.get("excluded_devices") or []) or "-"] for r in rows],
                 ["run", "created", "state", "model", "backend", "precision", "devices", "bs", "images", "top-1",
                  "top-5", "img/s", "excluded devices"])


def iso_times(rows: list[dict]) -> list[dict]:
    """The rows with ``created`` and ``finished`` as ISO-8601 times with their UTC offset."""
    import datetime

    def iso(t):
        return datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds") \
            if isinstance(t, (int, float)) else t

    return [{**r, "created": iso(r.get("created")), "finished": iso(r.get("finished"))} for r in rows]


def runs_csv(rows: list[dict]) -> str:
    """The runs as CSV, with the history's columns (times in ISO-8601, lists as JSON)."""
    import csv
    import io
    import json

    from .history import COLUMNS

    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()}
                for r in iso_times(rows))
    return out.getvalue()
