"""The build steps. Each works in a staging directory and returns a record for the metadata
(what ran, how long, the exact command, the verification numbers)."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
import warnings

import numpy as np

from ..errors import NasqError
from . import verify
from .spec import BuildSpec

REFERENCE = "reference_logits.npy"


class BuildError(NasqError):
    """A build step that cannot run here, or failed."""


def _check(spec: BuildSpec, rows: list[dict], row: dict) -> dict:
    rows.append(row)
    if not row["ok"] and not spec.accept_tolerance:
        raise verify.VerificationError(
            f"{row['step']}: max |diff| {row['max_abs']:.3g} is {row['max_rel']:.3g} of the logit scale "
            f"{row['logit_scale']:.3g} (tolerance {spec.tolerance:g}), top-1 agreement "
            f"{100 * row['top1_agreement']:.1f}%. Pass --accept-tolerance to keep the artifact anyway.")
    return row


def reference(spec: BuildSpec, workdir: str) -> tuple[np.ndarray, np.ndarray]:
    """(verification batch, PyTorch fp32 logits), the logits cached in the staging directory."""
    x = verify.reference_batch()
    path = os.path.join(workdir, REFERENCE)
    if os.path.isfile(path):
        return x, np.load(path)
    ref = verify.torch_logits(spec.weights, spec.num_outputs, x)
    np.save(path, ref)
    return x, ref


def export(spec: BuildSpec, workdir: str, rows: list[dict]) -> dict:
    """PyTorch -> ONNX with the TorchScript exporter (input ``image``, output ``class``)."""
    import torch

    from ..model.checkpoint import load_model
    from ..model.spec import PREPROCESS

    model, info = load_model(spec.weights, spec.num_outputs)
    out = os.path.join(workdir, "raw.onnx")
    dyn = None if spec.batch_size else {"image": {0: "batch"}, "class": {0: "batch"}}
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and folding notes
        torch.onnx.export(model, (torch.zeros(spec.batch_size or 1, *PREPROCESS.chw),), out,
                          input_names=["image"], output_names=["class"], opset_version=spec.opset,
                          dynamic_axes=dyn, do_constant_folding=True, dynamo=False)
    seconds = time.perf_counter() - t
    x, ref = reference(spec, workdir)
    row = _check(spec, rows, verify.compare(ref, verify.onnx_logits(out, x), step="export", tolerance=spec.tolerance))
    return {"name": "export", "seconds": round(seconds, 2), "model": info.to_dict(), "graph": graph_facts(out),
            "command": f"torch.onnx.export(opset_version={spec.opset}, input_names=['image'], output_names=['class'], "
                       f"dynamic_axes={dyn}, dynamo=False)", "verification": row}


def simplify(spec: BuildSpec, workdir: str, rows: list[dict]) -> dict:
    """onnxsim (at the fixed batch if there is one); then the graph check and verification."""
    import onnx
    import onnxsim

    src, out = os.path.join(workdir, "raw.onnx"), os.path.join(workdir, "model.onnx")
    t = time.perf_counter()
    model, ok = onnxsim.simplify(onnx.load(src))
    if not ok:
        raise BuildError("onnxsim could not validate the simplified model against the exported one")
    onnx.save(model, out)
    seconds = time.perf_counter() - t
    facts = graph_check(out)
    os.remove(src)
    x, ref = reference(spec, workdir)
    row = _check(spec, rows, verify.compare(ref, verify.onnx_logits(out, x), step="simplify", tolerance=spec.tolerance))
    return {"name": "simplify", "seconds": round(seconds, 2), "graph": facts, "command": "onnxsim.simplify(model)",
            "tool": f"onnxsim {onnxsim.__version__}", "verification": row}


def graph_facts(path: str) -> dict:
    import onnx

    g = onnx.load(path).graph
    producer = {o: n for n in g.node for o in n.output}
    slices = [n for n in g.node if n.op_type == "Slice"]
    pairs = sum(1 for n in slices if n.input and producer.get(n.input[0]) is not None
                and producer[n.input[0]].op_type == "Slice")
    return {"nodes": len(g.node), "slice_nodes": len(slices), "consecutive_slice_pairs": pairs}


def graph_check(path: str) -> dict:
    """ONNX checker, plus: no Slice feeds another Slice (what the seed's auto-optimizer
    KnowledgeMergeConsecutiveSlice pass removed; onnxsim leaves none)."""
    import onnx

    try:
        onnx.checker.check_model(path, full_check=True)
    except onnx.checker.ValidationError as e:
        raise BuildError(f"the ONNX checker rejects {path}: {e}") from None
    facts = graph_facts(path)
    if facts["consecutive_slice_pairs"]:
        raise BuildError(f"{path} still has {facts['consecutive_slice_pairs']} consecutive Slice pair(s); "
                         "ATC handles them badly (the seed merged them with auto-optimizer)")
    return facts


# ------------------------------------------------------------------------------ device steps

def ort_optimize(spec: BuildSpec, onnx_path: str, workdir: str, rows: list[dict]) -> dict:
    """ONNX Runtime offline optimization: a model per available provider (CPU; CUDA when present)."""
    import onnxruntime as ort

    x, ref = reference(spec, workdir)
    files, t = {}, time.perf_counter()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    for prov in providers:
        name = "model.cpu.onnx" if prov == "CPUExecutionProvider" else "model.cuda.onnx"
        opts = ort.SessionOptions()
        # EXTENDED, not ALL: ALL adds layout changes tied to the building machine's CPU.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = os.path.join(workdir, name)
        opts.log_severity_level = 3
        ort.InferenceSession(onnx_path, opts, providers=[prov])
        files[prov] = name
    seconds = time.perf_counter() - t
    row = _check(spec, rows, verify.compare(ref, verify.onnx_logits(os.path.join(workdir, "model.cpu.onnx"), x),
                                            step="ort-cpu", tolerance=spec.tolerance))
    return {"name": "ort", "seconds": round(seconds, 2), "files": files, "tool": f"onnxruntime {ort.__version__}",
            "command": "onnxruntime.InferenceSession(model, SessionOptions(graph_optimization_level=ORT_ENABLE_EXTENDED, "
                       "optimized_model_filepath=...))", "verification": row}


def atc_commands(spec: BuildSpec, onnx_path: str, workdir: str | None) -> list[list[str]]:
    """The ATC command line, the seed's flags in the seed's order (``--framework=5 --model
    --input_format=NCHW --input_shape="image:N,3,331,331" --output --log --soc_version``): one
    static .om for the fixed batch size (the seed builds one per batch size), or one with dynamic
    batch gears (``image:-1,...`` and ``--dynamic_batch_size``; its ONNX keeps a dynamic batch).
    ``--output`` is a name without a suffix (ATC appends ``.om``; the seed's ``--output=X.onnx``
    gave ``X.onnx.om``). ``--log=error`` where the seed has ``debug`` (a debugging level that
    writes large logs). ``workdir`` None: the output in the current directory."""
    if spec.gears:
        shape, extra, out = "image:-1,3,331,331", ["--dynamic_batch_size=" + ",".join(map(str, spec.gears))], "nasnetlarge_dyn"
    else:
        bs = spec.batch_size or 1
        shape, extra, out = f"image:{bs},3,331,331", [], f"nasnetlarge_bs{bs}"
    return [["atc", "--framework=5", f"--model={onnx_path}", "--input_format=NCHW", f"--input_shape={shape}",
             f"--output={os.path.join(workdir, out) if workdir else out}", "--log=error",
             f"--soc_version={spec.soc_version}", *extra]]


#: why the ATC step's output is not verified where it is built
ATC_UNVERIFIED = ("an .om runs only on an Ascend NPU: the build cannot compare it with PyTorch; "
                  "`nasq eval --backend ais_bench` on a CANN host checks its accuracy")


def atc(spec: BuildSpec, onnx_path: str, workdir: str, rows: list[dict]) -> dict:
    cmds = atc_commands(spec, onnx_path, workdir)
    if not shutil.which("atc"):
        shown = "\n".join("  " + shlex.join(c) for c in atc_commands(spec, onnx_path, None))
        raise BuildError("`atc` (Ascend CANN toolkit) is not on PATH here. On a CANN host, after "
                         "`source /usr/local/Ascend/ascend-toolkit/set_env.sh`, run:\n" + shown +
                         "\nthen evaluate the .om with `nasq worker --backend ais_bench` and --weights <file>.om")
    t, files = time.perf_counter(), []
    for cmd in cmds:
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise BuildError(f"atc failed ({p.returncode}): {shlex.join(cmd)}\n{(p.stdout + p.stderr)[-3000:]}")
        # ATC may add the host's OS and architecture to the name (X_linux_x86_64.om)
        prefix = os.path.basename(cmd[5].split("=", 1)[1])
        files += sorted(f for f in os.listdir(workdir) if f.startswith(prefix) and f.endswith(".om"))
    if not files:
        raise BuildError(f"atc reported success but wrote no .om in {workdir}")
    return {"name": "atc", "seconds": round(time.perf_counter() - t, 2), "files": {"om": files},
            "command": "\n".join(shlex.join(c) for c in cmds), "verification": None, "unverified": ATC_UNVERIFIED,
            # the seed's command sets no --precision_mode: the .om computes as ATC's default says
            "precision_mode": "force_fp16 (ATC's default; the command sets no --precision_mode)"}


def trt(spec: BuildSpec, onnx_path: str, workdir: str, rows: list[dict]) -> dict:
    try:
        import tensorrt as trt_mod
    except ImportError:
        raise BuildError("--target trt needs the `tensorrt` Python package (pip install tensorrt on a CUDA host)") from None
    t = time.perf_counter()
    logger = trt_mod.Logger(trt_mod.Logger.WARNING)
    builder = trt_mod.Builder(logger)
    network = builder.create_network(0)
    parser = trt_mod.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        raise BuildError("TensorRT could not parse the ONNX model: " +
                         "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    config = builder.create_builder_config()
    bs = spec.batch_size or 1
    profile = builder.create_optimization_profile()
    profile.set_shape("image", (1, 3, 331, 331), (bs, 3, 331, 331), (max(bs, 64), 3, 331, 331))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise BuildError("TensorRT failed to build an engine (see its log above)")
    with open(os.path.join(workdir, "model.engine"), "wb") as f:
        f.write(engine)
    return {"name": "trt", "seconds": round(time.perf_counter() - t, 2), "files": {"engine": "model.engine"},
            "tool": f"tensorrt {trt_mod.__version__}", "command": "tensorrt.Builder.build_serialized_network(...)",
            "verification": None}


def openvino_logits(xml: str, x: np.ndarray, precision: str = "f32") -> np.ndarray:
    """Run an OpenVINO IR on the CPU with an explicit inference precision."""
    import openvino as ov

    core = ov.Core()
    net = core.read_model(xml)
    net.reshape([len(x), *x.shape[1:]])
    compiled = core.compile_model(net, "CPU", {"INFERENCE_PRECISION_HINT": precision})
    return np.asarray(compiled.create_infer_request().infer({0: x})[compiled.output(0)], dtype=np.float32)


def ov_convert(spec: BuildSpec, onnx_path: str, workdir: str, rows: list[dict]) -> dict:
    """ONNX -> OpenVINO IR (model.xml + model.bin, weights kept in fp32), verified in fp32 against
    PyTorch; bf16's agreement is measured and recorded beside it (not a gate: bf16 is opt-in)."""
    import openvino as ov

    x, ref = reference(spec, workdir)
    t = time.perf_counter()
    xml = os.path.join(workdir, "model.xml")
    ov.save_model(ov.convert_model(onnx_path), xml, compress_to_fp16=False)
    seconds = time.perf_counter() - t
    row = _check(spec, rows, verify.compare(ref, openvino_logits(xml, x, "f32"), step="ov-fp32",
                                            tolerance=spec.tolerance))
    bf16 = None
    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        bf16 = verify.compare(ref, openvino_logits(xml, x, "bf16"), step="ov-bf16 (informational)",
                              tolerance=spec.tolerance)
        rows.append(bf16)
    return {"name": "ov", "seconds": round(seconds, 2), "files": {"xml": "model.xml", "bin": "model.bin"},
            "tool": f"openvino {ov.__version__}",
            "command": "openvino.save_model(openvino.convert_model(model.onnx), model.xml, compress_to_fp16=False)",
            "verification": row, "bf16_verification": bf16}


DEVICE_STEPS = {"ort": ort_optimize, "ov": ov_convert, "om": atc, "trt": trt}
