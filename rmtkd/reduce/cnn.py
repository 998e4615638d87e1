"""Surgery on nn.Conv2d consumers (channels are the features, spatial positions the samples).

``project``: conv -> ``nn.Sequential(proj, conv')`` with ``proj`` a bias-free 1x1 conv of
weight ``U^T`` (k x d x 1 x 1) and ``conv'`` the conv with k input channels, weight
``W'[:, j] = sum_c W[:, c] U[c, j]`` and bias ``b + sum_taps W r``, ``r = (I - U U^T) mean``.

``width`` (ResNet block inner channels): producer conv -> BatchNorm2d -> activation ->
consumer conv. The BN is folded into the producer with its running (eval) statistics and
replaced by ``nn.Identity`` (the block then trains without that BN); the producer's output
channels are mapped with P and the consumer's input channels contracted with R, bias
corrected with c (:func:`rmtkd.reduce.maths.width_maps`: rotate onto U, or, through the
activation, select k channels). A consumer without bias gains one when a mean is given.

Exactness: for site activations in ``mean + span(U)`` both modes are exact in eval mode
(width mode only when no nonlinearity acts between; with ReLU it approximates), except at
borders that a consumer with zero padding pads: there the padded taps see 0 in the original
but the mean correction ``W r`` sums over every tap. A 1x1 or padding-free consumer (or
``mean=None``, or ``r = 0`` as with k = d) is exact everywhere.
"""
from __future__ import annotations

import torch
from torch import nn

from .maths import (ELEMENTWISE, PASSTHROUGH, SUPPORTED, Reduction, UnsupportedModuleError,
                   modules_before, residual_mean, width_maps)


def project_conv(conv: nn.Conv2d, reduction: Reduction) -> nn.Sequential:
    """``nn.Sequential(1x1 conv d -> k with weight U^T, conv resized to k input channels)``."""
    _check_groups(conv, reduction.module_name)
    U = reduction.basis.detach().to(torch.float64).cpu()
    proj = _conv(U.T[:, :, None, None], None, conv, stride=1, padding=0, dilation=1)
    return nn.Sequential(proj, _consumer(conv, U, residual_mean(reduction))).train(
        conv.training)


def width_conv(model: nn.Module, reduction: Reduction) -> dict[str, nn.Module]:
    """Replacements for producer conv (k outputs, BN folded), its BN (Identity) and the
    consumer conv (k inputs)."""
    name = reduction.module_name
    consumer = model.get_submodule(name)
    _check_groups(consumer, name)
    prod_name, producer, bn_name, bn, nonlinear = find_conv_producer(model, name)
    if producer.out_channels != reduction.d:
        raise UnsupportedModuleError(
            f"width reduction of {name!r}: producer {prod_name!r} has "
            f"{producer.out_channels} output channels but the site has d={reduction.d}")
    w1, b1 = fold_bn(producer, bn) if bn is not None else (_f64(producer.weight),
                                                            _bias(producer))
    P, R, c, _ = width_maps(reduction, nonlinear)
    w1 = torch.einsum("jc,c...->j...", P, w1)
    b1 = None if b1 is None else P @ b1
    out = {prod_name: _conv(w1, b1, producer), name: _consumer(consumer, R, c)}
    if bn_name is not None:
        out[bn_name] = nn.Identity()
    return out


def find_conv_producer(model: nn.Module, name: str
                       ) -> tuple[str, nn.Conv2d, str | None, nn.BatchNorm2d | None, bool]:
    """``(producer name, producer, BN name, BN, nonlinear)`` for the chain producer conv ->
    [BatchNorm2d] -> [elementwise]* -> ``name``; nonlinear: an elementwise nonlinearity
    sits in the chain. Outside an nn.Sequential (where module order is only the
    registration order) the BatchNorm2d is required."""
    before, ordered = modules_before(model, name)
    bn_name, bn = None, None
    nonlinear = False
    for prev_name, prev in before:
        if isinstance(prev, nn.Conv2d):
            if bn is None and not ordered:
                break
            _check_groups(prev, prev_name)
            return prev_name, prev, bn_name, bn, nonlinear
        nonlinear = nonlinear or isinstance(prev, ELEMENTWISE)
        if isinstance(prev, nn.BatchNorm2d) and bn is None:
            bn_name, bn = prev_name, prev
        elif bn is not None or not isinstance(prev, ELEMENTWISE + PASSTHROUGH):
            raise UnsupportedModuleError(
                f"width reduction of {name!r}: {prev_name!r} ({type(prev).__name__}) sits "
                f"between it and its producer conv. Supported: {SUPPORTED}; or use "
                f"mode='project'")
    raise UnsupportedModuleError(
        f"width reduction of {name!r}: no producer conv -> BatchNorm2d -> activation chain "
        f"found feeding it. Supported: {SUPPORTED}; or use mode='project'")


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``bn(conv(x))`` with eval statistics as one conv: (weight (out, in, kh, kw), bias
    (out,)) in float64 on the CPU."""
    if bn.running_mean is None or bn.running_var is None:
        raise UnsupportedModuleError(
            "cannot fold a BatchNorm2d without running statistics "
            "(track_running_stats=False); use mode='project'")
    scale = 1.0 / torch.sqrt(_f64(bn.running_var) + bn.eps)
    if bn.weight is not None:
        scale = scale * _f64(bn.weight)
    bias = _bias(conv)
    bias = (torch.zeros_like(scale) if bias is None else bias) - _f64(bn.running_mean)
    bias = bias * scale + (0.0 if bn.bias is None else _f64(bn.bias))
    return _f64(conv.weight) * scale[:, None, None, None], bias


def _consumer(conv: nn.Conv2d, R: torch.Tensor, c: torch.Tensor | None) -> nn.Conv2d:
    """``conv`` with input channels contracted with R (d x k, float64) and the offset c
    (d,) of the rebuilt input in its bias."""
    w = _f64(conv.weight)
    bias = _bias(conv)
    if c is not None:
        shift = w.sum(dim=(2, 3)) @ c
        bias = shift if bias is None else bias + shift
    return _conv(torch.einsum("oc...,cj->oj...", w, R), bias, conv)


def _check_groups(conv: nn.Module, name: str) -> None:
    if conv.groups != 1:
        raise UnsupportedModuleError(
            f"{name!r} is a grouped/depthwise nn.Conv2d (groups={conv.groups}); only "
            f"groups=1 convolutions can be reduced. Supported: {SUPPORTED}")


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def _bias(conv: nn.Conv2d) -> torch.Tensor | None:
    return None if conv.bias is None else _f64(conv.bias)


def _conv(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Conv2d,
          **geometry: int) -> nn.Conv2d:
    """An nn.Conv2d with the float64 ``weight`` (out, in, kh, kw) and ``bias``, ``like``'s
    stride/padding/dilation/padding mode (unless given), dtype, device and mode."""
    ref = like.weight
    args = {"stride": like.stride, "padding": like.padding, "dilation": like.dilation}
    args.update(geometry)
    layer = nn.utils.skip_init(nn.Conv2d, weight.shape[1], weight.shape[0],
                               tuple(weight.shape[2:]), bias=bias is not None,
                               padding_mode=like.padding_mode, device=ref.device,
                               dtype=ref.dtype, **args)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.train(like.training)
