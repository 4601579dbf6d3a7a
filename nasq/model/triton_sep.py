"""Fused separable convolutions for NASNet-A in Triton (``--kernels triton``).

NASNet-A's separable branches are ``ReLU -> depthwise kxk (stride 1 or 2) -> pointwise 1x1 ->
BatchNorm``, twice per branch (k = 3, 5, 7). With BatchNorm folded into the pointwise
convolution (``fold.py``), one kernel here computes ``pointwise(depthwise(relu(x))) + bias``
for a tile of output pixels and output channels: the depthwise result of a chunk of input
channels is made in registers and fed straight into the pointwise matrix product (``tl.dot``),
so the largest intermediate of every separable convolution is never written to memory and read
back. Each branch becomes two kernel launches instead of five or six.

The reduction branches' ``ZeroPad2d((1, 0, 1, 0))`` before the first depthwise convolution and
the crop ``[:, :, 1:, 1:]`` after it fold into the kernel's window offset: output pixel
``(oh, ow)`` reads input rows ``oh * s + kh - (p + 1 - s)``, zero outside the image.

The kernel is the custom op ``nasq::separable`` (with a shape-only fake implementation), so
torch.compile traces a model through it without a graph break and CUDA graphs capture it. Exactness is checked on the CPU with
Triton's interpreter (``TRITON_INTERPRET=1``) against torch's own convolutions
(``tests/unit/test_triton_sep.py``); speed only means something on a GPU (``bench/triton_checks.sh``).
On a GPU the tile shape is autotuned per layer shape on first use (before a CUDA graph is captured);
use it with ``--cuda-graphs``: eagerly, 220 Python-level launches per forward dominate small batches.

Precision: the depthwise sum and the pointwise accumulation are fp32; for fp16/bf16 the
depthwise result is rounded to the input dtype before the pointwise product (tensor cores), as
an unfused pair of cuDNN kernels rounds the intermediate it stores. For fp32, ``tl.dot`` runs in
IEEE fp32 (no TF32), so fp32 results match torch's to rounding.
"""
from __future__ import annotations

import os

import torch
from torch import nn

try:  # Triton comes with CUDA builds of torch; without it the option says so at load
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None) if triton is not None else None
    if knobs is not None and hasattr(knobs, "runtime"):
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


#: Triton's CPU interpreter (TRITON_INTERPRET set when this module was imported: the kernel below
#: is decorated as an interpreted function then, and runs on CPU tensors with numpy)
INTERPRET = _interpreting()


def available() -> str | None:
    """None if the fused kernels can run here, else why not."""
    if triton is None:
        return "Triton is not installed (it comes with CUDA builds of torch)"
    if not torch.cuda.is_available() and not INTERPRET:
        return "Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1, the slow CPU interpreter used by the tests)"
    return None


if triton is not None:
    @triton.jit
    def _separable_kernel(x_ptr, wdw_ptr, wpw_ptr, b_ptr, y_ptr,
                          C, H, W, CO, OH, OW,
                          sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                          STRIDE: tl.constexpr, OFFSET: tl.constexpr, K: tl.constexpr, RELU: tl.constexpr,
                          HAS_BIAS: tl.constexpr, FP32: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr):
        pid_p = tl.program_id(0)
        pid_co = tl.program_id(1)
        n = tl.program_id(2).to(tl.int64)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = offs_p < OH * OW
        oh = offs_p // OW
        ow = offs_p % OW
        offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
        co_ok = offs_co < CO
        acc = tl.zeros((BLOCK_CO, BLOCK_P), dtype=tl.float32)
        x_n = x_ptr + n * sxn
        for c0 in range(0, C, BLOCK_CI):
            offs_ci = c0 + tl.arange(0, BLOCK_CI)
            ci_ok = offs_ci < C
            d = tl.zeros((BLOCK_CI, BLOCK_P), dtype=tl.float32)
            for kh in tl.static_range(K):
                ih = oh * STRIDE + kh - OFFSET
                h_ok = p_ok & (ih >= 0) & (ih < H)
                for kw in tl.static_range(K):
                    iw = ow * STRIDE + kw - OFFSET
                    ok = h_ok & (iw >= 0) & (iw < W)
                    ptrs = x_n + offs_ci[:, None] * sxc + (ih * sxh + iw * sxw)[None, :]
                    xv = tl.load(ptrs, mask=ci_ok[:, None] & ok[None, :], other=0.0).to(tl.float32)
                    if RELU:
                        xv = tl.maximum(xv, 0.0)
                    wv = tl.load(wdw_ptr + offs_ci * (K * K) + (kh * K + kw), mask=ci_ok, other=0.0).to(tl.float32)
                    d += xv * wv[:, None]
            wp = tl.load(wpw_ptr + offs_co[:, None] * C + offs_ci[None, :], mask=co_ok[:, None] & ci_ok[None, :],
                         other=0.0)
            if FP32:
                acc += tl.dot(wp.to(tl.float32), d, input_precision="ieee")
            else:
                acc += tl.dot(wp, d.to(wp.dtype))
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_co, mask=co_ok, other=0.0).to(tl.float32)[:, None]
        y_ptrs = y_ptr + n * syn + offs_co[:, None] * syc + (oh * syh + ow * syw)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=co_ok[:, None] & p_ok[None, :])


