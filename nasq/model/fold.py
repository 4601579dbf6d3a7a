"""Fold BatchNorm into the convolution before it, for inference (Cadene's NASNet modules).

Each BatchNorm in NASNet-A follows a convolution it can be folded into: ``conv -> bn``
(stem, 1x1 projections), ``depthwise -> pointwise -> bn`` (separable branches; the crop
between them in reduction branches commutes with a per-channel affine map), and
``cat(conv_a, conv_b) -> bn`` (the factorized reduction paths: each half folds into its own
convolution). Folding removes 264 BatchNorm kernels and their memory traffic per forward.
"""
from __future__ import annotations

import torch
from torch import nn


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d, channels: slice | None = None) -> None:
    sl = channels or slice(0, bn.num_features)
    scale = bn.weight[sl] / torch.sqrt(bn.running_var[sl] + bn.eps)
    bias = bn.bias[sl] - bn.running_mean[sl] * scale
    w = conv.weight * scale.view(-1, 1, 1, 1)
    b = bias if conv.bias is None else conv.bias * scale + bias
    conv.weight = nn.Parameter(w.detach())
    conv.bias = nn.Parameter(b.detach())


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm of a NASNet-A (eval mode) into its convolution; returns how many."""
    from .cadene import nasnet

    N = nasnet()

    folded = 0
    for m in list(model.modules()):
        if isinstance(m, nn.Sequential) and "bn" in m._modules and "conv" in m._modules:
            _fold(m.conv, m.bn)
            m.bn = nn.Identity()
            folded += 1
        if isinstance(m, (N.BranchSeparables, N.BranchSeparablesStem)):
            _fold(m.separable_1.pointwise_conv2d, m.bn_sep_1)
            _fold(m.separable_2.pointwise_conv2d, m.bn_sep_2)
            m.bn_sep_1, m.bn_sep_2 = nn.Identity(), nn.Identity()
            folded += 2
        if isinstance(m, (N.FirstCell, N.CellStem1)) and isinstance(m.final_path_bn, nn.BatchNorm2d):
            half = m.path_1.conv.out_channels
            _fold(m.path_1.conv, m.final_path_bn, slice(0, half))
            _fold(m.path_2.conv, m.final_path_bn, slice(half, 2 * half))
            m.final_path_bn = nn.Identity()
            folded += 1
    left = [n for n, x in model.named_modules() if isinstance(x, nn.BatchNorm2d)]
    if left:
        raise RuntimeError(f"BatchNorm layers not folded: {left[:5]}")
    return folded
