"""Numeric verification of a converted model against PyTorch fp32.

A fixed batch of generated natural-looking images (seeded, the same on every machine) goes
through the checkpoint in PyTorch fp32 and through the candidate; the logits are compared.
"""
from __future__ import annotations

import numpy as np

from ..errors import NasqError
from ..tables import table as render_table

N_IMAGES = 8
SEED = 1234


class VerificationError(NasqError):
    """A converted model disagrees with PyTorch beyond the tolerance (or in shape)."""


def reference_batch(n: int = N_IMAGES) -> np.ndarray:
    """Normalized float32 NCHW batch of ``n`` natural-looking JPEGs of varied sizes (seeded)."""
    import io

    from ..data.transforms import normalize_u8, preprocess_u8
    from ..demo import make_image

    rng = np.random.default_rng(SEED)
    crops = []
    for _ in range(n):
        buf = io.BytesIO()
        make_image(rng, int(rng.integers(340, 640)), int(rng.integers(340, 640))).save(buf, format="JPEG", quality=90)
        buf.seek(0)
        crops.append(preprocess_u8(buf))
    return normalize_u8(np.stack(crops))


def torch_logits(weights: str, num_outputs: int | None, x: np.ndarray) -> np.ndarray:
    import torch

    from ..model.checkpoint import load_model

    model, _ = load_model(weights, num_outputs)
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def onnx_logits(path: str, x: np.ndarray, providers: list | None = None) -> np.ndarray:
    """Run an ONNX model on ``x`` with ONNX Runtime, in chunks of its fixed batch if it has one."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(path, opts, providers=providers or ["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None
    step = fixed or len(x)
    outs = []
    for i in range(0, len(x), step):
        chunk = x[i:i + step]
        n = len(chunk)
        if fixed and n < fixed:
            chunk = np.concatenate([chunk, np.zeros((fixed - n,) + chunk.shape[1:], chunk.dtype)])
        outs.append(sess.run(None, {inp.name: chunk})[0][:n])
    return np.concatenate(outs)


def compare(ref: np.ndarray, got: np.ndarray, *, step: str, tolerance: float) -> dict:
    """Max abs / rel difference and top-1/top-5 agreement; raises on a shape mismatch.

    ``tolerance`` is relative to the logit scale (max |reference logit|).
    """
    if ref.shape != got.shape:
        raise VerificationError(f"{step}: output shape {tuple(got.shape)} differs from PyTorch's {tuple(ref.shape)}")
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    scale = float(np.abs(ref).max())
    t1 = np.argmax(ref, 1) == np.argmax(got, 1)
    r5, g5 = np.argsort(-ref, 1)[:, :5], np.argsort(-got, 1)[:, :5]
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(r5, g5)])
    out = {"step": step, "images": int(len(ref)), "max_abs": float(diff.max()), "logit_scale": scale,
           "max_rel": float(diff.max() / scale) if scale else float(diff.max()),
           "top1_agreement": float(t1.mean()), "top5_overlap": float(overlap), "tolerance_rel": tolerance}
    out["ok"] = bool(out["max_rel"] <= tolerance and out["top1_agreement"] == 1.0)
    return out


def table(rows: list[dict]) -> str:
    return render_table([[r["step"], f"{r['max_abs']:.2e}", f"{r['max_rel']:.2e}", f"{100 * r['top1_agreement']:.1f}%",
                          f"{100 * r['top5_overlap']:.1f}%", "ok" if r["ok"] else "OUT OF TOLERANCE"] for r in rows],
                        ["step", "max abs", "max rel", "top-1 agree", "top-5 overlap", "result"], indent="  ")
