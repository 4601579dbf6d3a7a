"""GPU checks (skipped without CUDA). The timed ones live in bench/gpu_checks.sh."""
import numpy as np
import pytest
import torch

from nasq import backends
from nasq.config import BackendOptions
from nasq.model.spec import ModelRef

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]


@pytest.mark.parametrize("precision,graphs", [("fp16", False), ("bf16", False), ("fp16", True)])
def test_fast_path_agrees_with_fp32(assets, precision, graphs):
    from nasq.data import open_source

    src = open_source(assets["data"])
    crops = np.stack([src.load(i) for i in range(16)])
    ref = backends.create("torch", "cuda:0")
    ref.load(ModelRef(assets["weights"]), batch_size=16)
    fast = backends.create("torch", "cuda:0")
    fast.load(ModelRef(assets["weights"]), batch_size=16, options=BackendOptions(precision=precision, cuda_graphs=graphs))
    a, b = ref.predict_u8(crops), fast.predict_u8(crops)
    assert np.mean(a.argmax(1) == b.argmax(1)) >= 15 / 16
    b2 = fast.predict_u8(crops[:5])  # a short batch (its own graph when graphs are on)
    assert np.array_equal(b2.argmax(1), b[:5].argmax(1))
