"""The fused separable-convolution Triton kernels, checked on the CPU with Triton's interpreter
(TRITON_INTERPRET=1) against torch's own convolutions: every kind of NASNet-A separable branch,
fp32 tight and fp16 within a stated tolerance, a whole (tiny) NASNet-A through the torch backend
with ``kernels="triton"``, and torch.compile tracing through the kernel without a graph break."""
import copy
import importlib
import os

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("triton", reason="Triton comes with the CUDA builds of torch that nasq installs")
pytestmark = pytest.mark.slow  # Triton's interpreter runs each kernel element by element in Python: minutes in all


@pytest.fixture(scope="module")
def ts():
    """nasq.model.triton_sep, its kernel interpreted on a machine without a GPU (tests/conftest.py
    sets TRITON_INTERPRET=1 there before Triton is imported)."""
    mod = importlib.import_module("nasq.model.triton_sep")
    if mod.available() is not None:  # e.g. /dev/nvidia0 present but CUDA hidden from this process
        pytest.skip(mod.available())
    if torch.cuda.is_available():  # the fp32 references must not use TF32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    return mod


#: where the kernels run: the GPU if there is one, else the CPU through the interpreter
DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _branch(kind: str, cin: int, cout: int, k: int, stride: int, seed: int):
    """A NASNet-A separable branch with random weights and BatchNorm statistics, eval mode."""
    from pretrainedmodels.models import nasnet as N

    torch.manual_seed(seed)
    pad = k // 2
    if kind == "reduction":
        m = N.BranchSeparablesReduction(cin, cout, k, stride, pad, bias=False)
    elif kind == "stem":
        m = N.BranchSeparablesStem(cin, cout, k, stride, pad, bias=False)
    else:
        m = N.BranchSeparables(cin, cout, k, stride, pad, bias=False)
    for bn in (m.bn_sep_1, m.bn_sep_2):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return m.eval()


def _folded(m: nn.Module) -> nn.Module:
    from nasq.model.fold import _fold

    f = copy.deepcopy(m)
    with torch.no_grad():
        _fold(f.separable_1.pointwise_conv2d, f.bn_sep_1)
        _fold(f.separable_2.pointwise_conv2d, f.bn_sep_2)
    f.bn_sep_1, f.bn_sep_2 = nn.Identity(), nn.Identity()
    return f


# every kind of separable branch NASNet-A has: k 3/5/7, stride 1/2, the stem's channel change
# and the reduction cells' ZeroPad2d + crop; odd and even sizes, channels not multiples of the tile
BRANCHES = [("normal", 24, 24, 3, 1, 11), ("normal", 20, 20, 5, 1, 9), ("stem", 3, 16, 5, 2, 13),
            ("stem", 18, 20, 7, 2, 12), ("reduction", 20, 20, 5, 2, 11), ("reduction", 18, 18, 7, 2, 10),
            ("reduction", 16, 16, 3, 2, 9), ("reduction", 16, 16, 3, 1, 9)]


