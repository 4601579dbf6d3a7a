"""Accuracy kept by the fast path: fp16/bf16 vs the fp32 reference on natural-looking images
with a BatchNorm-calibrated checkpoint (random weights without calibration make near-ties).

Writes $OUT/accuracy.json. Usage: python bench/gpu_accuracy.py [--images 2000] [--device cuda:0]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--arch", default="large")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--precisions", default="fp16,bf16")
    ap.add_argument("--options", default='{"cuda_graphs": true}', help="JSON BackendOptions fields for the fast path")
    args = ap.parse_args()
    from nasq import backends
    from nasq.data import open_source
    from nasq.demo import prepare
    from nasq.config import BackendOptions
    from nasq.model.spec import ModelRef

    t0 = time.time()
    work = os.path.expanduser(f"~/.cache/nasq/acc-{args.arch}-{args.images}")
    paths = prepare(work, args.images, arch=args.arch, batch_size=args.batch_size, labels=False)
    print(f"data ready in {time.time() - t0:.0f} s", flush=True)
    src = open_source(paths["data"])
    crops = np.stack([src.load(i) for i in range(len(src))])

    def logits(options):
        b = backends.create("torch", args.device)
        b.load(ModelRef(paths["weights"]), batch_size=args.batch_size, options=options)
        out = np.concatenate([b.predict_u8(crops[i:i + args.batch_size]) for i in range(0, len(crops), args.batch_size)])
        b.close()
        return out

    import torch

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 reference
    ref = logits(BackendOptions(precision="fp32", fold_bn=False, channels_last=False))
    r5 = np.argsort(-ref, 1)[:, :5]
    # Labels = the fp32 reference's top-1, for `nasq eval --precision fp16` on the same images.
    with open(os.path.join(work, "val_label.txt"), "w") as f:
        f.writelines(f"{n} {int(c) - 1}\n" for n, c in zip(src.names, r5[:, 0]))
    print(f"labels written to {work}/val_label.txt; weights {paths['weights']}", flush=True)
    results = {"images": len(crops), "arch": args.arch}
    for prec in args.precisions.split(","):
        got = logits(BackendOptions(precision=prec, **json.loads(args.options)))
        g5 = np.argsort(-got, 1)[:, :5]
        top1 = float(np.mean(r5[:, 0] == g5[:, 0]))
        top5 = float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(r5, g5)]))
        results[prec] = {"top1_agreement": top1, "top5_overlap": top5,
                         "max_abs": float(np.abs(ref - got).max()), "logit_scale": float(np.abs(ref).max())}
        print(prec, results[prec], "PASS" if top1 >= 0.999 and top5 >= 0.995 else "FAIL", flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "accuracy.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
