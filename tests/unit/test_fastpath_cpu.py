"""The GPU fast path's pieces that run on a CPU: BatchNorm folding, options, `nasq bench`."""
import copy

import numpy as np
import pytest
import torch

from nasq import backends
from nasq.config import BackendOptions
from nasq.errors import BackendError
from nasq.model.checkpoint import load_model
from nasq.model.fold import fold_batchnorm
from nasq.model.spec import ModelRef
from nasq.perf.bench import bench
from nasq.perf.timing import summarize


def test_fold_batchnorm_is_exact_enough(assets):
    from nasq.data import normalize_u8, open_source

    model, _ = load_model(assets["weights"])
    folded = copy.deepcopy(model)
    assert fold_batchnorm(folded) == 264  # every BatchNorm of NASNet-A
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    src = open_source(assets["data"])
    x = torch.from_numpy(normalize_u8(np.stack([src.load(i) for i in range(8)])))
    with torch.inference_mode():
        a, b = model(x), folded(x)
    assert (a - b).abs().max() / a.abs().max() < 1e-5
    assert torch.equal(a.argmax(1), b.argmax(1))


def test_half_precision_refused_on_cpu(assets):
    b = backends.create("torch", "cpu")
    with pytest.raises(BackendError, match="runs on CUDA only"):
        b.load(ModelRef(assets["weights"]), batch_size=1, options=BackendOptions(precision="fp16"))
    with pytest.raises(BackendError, match="compile mode"):
        b.load(ModelRef(assets["weights"]), batch_size=1, options=BackendOptions(compile="fastest"))


def test_fold_option_on_cpu_keeps_predictions(assets):
    from nasq.data import open_source

    crops = np.stack([open_source(assets["data"]).load(i) for i in range(4)])
    plain, fused = backends.create("torch", "cpu"), backends.create("torch", "cpu")
    plain.load(ModelRef(assets["weights"]), batch_size=4)
    fused.load(ModelRef(assets["weights"]), batch_size=4, options=BackendOptions(fold_bn=True, channels_last=True))
    a, b = plain.predict_u8(crops), fused.predict_u8(crops)
    assert np.array_equal(a.argmax(1), b.argmax(1)) and np.abs(a - b).max() < 1e-3
    assert fused.model_info["options"]["fold_bn"] is True


def test_summary_throughput_is_batch_over_mean_latency():
    s = summarize([10.0, 20.0, 30.0], 8)
    assert s["mean_ms"] == 20.0 and s["img_s"] == 400.0 and s["min_ms"] == 10.0 and s["median_ms"] == 20.0


def test_bench_on_cpu_with_baseline(assets, tmp_path):
    res = bench(weights=assets["weights"], data=assets["data"], batch_sizes=[1, 2], min_time_s=0.2,
                options=BackendOptions(fold_bn=True), log=lambda *_: None)
    configs = [(r["config"], r["batch_size"]) for r in res.rows]
    assert configs == [("baseline eager fp32", 1), ("baseline eager fp32", 2),
                       ("torch fp32 [fold_bn=True]", 1), ("torch fp32 [fold_bn=True]", 2)]
    for r in res.rows:
        assert r["iters"] >= 10 and r["min_ms"] <= r["median_ms"] <= r["p99_ms"]
        assert r["img_s"] == pytest.approx(r["batch_size"] * 1000 / r["mean_ms"], rel=1e-3)
        assert r["versions"]["torch"] and r["device"] == "cpu"
    assert "vs eager fp32" in res.table and "1.00x" in res.table
    e2e = bench(weights=assets["weights"], data=assets["data"], batch_sizes=[4], mode="e2e", baseline=False,
                min_time_s=0.2, log=lambda *_: None)
    assert e2e.rows[0]["mode"] == "e2e" and e2e.rows[0]["img_s"] > 0


def test_device_decode_path_on_cpu(assets):
    """decode_jpeg + antialiased resize (the nvjpeg path, exercised on the CPU): within 1/255 of
    PIL per pixel, the same images excluded with reasons, predictions close to the PIL path."""
    import os

    from torchvision.io import ImageReadMode, decode_jpeg

    from nasq.data import open_source, preprocess_u8, read_labels
    from nasq.inference.evaluate import evaluate_range

    src, labels = open_source(assets["data"]), read_labels(assets["labels"])
    pil, dev = backends.create("torch", "cpu"), backends.create("torch", "cpu")
    pil.load(ModelRef(assets["weights"]), batch_size=4)
    dev.load(ModelRef(assets["weights"]), batch_size=4, options=BackendOptions(device_decode=True))
    for name in src.names[:6]:
        raw = open(os.path.join(src.root, name), "rb").read()
        img = decode_jpeg(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB)
        ours = dev._resize_crop(img).permute(1, 2, 0).numpy()
        assert np.abs(ours - preprocess_u8(os.path.join(src.root, name)).astype(np.float32)).max() <= 1.0
    a = evaluate_range(src, pil, 0, len(src), batch_size=4, labels=labels)
    b = evaluate_range(src, dev, 0, len(src), batch_size=4, labels=labels)
    assert a["names"] == b["names"] and len(b["names"]) == 20
    assert sorted(e["name"] for e in a["errors"]) == sorted(e["name"] for e in b["errors"])
    assert np.mean([x[0] == y[0] for x, y in zip(a["top5"], b["top5"])]) >= 0.8
