"""CPU backends in one run: torch eager fp32, ONNX Runtime fp32, OpenVINO fp32 and OpenVINO bf16 on
NASNet-A Large (the demo's calibrated random-weight checkpoint, the same one for all), compute
only, each configuration in a process of its own (as on a worker), the worker's thread count; then bf16's top-1 agreement with fp32 on the demo
images, and the time of a repeat build (a cache hit).

    python bench/cpu_backends.py --out bench/results/cpu_backends.json

Ratios are against torch eager fp32 measured in the same run. Speed depends only on shapes, so
random weights measure the real model's speed; agreement on random weights is harsher than on the
real checkpoint (near-ties between classes are common), hence the margin distribution.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Light imports only at the top: a configuration's process loads its own runtime and no other
# (torch's OpenMP runtime beside OpenVINO's threads slowed OpenVINO by ~10 % in one process).
from nasq import backends  # noqa: E402
from nasq.config import BackendOptions, Settings  # noqa: E402
from nasq.data.sources import open_source  # noqa: E402
from nasq.model.spec import ModelRef  # noqa: E402
from nasq.perf.timing import measure, summarize  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="large", choices=("large", "tiny"))
    ap.add_argument("--batch-sizes", default="1,4", help="comma-separated (default: 1,4)")
    ap.add_argument("--images", type=int, default=64, help="demo images for the bf16 agreement (default: 64)")
    ap.add_argument("--min-time", type=float, default=8.0, help="timed seconds per point (default: 8)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="runtime threads (default: all cores)")
    ap.add_argument("--workdir", default=os.path.expanduser("~/.cache/nasq/bench-cpu-backends"))
    ap.add_argument("--out", default="bench/results/cpu_backends.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(json.loads(args.one))
        return 0
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    from nasq.api import build
    from nasq.data.labels import read_labels
    from nasq.demo import prepare

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731

    demo = prepare(os.path.join(args.workdir, args.arch), args.images, arch=args.arch, batch_size=8, log=log)
    settings = Settings(artifact_dir=os.path.join(args.workdir, "artifacts"), work_dir=os.path.join(args.workdir, "runs"))
    built, hits = {}, {}
    for target in ("ort", "ov"):
        built[target] = build(weights=demo["weights"], target=target, settings=settings, log=log)
        t = time.perf_counter()
        again = build(weights=demo["weights"], target=target, settings=settings, log=log)
        hits[target] = {"cached": again.cached, "seconds": round(time.perf_counter() - t, 4)}
        log(f"{target}: {built[target].path}; repeat build: cache hit {again.cached} in {hits[target]['seconds']} s")

    source = open_source(demo["data"])
    configs = [("torch eager fp32", "torch", demo["weights"], "fp32"),
               ("onnxruntime fp32", "onnxruntime", built["ort"].path, "fp32"),
               ("openvino fp32", "openvino", built["ov"].path, "fp32"),
               ("openvino bf16", "openvino", built["ov"].path, "bf16")]
    rows = []
    for name, be, model, precision in configs:  # each in a process of its own, as on a worker
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", json.dumps(
            {"name": name, "backend": be, "model": model, "precision": precision, "data": demo["data"],
             "sizes": sizes, "threads": args.threads, "min_time": args.min_time})],
            capture_output=True, text=True, check=True)
        for row in json.loads(out.stdout):
            rows.append(row)
            log(f"{name} bs={row['batch_size']}: {row['img_s']:.2f} img/s (median {row['median_ms']:.1f} ms, "
                f"{row['iters']} iters)")
    loaded = {}
    for precision in ("fp32", "bf16"):
        b = backends.create("openvino", "cpu")
        b.load(ModelRef(built["ov"].path), batch_size=max(sizes),
               options=BackendOptions(precision=precision, threads=args.threads))
        loaded[precision] = b
    eager = {r["batch_size"]: r["img_s"] for r in rows if r["config"] == "torch eager fp32"}
    for r in rows:
        r["x_torch_eager"] = round(r["img_s"] / eager[r["batch_size"]], 2)

    # bf16 against fp32, image for image, on the demo images
    labels = read_labels(demo["labels"])
    truth = [labels.get(os.path.splitext(n)[0]) for n in source.names]
    logits = {}
    for p, b in loaded.items():
        chunks = []
        for i in range(0, len(source), max(sizes)):
            chunks.append(b.predict_u8(np.stack([source.load(j) for j in range(i, min(len(source), i + max(sizes)))])))
        logits[p] = np.concatenate(chunks)
    off = 1 if logits["fp32"].shape[1] == 1001 else 0  # background at 0
    top_f, top_b = logits["fp32"].argmax(1) - off, logits["bf16"].argmax(1) - off
    agree = top_f == top_b
    srt = np.sort(logits["fp32"], axis=1)
    margins = (srt[:, -1] - srt[:, -2]).tolist()  # fp32 top-1 minus top-2 logit
    dis = [m for m, ok in zip(margins, agree) if not ok]
    agreement = {"images": int(len(agree)), "top1_agree": int(agree.sum()),
                 "top1_agreement_pct": round(100 * float(agree.mean()), 2),
                 "fp32_top1_vs_labels_pct": round(100 * float(np.mean(top_f == np.asarray(truth))), 2),
                 "bf16_top1_vs_labels_pct": round(100 * float(np.mean(top_b == np.asarray(truth))), 2),
                 "fp32_margin_all": _quantiles(margins), "fp32_margin_where_bf16_differs": _quantiles(dis),
                 "max_abs_logit_diff": round(float(np.abs(logits["fp32"] - logits["bf16"]).max()), 4),
                 "fp32_logit_scale": round(float(np.abs(logits["fp32"]).max()), 3)}
    log(f"bf16 vs fp32 top-1: {agreement['top1_agree']}/{agreement['images']} agree; fp32 margins "
        f"{agreement['fp32_margin_all']}; where they differ {agreement['fp32_margin_where_bf16_differs']}")
    result = {"env": {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": os.uname().nodename, "cpu": rows[0]["device_name"],
                      "threads": args.threads, "arch": args.arch, "min_time_s": args.min_time,
                      "note": "compute only, one process per configuration; ratios against torch eager fp32 in the same run"},
              "rows": rows, "bf16_agreement": agreement, "repeat_build": hits}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for r in rows:
        print(f"{r['config']:<18} bs={r['batch_size']:<3} {r['img_s']:8.2f} img/s  x{r['x_torch_eager']:.2f} eager")
    return 0


def one(spec: dict) -> None:
    """Measure one configuration (``--one``): rows as JSON on stdout."""
    source = open_source(spec["data"])
    crops = np.stack([source.load(i) for i in range(min(len(source), 16))])
    b = backends.create(spec["backend"], "cpu")
    b.load(ModelRef(spec["model"]), batch_size=max(spec["sizes"]),
           options=BackendOptions(precision=spec["precision"], threads=spec["threads"]))
    rows = []
    for bs in spec["sizes"]:
        batch = crops[np.arange(bs) % len(crops)]
        rows.append({"config": spec["name"], "batch_size": bs,
                     **summarize(measure(b.compute_fn(batch), min_time_s=spec["min_time"]), bs),
                     "device_name": b.describe_device(), "versions": b.versions()})
    print(json.dumps(rows))


def _quantiles(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    q = np.percentile(values, [0, 10, 50, 90, 100])
    return {"count": len(values), "min": round(float(q[0]), 3), "p10": round(float(q[1]), 3),
            "median": round(float(q[2]), 3), "p90": round(float(q[3]), 3), "max": round(float(q[4]), 3)}


if __name__ == "__main__":
    sys.exit(main())
