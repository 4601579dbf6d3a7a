"""The separable stacks of NASNet-A Large, fused Triton kernels against torch's, per batch size.

Every separable branch of the model (BatchNorm folded, the precision and layout of the fast path)
is run with the input shape it gets inside the model: torch's kernels (eager cuDNN, and with
``--compile`` torch.compile with freezing, one compile per unique branch with a dynamic batch)
against ``FusedBranch`` (two Triton kernels per branch). The stack time is all 110 branches run
once, on a GPU replayed as one CUDA graph and timed with CUDA events (device time, no host
overhead). Writes ``$OUT/triton_sep.json`` after every batch size.

    python bench/triton_sep.py --device cuda:0 --precision fp16 --sizes 1,64,256 --compile
    TRITON_INTERPRET=1 python bench/triton_sep.py --device cpu --precision fp32 --arch tiny --sizes 1  # rehearsal

Only a GPU figure means anything; the CPU run (Triton's interpreter) only shows the script works.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--precision", default="fp16", choices=("fp32", "fp16", "bf16"))
    ap.add_argument("--arch", default="large", choices=("large", "tiny"))
    ap.add_argument("--sizes", default="1,64,256", help="batch sizes (default: 1,64,256)")
    ap.add_argument("--compile", action="store_true", help="also torch.compile (freezing) each unique branch")
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds per timing (default: 0.3)")
    ap.add_argument("--budget", type=float, default=240, help="stop starting new sizes after this many s")
    args = ap.parse_args()
    import torch

    from nasq.model.checkpoint import build_model
    from nasq.model.fold import fold_batchnorm
    from nasq.model.triton_sep import FusedBranch, available
    from pretrainedmodels.models import nasnet as N

    why = available()
    if why:
        print(f"triton_sep: {why}", file=sys.stderr)
        return 2
    t_start = time.time()
    dev = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    fmt = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
    model = build_model(args.arch).eval()
    fold_batchnorm(model)
    model = model.to(dev, dtype).to(memory_format=fmt)
    kinds = (N.BranchSeparables, N.BranchSeparablesStem, N.BranchSeparablesReduction)
    branches = [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]
    shapes: dict[str, tuple] = {}
    def record(name):
        def hook(mod, inp):
            shapes.setdefault(name, tuple(inp[0].shape[1:]))  # returns None: the input is left as it is
        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in branches]
    with torch.inference_mode():
        model(torch.zeros(1, 3, 331, 331, device=dev, dtype=dtype).contiguous(memory_format=fmt))
    for h in hooks:
        h.remove()
    # unique branches: same kind, weights' shapes, stride and input shape time the same
    unique: dict[tuple, list] = {}
    for name, m in branches:
        sep = m.separable_1.depthwise_conv2d
        key = (type(m).__name__, tuple(m.separable_1.pointwise_conv2d.weight.shape),
               tuple(m.separable_2.pointwise_conv2d.weight.shape), sep.kernel_size[0], sep.stride[0], shapes[name])
        unique.setdefault(key, []).append(m)
    print(f"{len(branches)} separable branches, {len(unique)} unique; {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}",
          flush=True)

    def stack_ms(run) -> float:
        """Median ms of ``run`` (every branch of the model once), device time: on a GPU replayed as
        one CUDA graph (no host overhead) and timed with CUDA events."""
        if dev.type != "cuda":
            run()
            times, end = [], time.perf_counter() + args.min_time
            while len(times) < 3 or time.perf_counter() < end:
                t = time.perf_counter()
                run()
                times.append((time.perf_counter() - t) * 1e3)
            return sorted(times)[len(times) // 2]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):  # autotuning and compilation happen here, before the capture
                run()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run()
        times, end = [], time.perf_counter() + args.min_time
        while len(times) < 5 or time.perf_counter() < end:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return sorted(times)[len(times) // 2]

    # one module per unique branch and kind of kernels; compiled ones with a dynamic batch, so
    # each compiles once for all batch sizes
    fused = {key: FusedBranch(copy.deepcopy(mods[0])) for key, mods in unique.items()}
    compiled = {}
    if args.compile:
        import torch._inductor.config as inductor

        inductor.freezing = True
        compiled = {key: torch.compile(copy.deepcopy(mods[0]), dynamic=True) for key, mods in unique.items()}
    path = os.path.join(os.environ.get("OUT", "/tmp"), "triton_sep.json")
    out = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (Triton interpreter)",
           "precision": args.precision, "arch": args.arch, "branches": len(branches), "unique": len(unique),
           "torch": torch.__version__, "rows": []}
    for bs in [int(x) for x in args.sizes.split(",")]:
        if time.time() - t_start > args.budget:
            print(f"bs={bs}: skipped (budget)", flush=True)
            continue
        inputs = {key: torch.randn(bs, *key[-1], device=dev, dtype=dtype).contiguous(memory_format=fmt)
                  for key in unique}
        max_rel = 0.0
        with torch.inference_mode():
            for key, mods in unique.items():
                a, b = mods[0](inputs[key]), fused[key](inputs[key])
                max_rel = max(max_rel, float((a.float() - b.float()).abs().max() / a.float().abs().max()))

            def runner(table):
                def run():
                    for key, mods in unique.items():
                        for _ in mods:  # each branch of the model: the same shapes as its unique one
                            table[key](inputs[key])
                return run
            total = {"torch_eager_ms": stack_ms(runner({k: m[0] for k, m in unique.items()})),
                     "triton_ms": stack_ms(runner(fused))}
            if args.compile:
                for key in unique:
                    torch._dynamo.mark_dynamic(inputs[key], 0)
                total["torch_compile_ms"] = stack_ms(runner(compiled))
        row = {"batch_size": bs, **{k: round(v, 3) for k, v in total.items()},
               "x_vs_eager": round(total["torch_eager_ms"] / total["triton_ms"], 3),
               "x_vs_compile": round(total["torch_compile_ms"] / total["triton_ms"], 3) if args.compile else None,
               "max_rel_diff": max_rel, "elapsed_s": round(time.time() - t_start, 1)}
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
        with open(path, "w") as f:  # after every row: a timeout keeps what was measured
            json.dump(out, f, indent=1)
    print(f"written {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
