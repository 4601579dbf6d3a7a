"""CPU backends in one run: torch eager fp32, ONNX Runtime fp32, OpenVINO fp32 and OpenVINO bf16 on
NASNet-A Large (the demo's calibrated random-weight checkpoint, the same one for all), compute
only, each configuration in a process of its own (as on a worker), the worker's thread count,
the processes taking turns over several rounds (a shared VM's slow minutes fall on all alike);
beside them this CPU's bound at fp32 and bf16 (the model's multiply-adds at the best rate
OpenVINO reaches on large matrix products and the model's own 1x1 convolution shapes: see
GemmBound); then bf16's top-1 agreement with fp32 on the demo images, and the time of a repeat build.

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
from nasq.model.spec import PREPROCESS, ModelRef  # noqa: E402
from nasq.perf.timing import measure, summarize  # noqa: E402

BOUND = "gemm-bound"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="large", choices=("large", "tiny"))
    ap.add_argument("--batch-sizes", default="1,4", help="comma-separated (default: 1,4)")
    ap.add_argument("--images", type=int, default=64, help="demo images for the bf16 agreement (default: 64)")
    ap.add_argument("--min-time", type=float, default=6.0, help="timed seconds per point and round (default: 6)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
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
               ("openvino bf16", "openvino", built["ov"].path, "bf16"),
               ("fp32 bound (best product)", BOUND, built["ov"].path, "fp32"),
               ("bf16 bound (best product)", BOUND, built["ov"].path, "bf16")]
    precision_of = {c[0]: c[3] for c in configs}
    bound_of = {c[3]: c[0] for c in configs if c[1] == BOUND}
    # The last two configurations are no runtime of nasq's: this CPU's bound at fp32 and bf16
    # (GemmBound), what a runtime multiplying no faster than OpenVINO cannot beat on this CPU. Each
    # configuration lives in a process of its own (as on a worker), loaded once; the processes
    # take turns, round after round (the order rotated each round), so a slow minute of a shared
    # VM falls on every configuration alike. A ratio is the median over rounds of the same round's
    # ratio; a figure is the median over rounds.
    procs = {}
    for name, be, model, precision in configs:
        procs[name] = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--one", json.dumps(
            {"name": name, "backend": be, "model": model, "precision": precision, "data": demo["data"],
             "sizes": sizes, "threads": args.threads})], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        _ask(procs[name], None)  # loaded
    per_round: dict[tuple, list[dict]] = {}
    names = [c[0] for c in configs]
    try:
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                for bs in sizes:
                    row = _ask(procs[name], {"batch_size": bs, "min_time": args.min_time})
                    per_round.setdefault((name, bs), []).append(row)
                    log(f"round {r + 1}/{args.rounds} {name} bs={bs}: {row['img_s']:.2f} img/s "
                        f"(median {row['median_ms']:.1f} ms, {row['iters']} iters)")
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait(timeout=60)
    rows = []
    for (name, bs), runs in per_round.items():
        eager, bound = per_round[(configs[0][0], bs)], per_round[(bound_of[precision_of[name]], bs)]
        ratios = [a["img_s"] / b["img_s"] for a, b in zip(runs, eager)]
        of_bound = [a["img_s"] / b["img_s"] for a, b in zip(runs, bound)]
        rows.append({**runs[0], "img_s": round(float(np.median([x["img_s"] for x in runs])), 3),
                     "median_ms": round(float(np.median([x["median_ms"] for x in runs])), 2),
                     "iters": sum(x["iters"] for x in runs), "rounds": [round(x["img_s"], 3) for x in runs],
                     "x_torch_eager": round(float(np.median(ratios)), 2),
                     "x_torch_eager_rounds": [round(x, 2) for x in ratios],
                     "precision": precision_of[name], "of_bound": round(float(np.median(of_bound)), 3),
                     **({"g_fma_s": round(float(np.median([x["g_fma_s"] for x in runs])), 1),
                         "best_of": [x["best_of"] for x in runs]} if "g_fma_s" in runs[0] else {})})
    loaded = {}
    for precision in ("fp32", "bf16"):
        b = backends.create("openvino", "cpu")
        b.load(ModelRef(built["ov"].path), batch_size=max(sizes),
               options=BackendOptions(precision=precision, threads=args.threads))
        loaded[precision] = b

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
    result = {"env": {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": os.uname().nodename, **_cpu(),
                      "threads": args.threads, "arch": args.arch, "min_time_s": args.min_time,
                      "rounds": args.rounds,
                      "note": "compute only, one process per configuration, the processes taking turns round after "
                              "round; img_s the median over rounds, x_torch_eager the median over rounds of the "
                              "ratio to torch eager fp32 in the same round"},
              "rows": rows, "bf16_agreement": agreement, "repeat_build": hits}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for r in rows:
        print(f"{r['config']:<18} bs={r['batch_size']:<3} {r['img_s']:8.2f} img/s  x{r['x_torch_eager']:.2f} eager "
              f"{100 * r['of_bound']:4.0f} % of the {r['precision']} bound "
              f"(rounds: {', '.join(f'x{x:.2f}' for x in r['x_torch_eager_rounds'])})")
    return 0


def _ask(proc: subprocess.Popen, request: dict | None) -> dict:
    """Send one request to a configuration's process (None: wait until it has loaded) and read its answer."""
    if request is not None:
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"a configuration's process died (exit {proc.wait()}); its error is above")
    return json.loads(line)