@pytest.mark.parametrize("kind, cin, cout, k, stride, size", BRANCHES,
                         ids=[f"{b[0]}-k{b[3]}-s{b[4]}-{b[5]}px" for b in BRANCHES])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fused_branch_equals_torch_in_fp32(ts, kind, cin, cout, k, stride, size, layout):
    m = _branch(kind, cin, cout, k, stride, seed=size).to(DEV)
    x = torch.randn(2, cin, size, size, device=DEV)
    with torch.inference_mode():
        ref = m(x)
        fused = ts.FusedBranch(_folded(m))
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        y = fused(x)
    assert y.shape == ref.shape
    assert (y - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fused_branch_in_fp16_within_tolerance(ts, layout):
    """fp16 in, fp16 out, fp32 sums (the depthwise result rounded to fp16 before the pointwise
    product, as an unfused pair stores it): within 1e-2 of the fp32 result's scale."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for kind, cin, cout, k, stride, size in BRANCHES[::2]:
        m = _branch(kind, cin, cout, k, stride, seed=size).to(DEV)
        x = torch.randn(2, cin, size, size, device=DEV)
        with torch.inference_mode():
            ref = m(x)
            y = ts.FusedBranch(_folded(m).half())(x.half().contiguous(memory_format=fmt))
        assert y.dtype == torch.float16
        err = (y.float() - ref).abs().max().item() / ref.abs().max().item()
        assert err <= 1e-2, (kind, k, stride, err)


@pytest.mark.parametrize("blocks", [(16, 16, 32), (64, 32, 16)])
def test_gpu_tile_shapes_loop_over_channel_chunks_and_tiles(ts, blocks, monkeypatch):
    """The tile shapes the GPU uses (not the interpreter's large ones): several input-channel
    chunks, several output-channel tiles, ragged last tiles (C = 40, CO = 72)."""
    monkeypatch.setattr(ts, "_FIXED_BLOCKS", blocks)
    for kind, k, stride in (("normal", 5, 1), ("reduction", 7, 2), ("stem", 3, 2)):
        m = _branch(kind, 40, 72 if kind == "stem" else 40, k, stride, seed=k).to(DEV)
        x = torch.randn(1, 40, 9, 9, device=DEV)
        with torch.inference_mode():
            ref, y = m(x), ts.FusedBranch(_folded(m))(x)
        assert (y - ref).abs().max().item() <= 1e-5 * ref.abs().max().item(), (kind, blocks)


def test_a_branch_needs_batchnorm_folded_first(ts):
    with pytest.raises(ValueError, match="fold BatchNorm first"):
        ts.FusedBranch(_branch("normal", 16, 16, 3, 1, seed=0))


def test_whole_tiny_nasnet_through_the_torch_backend(ts, assets):
    """`kernels="triton"`: BatchNorm folded, all 110 separable branches fused (220 kernels),
    logits equal to the plain fp32 module's within 1e-5 of their scale, same top-1."""
    from nasq import backends
    from nasq.config import BackendOptions
    from nasq.data import open_source
    from nasq.model.spec import ModelRef

    crops = open_source(assets["data"]).load(0)[None]  # one image: the interpreter runs each element
    dev = "cuda:0" if DEV == "cuda" else "cpu"
    plain, fused = backends.create("torch", dev), backends.create("torch", dev)
    plain.load(ModelRef(assets["weights"]), batch_size=1)
    fused.load(ModelRef(assets["weights"]), batch_size=1, options=BackendOptions(kernels="triton"))
    assert fused.model_info["fused_separable_branches"] == 110 and fused.options.fold_bn is True
    a, b = plain.predict_u8(crops), fused.predict_u8(crops)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
    assert np.array_equal(a.argmax(1), b.argmax(1))


def test_the_custom_op_passes_torch_opcheck(ts):
    """``nasq::separable`` is a well-formed custom op: schema, fake (shape and memory format,
    NCHW and channels-last) and dispatch checked by ``torch.library.opcheck``."""
    fused = ts.FusedBranch(_folded(_branch("reduction", 16, 16, 5, 2, seed=1))).to(DEV)
    first = fused.first
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(1, 16, 9, 9, device=DEV).contiguous(memory_format=fmt)
        args = (x, first.w_dw, first.w_pw, first.bias, first.stride, first.offset, 4, 4, True)
        torch.library.opcheck(ts._separable_op, args, test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_with_freezing_runs_through_the_kernel(ts):
    """What the fast path does: torch.compile (inductor, freezing) of a fused branch, one graph,
    no break, the eager result."""
    import torch._dynamo
    import torch._inductor.config as inductor

    fused = ts.FusedBranch(_folded(_branch("reduction", 16, 16, 5, 2, seed=1))).to(DEV).eval()
    x = torch.randn(1, 16, 9, 9, device=DEV)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(fused)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    with inductor.patch(freezing=True), torch.inference_mode():
        compiled = torch.compile(fused, fullgraph=True, dynamic=False)
        assert torch.allclose(compiled(x), fused(x), rtol=0, atol=1e-6)


def test_the_option_says_why_it_cannot_run(monkeypatch, assets):
    """Without a GPU and without the interpreter: one line, before any work."""
    from nasq import backends
    from nasq.config import BackendOptions
    from nasq.errors import BackendError
    from nasq.model import triton_sep
    from nasq.model.spec import ModelRef

    monkeypatch.setattr(triton_sep, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendError, match="--kernels triton: Triton kernels need a CUDA GPU"):
        backends.create("torch", "cpu").load(ModelRef(assets["weights"]), batch_size=1,
                                             options=BackendOptions(kernels="triton"))
