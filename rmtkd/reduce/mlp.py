"""Surgery on nn.Linear consumers: ``project`` (-> ProjectedLinear) and ``width`` (MLPs).

Width mode, producer ``h = W1 x + b1`` (d outputs) -> elementwise ops -> consumer
``y = W2 a + b2`` (site ``a``, d inputs), with the maps P, R, c of
:func:`rmtkd.reduce.maths.width_maps`: ``W1' = P W1, b1' = P b1`` (k outputs) and
``W2' = W2 R, b2' = b2 + W2 c``.

* rotate (P = U^T, R = U, c = (I - U U^T) mean): exact when nothing nonlinear sits between
  (e.g. Dropout in eval) and ``a`` lies in ``mean + span(U)``.
* select (through an elementwise nonlinearity): the k kept units pass through it
  unchanged; the error is that of predicting the other units linearly from them, which
  self-distillation then recovers.
"""
from __future__ import annotations

import torch
from torch import nn

from ..nn import ProjectedLinear
from .maths import (ELEMENTWISE, FEATURE_NORMS, PASSTHROUGH, SUPPORTED, Reduction,
                   UnsupportedModuleError, modules_before, residual_mean, width_maps)


def project_linear(linear: nn.Linear, reduction: Reduction) -> ProjectedLinear:
    """``x -> linear(mean + U U^T (x - mean))`` as a ProjectedLinear of rank k.

    ``V = U`` (d x k), ``W = W U`` (out x k), ``bias = b + W r``; a bias is added when the
    layer had none and a mean is given.
    """
    layer = ProjectedLinear.from_linear(linear, reduction.basis)
    r = residual_mean(reduction)
    if r is not None:
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros_like(layer.W[:, 0]))
        with torch.no_grad():
            layer.bias.add_((_f64(linear.weight) @ r).to(layer.bias))
    return layer.train(linear.training)


def width_linear(model: nn.Module, reduction: Reduction) -> dict[str, nn.Module]:
    """Replacements ``{producer name: Linear(d_in -> k), consumer name: Linear(k -> out)}``.

    Raises:
        UnsupportedModuleError: no producer nn.Linear found before the consumer, or a module
            between them that is not elementwise (e.g. LayerNorm: use mode="project").
    """
    name = reduction.module_name
    consumer = model.get_submodule(name)
    prod_name, producer, nonlinear = find_linear_producer(model, name)
    if producer.out_features != reduction.d:
        raise UnsupportedModuleError(
            f"width reduction of {name!r}: producer {prod_name!r} has {producer.out_features} "
            f"outputs but the site has d={reduction.d} features")
    P, R, c, _ = width_maps(reduction, nonlinear)
    w1, w2 = _f64(producer.weight), _f64(consumer.weight)
    new_prod = _linear(P @ w1, None if producer.bias is None else P @ _f64(producer.bias),
                       producer)
    b2 = None if consumer.bias is None else _f64(consumer.bias)
    if c is not None:
        b2 = w2 @ c if b2 is None else b2 + w2 @ c
    return {prod_name: new_prod, name: _linear(w2 @ R, b2, consumer)}


def find_linear_producer(model: nn.Module, name: str) -> tuple[str, nn.Linear, bool]:
    """The nn.Linear whose output (through elementwise modules only) is ``name``'s input:
    ``(name, module, whether an elementwise nonlinearity sits between)``."""
    before, ordered = modules_before(model, name)
    between: list[nn.Module] = []
    for prev_name, prev in before:
        if isinstance(prev, nn.Linear):
            if not ordered and not any(isinstance(m, ELEMENTWISE) for m in between):
                break  # e.g. query/key/value side by side: not a chain
            return prev_name, prev, any(isinstance(m, ELEMENTWISE) for m in between)
        if isinstance(prev, FEATURE_NORMS):
            raise UnsupportedModuleError(
                f"width reduction of {name!r}: {prev_name!r} ({type(prev).__name__}) between "
                f"producer and consumer normalises over all features, so the producer "
                f"cannot be cut; use mode='project' for this site")
        if not isinstance(prev, ELEMENTWISE + PASSTHROUGH):
            raise UnsupportedModuleError(
                f"width reduction of {name!r}: {prev_name!r} ({type(prev).__name__}) sits "
                f"between it and the previous nn.Linear. Supported: {SUPPORTED}")
        between.append(prev)
    raise UnsupportedModuleError(
        f"width reduction of {name!r}: no producer nn.Linear found feeding it (searched its "
        f"nn.Sequential or its parent's modules). Supported: {SUPPORTED}; or use "
        f"mode='project'")


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    """An nn.Linear with the given float64 (out, in) weight and bias, in ``like``'s dtype,
    device and training mode."""
    ref = like.weight
    layer = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0],
                               bias=bias is not None, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.train(like.training)