def one(spec: dict) -> None:
    """One configuration's process (``--one``): load, say so, then answer each request on stdin
    (a batch size and a time) with a measured row on stdout, until stdin closes."""
    source = open_source(spec["data"])
    crops = np.stack([source.load(i) for i in range(min(len(source), 16))])
    if spec["backend"] == BOUND:
        b = GemmBound(spec["model"], spec["precision"], spec["threads"])
    else:
        b = backends.create(spec["backend"], "cpu")
        b.load(ModelRef(spec["model"]), batch_size=max(spec["sizes"]),
               options=BackendOptions(precision=spec["precision"], threads=spec["threads"]))
    print(json.dumps({"loaded": spec["name"]}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        bs = req["batch_size"]
        batch = crops[np.arange(bs) % len(crops)]
        if spec["backend"] == BOUND:  # the same for every batch size: the model's work at the peak rate
            rate, iters = b.rate(req["min_time"])
            img_s = rate / b.macs_per_image
            stats = {"iters": iters, "median_ms": round(bs * 1e3 / img_s, 3), "img_s": round(img_s, 2),
                     "g_fma_s": round(rate / 1e9, 1), "best_of": b.best_of}
        else:
            stats = summarize(measure(b.compute_fn(batch), warmup=1, min_iters=4, min_time_s=req["min_time"]), bs)
        print(json.dumps({"config": spec["name"], "batch_size": bs, **stats,
                          "device_name": b.describe_device(), "versions": b.versions()}), flush=True)


class GemmBound:
    """This CPU's best multiply rate for NASNet-A Large at one precision, as a bound: the best
    rate OpenVINO reaches on any of a set of single products (1024- and 2048-square MatMuls and
    the model's own six heaviest 1x1 convolution shapes at batch 4, each alone), divided into the
    model's multiply-adds (every Convolution, GroupConvolution and MatMul of the IR, 23.81 G per
    image). As if every multiply-add of the model, depthwise ones included, ran at that best rate
    and nothing else took time: a runtime that multiplies no faster than OpenVINO does on those
    shapes reaches no more img/s, and the bound's ratio to torch eager is the most that runtime
    can show on this machine at that precision. It is an empirical peak, not the silicon's
    nominal one (a VM does not tell its boost clock). ``g_fma_s`` in its row: the best rate, and
    ``best_of`` which product gave it.

    (A graph of the model's 1x1 convolutions all together was tried first: in bf16 the model beat
    it, its fp32 inputs being converted for each convolution, so it bounded nothing.)"""

    SIZES = (1024, 2048)
    CONV_SHAPES = 6

    def __init__(self, ir_path: str, precision: str, threads: int):
        import openvino as ov
        import openvino.opset13 as ops

        ir = ir_path if ir_path.endswith(".xml") else os.path.join(ir_path, "model.xml")
        core = ov.Core()
        self.macs_per_image = model_macs(core.read_model(ir))
        config = {"INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision],
                  "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": str(threads)}
        rng = np.random.default_rng(0)
        products = {}  # name -> (model, input shape, multiply-adds per run)
        for n in self.SIZES:
            a = ops.parameter([n, n], ov.Type.f32)
            w = ops.constant(rng.standard_normal((n, n)).astype(np.float32))
            products[f"matmul {n}"] = (ov.Model([ops.matmul(a, w, False, False)], [a]), [n, n], n ** 3)
        for (ishape, wshape, strides), _ in sorted(_pointwise_shapes(core.read_model(ir)).items(),
                                                  key=lambda kv: -kv[1])[:self.CONV_SHAPES]:
            a = ops.parameter(list(ishape), ov.Type.f32)
            w = ops.constant((rng.standard_normal(wshape) / np.sqrt(wshape[1])).astype(np.float32))
            conv = ops.convolution(a, w, list(strides), [0, 0], [0, 0], [1, 1])
            out = [d.get_length() for d in conv.get_output_partial_shape(0)]
            products[f"1x1 conv {wshape[1]}->{wshape[0]} at {out[2]}x{out[3]}, batch {ishape[0]}"] = (
                ov.Model([conv], [a]), list(ishape), int(np.prod(out)) * wshape[1])
        self._requests = {}
        for name, (model, shape, macs) in products.items():
            request = core.compile_model(model, "CPU", config).create_infer_request()
            request.set_input_tensor(0, ov.Tensor(rng.standard_normal(shape).astype(np.float32)))
            self._requests[name] = (request, macs)
        self._ov, self.precision, self._threads, self.best_of = ov, precision, threads, None

    def rate(self, min_time: float) -> tuple[float, int]:
        """The best multiply-adds per second over the products, all timed for ``min_time`` s in
        all, and how many products were run."""
        best, iters = 0.0, 0
        for name, (request, macs) in self._requests.items():
            def run(request=request):
                request.start_async()
                request.wait()
            lat = measure(run, warmup=2, min_iters=4, min_time_s=min_time / len(self._requests))
            r = macs / (np.median(lat) / 1e3)
            if r > best:
                best, self.best_of = r, name
            iters += len(lat)
        return best, iters

    def describe_device(self) -> str:
        return (f"best product: {self.best_of}; model {self.macs_per_image / 1e9:.2f} G multiply-adds per image, "
                f"{self._threads} threads, OpenVINO {self.precision}")

    def versions(self) -> dict[str, str]:
        return {"openvino": self._ov.__version__}


def _pointwise_shapes(net, batch: int = 4) -> dict:
    """The model's 1x1 convolutions at ``batch``: (input shape, weight shape, strides) -> their
    multiply-adds in all."""
    net.reshape([batch, *PREPROCESS.chw])
    shapes: dict = {}
    for op in net.get_ordered_ops():
        if op.get_type_name() != "Convolution":
            continue
        w = tuple(d.get_length() for d in op.get_input_partial_shape(1))
        if w[2:] != (1, 1):
            continue
        key = (tuple(d.get_length() for d in op.get_input_partial_shape(0)), w, tuple(op.get_attributes()["strides"]))
        out = [d.get_length() for d in op.get_output_partial_shape(0)]
        shapes[key] = shapes.get(key, 0) + int(np.prod(out)) * w[1]
    return shapes


def model_macs(net) -> int:
    """Multiply-adds per image of an OpenVINO model (batch 1): Convolution, GroupConvolution, MatMul."""
    net.reshape([1, *PREPROCESS.chw])
    total = 0
    for op in net.get_ordered_ops():
        kind = op.get_type_name()
        if kind not in ("Convolution", "GroupConvolution", "MatMul"):
            continue
        out = [d.get_length() for d in op.get_output_partial_shape(0)]
        w = [d.get_length() for d in op.get_input_partial_shape(1)]
        if kind == "Convolution":  # weights [cout, cin, kh, kw]
            total += int(np.prod(out)) * int(np.prod(w[1:]))
        elif kind == "GroupConvolution":  # weights [groups, cout/g, cin/g, kh, kw]
            total += int(np.prod(out)) * int(np.prod(w[2:]))
        else:  # [.., m, k] x [k, n] (or transposed): out elements x k
            a = [d.get_length() for d in op.get_input_partial_shape(0)]
            total += int(np.prod(out)) * (a[-2] if op.get_attributes()["transpose_a"] else a[-1])
    return total


def _cpu() -> dict:
    """What /proc/cpuinfo says of the CPU: the model name alone ("AMD EPYC") hides which one."""
    info = {}
    for ln in open("/proc/cpuinfo"):
        key, _, value = ln.partition(":")
        info.setdefault(key.strip(), value.strip())
    flags = set(info.get("flags", "").split())
    return {"cpu": info.get("model name", "?"), "cpu_family": info.get("cpu family"), "cpu_model": info.get("model"),
            "cpu_stepping": info.get("stepping"), "cpu_mhz": info.get("cpu MHz"),
            "cpu_flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16"})}


def _quantiles(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    q = np.percentile(values, [0, 10, 50, 90, 100])
    return {"count": len(values), "min": round(float(q[0]), 3), "p10": round(float(q[1]), 3),
            "median": round(float(q[2]), 3), "p90": round(float(q[3]), 3), "max": round(float(q[4]), 3)}


if __name__ == "__main__":
    sys.exit(main())
