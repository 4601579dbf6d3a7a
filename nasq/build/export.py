"""Export a Cadene NASNet checkpoint to ONNX (input ``image``, output ``class``) and simplify it."""
from __future__ import annotations

import json
import os
import time

from ..hashing import file_digest


def export_onnx(weights: str, path: str, *, num_outputs: int | None = None, opset: int = 17,
                batch_size: int | None = None) -> dict:
    """Export with the TorchScript exporter (the graph the seed compiled); dynamic batch unless
    ``batch_size`` is given. Returns timing and shape facts."""
    import torch

    from ..model import load_model
    from ..spec import PREPROCESS

    model, info = load_model(weights, num_outputs)
    x = torch.zeros((batch_size or 1, *PREPROCESS.chw))
    t = time.perf_counter()
    dyn = None if batch_size else {"image": {0: "batch"}, "class": {0: "batch"}}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and folding notes
        torch.onnx.export(model, (x,), path, input_names=["image"], output_names=["class"], opset_version=opset,
                          dynamic_axes=dyn, do_constant_folding=True, dynamo=False)
    return {"export_s": round(time.perf_counter() - t, 2), "model": info.to_dict(), "opset": opset,
            "batch_size": batch_size}


def simplify(src: str, dst: str) -> dict:
    import onnx
    import onnxsim

    t = time.perf_counter()
    model, ok = onnxsim.simplify(onnx.load(src))
    if not ok:
        raise RuntimeError("onnxsim could not validate the simplified model")
    onnx.save(model, dst)
    return {"simplify_s": round(time.perf_counter() - t, 2), "onnxsim": onnxsim.__version__}


def ensure_onnx(weights: str, artifact_dir: str, *, num_outputs: int | None = None, opset: int = 17) -> tuple[str, dict]:
    """A simplified ONNX model of ``weights``, built once and reused (keyed by content and options)."""
    import hashlib

    import onnx
    import torch

    key_src = json.dumps({"weights": file_digest(weights), "num_outputs": num_outputs, "opset": opset,
                          "torch": torch.__version__, "onnx": onnx.__version__}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    folder = os.path.join(artifact_dir, key)
    path = os.path.join(folder, "model.onnx")
    meta_path = os.path.join(folder, "meta.json")
    if os.path.isfile(meta_path) and os.path.isfile(path):
        with open(meta_path) as f:
            return path, json.load(f)
    os.makedirs(folder, exist_ok=True)
    tmp_raw, tmp_sim = f"{path}.{os.getpid()}.raw", f"{path}.{os.getpid()}.sim"
    try:
        meta = {"key": key, "inputs": json.loads(key_src)}
        meta.update(export_onnx(weights, tmp_raw, num_outputs=num_outputs, opset=opset))
        meta.update(simplify(tmp_raw, tmp_sim))
        os.replace(tmp_sim, path)
        with open(f"{meta_path}.tmp", "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(f"{meta_path}.tmp", meta_path)  # written last: its presence marks a complete artifact
    finally:
        for p in (tmp_raw, tmp_sim):
            if os.path.exists(p):
                os.remove(p)
    return path, meta
