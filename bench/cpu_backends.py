"""CPU: ONNX Runtime (built artifact) vs PyTorch eager fp32 on the same images, same run.

Two measurements, both on the full NASNet-A Large:
1. compute only: one backend object each, the same preprocessed batch, warm-up then the
   median of timed repeats, per batch size;
2. end to end: `nasq eval` (embedded, one worker using all cores) with each backend on the
   same JPEG folder; the report's compute and wall images/s.

Usage: python bench/cpu_backends.py [--workdir DIR] [--images N] [--batch-sizes 1,4] [--json PATH]
Without a checkpoint in DIR it makes the demo's calibrated random-weight one (numbers depend
only on shapes).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np


def timed(fn, reps: int, min_s: float = 3.0) -> list[float]:
    fn()  # warm-up
    samples, t_end = [], time.perf_counter() + min_s
    while len(samples) < reps or time.perf_counter() < t_end:
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
        if len(samples) >= 3 * reps:
            break
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=os.path.expanduser("~/.cache/nasq/bench-cpu"))
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    from nasq import backends
    from nasq.api import build, evaluate
    from nasq.config import load_settings
    from nasq.data import open_source
    from nasq.demo import prepare
    from nasq.model.spec import ModelRef

    paths = prepare(args.workdir, args.images, arch="large", batch_size=4, log=print)
    settings = load_settings()
    art = build(weights=paths["weights"], target="ort", settings=settings, log=print)
    src = open_source(paths["data"])
    crops = np.stack([src.load(i) for i in range(len(src))])
    threads = os.cpu_count()
    rows = []
    for name, model in (("torch", ModelRef(paths["weights"])), ("onnxruntime", ModelRef(art.path))):
        b = backends.create(name, "cpu")
        b.load(model, batch_size=1)
        for bs in [int(x) for x in args.batch_sizes.split(",")]:
            batch = crops[:bs]
            s = timed(lambda: b.predict_u8(batch), args.reps)
            med = statistics.median(s)
            rows.append({"mode": "compute", "backend": name, "batch_size": bs, "median_ms": round(med * 1e3, 1),
                         "img_s": round(bs / med, 2), "samples": len(s)})
            print(rows[-1], flush=True)
        b.close()
    # ONNX Runtime graph optimization level at load time, same artifact, batch 1.
    levels = {"EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    model_file = os.path.join(art.path, "model.cpu.onnx")
    for level, value in levels.items():
        opts = ort.SessionOptions()
        opts.graph_optimization_level = value
        sess = ort.InferenceSession(model_file, opts, providers=["CPUExecutionProvider"])
        x = {sess.get_inputs()[0].name: np.ascontiguousarray(crops[:1].transpose(0, 3, 1, 2), np.float32) / 255}
        med = statistics.median(timed(lambda: sess.run(None, x), args.reps))
        rows.append({"mode": f"ort {level}", "backend": "onnxruntime", "batch_size": 1, "img_s": round(1 / med, 2)})
        print(rows[-1], flush=True)
    for name in ("torch", "onnxruntime"):
        res = evaluate(weights=paths["weights"], data=paths["data"], labels=paths["labels"], backend=name,
                       device="cpu", workers=1, batch_size=1, settings=settings, progress=False, log=lambda *_: None)
        d = res.report["per_device"][0]
        rows.append({"mode": "nasq eval", "backend": name, "batch_size": 1, "images": res.report["images"],
                     "img_s": d["img_s_compute"], "img_s_wall": d["img_s_wall"], "top1": res.report["top1"]})
        print(rows[-1], flush=True)
    env = {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(), "cores": threads,
           "torch": torch.__version__, "onnxruntime": ort.__version__, "artifact": art.key}
    print("\n" + json.dumps(env))
    print(f"\n{'mode':<10} {'backend':<12} {'bs':>3} {'img/s':>8}   ratio vs torch")
    base = {(r["mode"], r["batch_size"]): r["img_s"] for r in rows if r["backend"] == "torch"}
    base.update({(r["mode"], 1): base[("compute", 1)] for r in rows if r["mode"].startswith("ort ")})
    for r in rows:
        ratio = r["img_s"] / base[(r["mode"], r["batch_size"])]
        print(f"{r['mode']:<10} {r['backend']:<12} {r['batch_size']:>3} {r['img_s']:>8.2f}   {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
