"""OpenVINO backend: a batch split over the THROUGHPUT hint's streams against one stream with every
thread on the batch (the LATENCY hint), same IR, same batch, alternating in one process.

    python bench/ov_streams.py --model ~/.cache/nasq/bench-cpu-backends/artifacts/ov-<key> --batch-size 4

The IR comes from `nasq build --target ov` (bench/cpu_backends.py leaves one under its workdir).
Prints img/s per round and the median, per precision; predictions of both are compared too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nasq import backends  # noqa: E402
from nasq.config import BackendOptions  # noqa: E402
from nasq.model.spec import PREPROCESS, ModelRef  # noqa: E402
from nasq.perf.timing import measure  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="an OpenVINO IR artifact (directory or model.xml)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--min-time", type=float, default=5.0, help="timed seconds per point and round (default: 5)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    size = PREPROCESS.crop
    batch = np.random.default_rng(0).integers(0, 256, (args.batch_size, size, size, 3), dtype=np.uint8)
    results = {}
    for precision in args.precisions.split(","):
        loaded = {}
        for name, cap in (("one stream", 1), ("streams", None)):
            b = backends.create("openvino", "cpu")
            if cap:
                b._max_streams = lambda: 1
            b.load(ModelRef(args.model), batch_size=args.batch_size,
                   options=BackendOptions(precision=precision, threads=args.threads))
            loaded[name] = b
        same = float(np.abs(loaded["one stream"].predict_u8(batch) - loaded["streams"].predict_u8(batch)).max())
        rows = {name: [] for name in loaded}
        for r in range(args.rounds):
            for name in (list(loaded) if r % 2 == 0 else list(loaded)[::-1]):
                lat = measure(loaded[name].compute_fn(batch), warmup=1, min_iters=4, min_time_s=args.min_time)
                rows[name].append(round(args.batch_size * 1e3 / float(np.median(lat)), 3))
        results[precision] = {name: {"device": loaded[name].describe_device(), "img_s_rounds": v,
                                     "img_s_median": round(float(np.median(v)), 3)} for name, v in rows.items()}
        results[precision]["max_abs_diff"] = same
        for name, v in rows.items():
            print(f"{precision} {name:<10} bs={args.batch_size}: median {np.median(v):.2f} img/s  rounds {v}  "
                  f"({loaded[name].describe_device()})")
        print(f"{precision}: streams / one stream = {np.median(rows['streams']) / np.median(rows['one stream']):.3f}; "
              f"max |diff| of the predictions {same:g}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"batch_size": args.batch_size, "threads": args.threads, "rounds": args.rounds,
                       "min_time_s": args.min_time, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