if triton is not None and not INTERPRET:
    # tile shapes to try per layer shape on the GPU (BLOCK_CO large: the depthwise result of a
    # pixel tile is recomputed for each output-channel tile)
    _CONFIGS = [triton.Config({"BLOCK_P": p, "BLOCK_CO": co, "BLOCK_CI": ci}, num_warps=w)
                for p, co, ci, w in ((32, 64, 32, 4), (32, 128, 32, 4), (16, 128, 32, 4), (64, 64, 32, 4),
                                     (32, 256, 32, 8), (64, 128, 32, 8), (16, 256, 16, 8), (128, 32, 32, 4))]
    _separable_tuned = triton.autotune(configs=_CONFIGS, key=["C", "CO", "OH", "OW", "STRIDE", "K", "FP32"])(
        _separable_kernel)


def _pow2(n: int, low: int, high: int) -> int:
    return max(low, min(high, 1 << max(0, (n - 1).bit_length())))


def _interpreter_blocks(c: int, co: int, pixels: int) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_CO, BLOCK_CI) under the CPU interpreter: large tiles (numpy does the work
    per tile; the interpreter's cost is per operation, so fewer programs and channel chunks run
    faster). ``tl.dot`` needs >= 16 in every dimension. The GPU autotunes instead (``_CONFIGS``)."""
    return _pow2(pixels, 16, 32768), _pow2(co, 16, 256), _pow2(c, 16, 256)


def out_size(size: int, k: int, stride: int, offset: int, crop: bool) -> int:
    """Output rows (or columns) of one fused separable convolution, ``offset`` = the padding
    seen from the unpadded input (see the module docstring)."""
    if crop:  # ZeroPad2d(1, 0) then padding p, then the first row dropped
        p = offset - 1 + stride
        return (size + 1 + 2 * p - k) // stride + 1 - 1
    return (size + 2 * offset - k) // stride + 1


def _separable_impl(x: torch.Tensor, w_dw: torch.Tensor, w_pw: torch.Tensor, bias: torch.Tensor | None,
                    stride: int, offset: int, out_h: int, out_w: int, relu: bool) -> torch.Tensor:
    if not all(t is None or t.is_contiguous() for t in (w_dw, w_pw, bias)) or w_pw.shape[1] != x.shape[1]:
        raise ValueError("nasq::separable: w_dw (C, k*k), w_pw (CO, C) and bias (CO,) must be contiguous, C = x's")
    n, c, h, w = x.shape
    co = w_pw.shape[0]
    k = int(round(w_dw.shape[1] ** 0.5))
    y = _out_like(x, co, out_h, out_w)
    args = (x, w_dw, w_pw, bias if bias is not None else w_pw, y, c, h, w, co, out_h, out_w, *x.stride(), *y.stride())
    meta = dict(STRIDE=stride, OFFSET=offset, K=k, RELU=relu, HAS_BIAS=bias is not None, FP32=x.dtype == torch.float32)
    if INTERPRET or _FIXED_BLOCKS is not None:
        block_p, block_co, block_ci = _FIXED_BLOCKS or _interpreter_blocks(c, co, out_h * out_w)
        grid = (triton.cdiv(out_h * out_w, block_p), triton.cdiv(co, block_co), n)
        _separable_kernel[grid](*args, **meta, BLOCK_P=block_p, BLOCK_CO=block_co, BLOCK_CI=block_ci)
        return y
    with torch.cuda.device(x.device):  # Triton launches on the current device
        _separable_tuned[lambda m: (triton.cdiv(out_h * out_w, m["BLOCK_P"]), triton.cdiv(co, m["BLOCK_CO"]), n)](
            *args, **meta)
    return y


#: tests: force one tile shape (BLOCK_P, BLOCK_CO, BLOCK_CI) instead of the defaults/autotuning
_FIXED_BLOCKS: tuple[int, int, int] | None = None


def _out_like(x: torch.Tensor, co: int, out_h: int, out_w: int) -> torch.Tensor:
    """The output tensor: NCHW, or channels-last for a channels-last input."""
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.empty((x.shape[0], co, out_h, out_w), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last if cl else torch.contiguous_format)


# ``nasq::separable``: an opaque custom op with a fake (shape-only) implementation, so
# torch.compile traces a model through it without a graph break and CUDA graphs capture the
# launch (Triton launches on torch's current stream).
@torch.library.custom_op("nasq::separable", mutates_args=())
def _separable_op(x: torch.Tensor, w_dw: torch.Tensor, w_pw: torch.Tensor, bias: torch.Tensor | None, stride: int,
                  offset: int, out_h: int, out_w: int, relu: bool) -> torch.Tensor:
    return _separable_impl(x, w_dw, w_pw, bias, stride, offset, out_h, out_w, relu)


@_separable_op.register_fake
def _(x, w_dw, w_pw, bias, stride, offset, out_h, out_w, relu):
    return _out_like(x, w_pw.shape[0], out_h, out_w)


def separable(x: torch.Tensor, w_dw: torch.Tensor, w_pw: torch.Tensor, bias: torch.Tensor | None, *, stride: int,
              offset: int, out_h: int, out_w: int, relu: bool = True) -> torch.Tensor:
    """``pointwise(depthwise(relu(x))) + bias`` in one kernel; ``w_dw`` (C, k*k), ``w_pw``
    (CO, C), both contiguous; ``bias`` (CO,) or None."""
    return _separable_op(x, w_dw, w_pw, bias, stride, offset, out_h, out_w, relu)


class FusedSeparable(nn.Module):
    """One ``relu -> depthwise -> pointwise (+ folded BatchNorm)`` as one kernel."""

    def __init__(self, sep: nn.Module, *, crop: bool = False):
        super().__init__()
        dw, pw = sep.depthwise_conv2d, sep.pointwise_conv2d
        if dw.bias is not None:
            raise ValueError("FusedSeparable: a depthwise bias is not supported (NASNet-A has none)")
        if dw.groups != dw.in_channels or dw.out_channels != dw.in_channels or tuple(dw.dilation) != (1, 1) \
                or dw.kernel_size[0] != dw.kernel_size[1] or pw.kernel_size != (1, 1) or pw.groups != 1:
            raise ValueError("FusedSeparable: expected a depthwise kxk (no dilation) then a pointwise 1x1 convolution")
        if not isinstance(dw.padding, tuple) or len(set(dw.padding)) != 1 or len(set(dw.stride)) != 1:
            raise ValueError(f"FusedSeparable: square stride and padding expected, got {dw.stride} {dw.padding}")
        self.k, self.stride, pad = dw.kernel_size[0], dw.stride[0], dw.padding[0]
        self.crop = crop
        self.offset = pad + 1 - self.stride if crop else pad
        # kept 2-D, so a model moved to channels-last leaves them as the kernel reads them
        self.w_dw = nn.Parameter(dw.weight.detach().reshape(dw.weight.shape[0], -1).clone(), requires_grad=False)
        self.w_pw = nn.Parameter(pw.weight.detach().reshape(pw.weight.shape[0], -1).clone(), requires_grad=False)
        self.bias = None if pw.bias is None else nn.Parameter(pw.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = out_size(x.shape[2], self.k, self.stride, self.offset, self.crop)
        w = out_size(x.shape[3], self.k, self.stride, self.offset, self.crop)
        return separable(x, self.w_dw, self.w_pw, self.bias, stride=self.stride, offset=self.offset, out_h=h,
                         out_w=w, relu=True)


class FusedBranch(nn.Module):
    """A NASNet-A separable branch (BatchNorm folded): two fused kernels."""

    def __init__(self, branch: nn.Module):
        super().__init__()
        from .cadene import nasnet

        N = nasnet()

        for bn in (branch.bn_sep_1, branch.bn_sep_2):
            if not isinstance(bn, nn.Identity):
                raise ValueError("FusedBranch: fold BatchNorm first (nasq.model.fold.fold_batchnorm)")
        crop = isinstance(branch, N.BranchSeparablesReduction)
        if crop and tuple(branch.padding.padding) != (1, 0, 1, 0):
            raise ValueError(f"FusedBranch: the reduction pad must be (1, 0, 1, 0), not {branch.padding.padding}")
        self.first = FusedSeparable(branch.separable_1, crop=crop)
        self.second = FusedSeparable(branch.separable_2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def fuse_separables(model: nn.Module) -> int:
    """Replace every separable branch of a folded NASNet-A with its fused kernels; returns how many.

    Raises:
        ValueError: BatchNorm not folded, or a branch of an unexpected shape.
    """
    from .cadene import nasnet

    N = nasnet()

    kinds = (N.BranchSeparables, N.BranchSeparablesStem, N.BranchSeparablesReduction)
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kinds):
                setattr(parent, name, FusedBranch(child))
                replaced += 1
    return replaced
