"""Model surgery: apply one site's :class:`Reduction` to a model, in place.

``reduce_site(model, Reduction(...))`` asks the model's adapter (:mod:`rmtkd.adapters`) what
the site is: in a transformer, a coupled dimension of a block (the MLP inner width, the
value width per key-value head; :mod:`rmtkd.reduce.transformer`); in a plain network, a
Linear / Conv2d producer -> consumer chain (:mod:`rmtkd.reduce.mlp`, :mod:`rmtkd.reduce.cnn`).
Project mode replaces the consumer by an exact rank-k projection of its input anywhere.
The replacements are installed only when they have fewer parameters than the modules they
replace (else the result says why it skipped). The shared maths is in
:mod:`rmtkd.reduce.maths`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..adapters import StreamSpec, TransformerAdapter, adapter_for
from ..hf.modeling_rmtkd import RESIDUAL_KEY
from .cnn import project_conv, width_conv
from .heads import HeadPaddedLinear, HeadSelectLinear, block_diagonal_basis, head_bases
from .maths import (SUPPORTED, Reduction, ReductionResult, UnsupportedModuleError,
                    check_orthonormal, n_params, set_module)
from .mlp import project_linear, width_linear
from .stream import config_owner, stream_record, stream_replacements, stream_units
from .transformer import (apply_widths, block_sites, cut_mlp, cut_values, dim_replacements,
                          dim_site, project_block_linear, record_widths)

__all__ = ["Reduction", "ReductionResult", "UnsupportedModuleError", "SUPPORTED",
           "reduce_site", "plan_replacements", "HeadPaddedLinear", "HeadSelectLinear",
           "head_reduction", "head_bases", "record_widths", "apply_widths", "cut_mlp",
           "cut_values", "project_block_linear", "block_sites", "dim_site", "n_params",
           "stream_units"]


def head_reduction(site: str, module_name: str, covariance: torch.Tensor, num_heads: int,
                   k: int | Sequence[int], *, mean: torch.Tensor | None = None,
                   mode: str = "width") -> Reduction:
    """A :class:`Reduction` of a value site whose basis is block-diagonal: per head h the
    top ``k_h`` eigenvectors of the head's diagonal block of the d x d site ``covariance``.
    ``k`` is one k for every head or a list of k_h (k_h = 0 drops the head's values)."""
    d = covariance.shape[0]
    ks = [int(k)] * num_heads if isinstance(k, int) else [int(x) for x in k]
    if d % num_heads or len(ks) != num_heads or sum(ks) < 1:
        raise ValueError(f"k must be in [0, {d // max(num_heads, 1)}] per head (one int or "
                         f"{num_heads} ints, not all 0); got {k}")
    basis = block_diagonal_basis(covariance, num_heads, ks)
    return Reduction(site, module_name, mode, d, basis.shape[1], basis,
                     None if mean is None else mean.detach().to(torch.float64).cpu())


def plan_replacements(model: nn.Module, reduction: Reduction) -> dict[str, nn.Module]:
    """The new modules, by name, that apply ``reduction`` (the model is not changed).

    Raises:
        UnsupportedModuleError: the site is not a reducible dimension of this model.
        ValueError: the reduction does not match the site (d) or its basis is not
            orthonormal.
    """
    return _plan(model, reduction)[0]


def _plan(model: nn.Module, reduction: Reduction
          ) -> tuple[dict[str, nn.Module], StreamSpec | None]:
    """:func:`plan_replacements`, and the residual stream it cuts (None for other sites)."""
    ad = adapter_for(model)
    name = reduction.module_name
    if isinstance(ad, TransformerAdapter):
        dim = ad.dim_for(model, reduction.site, name)
        if dim is not None and dim.kind in ("embedding_rank", "head_width"):   # any mode
            return dim_replacements(model, dim, reduction), None
        if dim is not None and dim.kind == "residual_width":   # unit selection in any mode
            stream = ad.stream(model)
            return stream_replacements(model, stream, reduction), stream
        if reduction.mode == "width":
            if dim is None:
                sites = [d.site_name for d in ad.coupled_dims(model)]
                raise UnsupportedModuleError(
                    f"cannot cut {reduction.site!r} in width mode: in this {ad.layout.family} "
                    f"model the reducible dimensions are the token-embedding rank and each "
                    f"block's head width (where the family takes one), value width and MLP "
                    f"inner width (sites {', '.join(sites[:5])}, ...); query, key, pooler and "
                    f"head are left alone")
            return dim_replacements(model, dim, reduction), None
        if dim is None or dim.where != "input":
            sites = [d.site_name for d in ad.coupled_dims(model) if d.where == "input"]
            raise UnsupportedModuleError(
                f"cannot project {reduction.site!r}: in this {ad.layout.family} model project "
                f"mode reduces the inputs of the reducible sites ({', '.join(sites[:2])}, "
                f"...); embeddings, query, key, value, pooler and head are left alone")
    consumer = model.get_submodule(name)
    if not isinstance(consumer, (nn.Linear, nn.Conv2d)):
        raise UnsupportedModuleError(
            f"cannot reduce the input of {name!r}: it is a {type(consumer).__name__}. "
            f"Supported: {SUPPORTED}")
    d = consumer.in_features if isinstance(consumer, nn.Linear) else consumer.in_channels
    if d != reduction.d:
        raise ValueError(f"Reduction {reduction.site!r}: {name!r} has {d} input features but "
                         f"the reduction has d={reduction.d}")
    check_orthonormal(reduction)
    if reduction.mode == "project":
        new = (project_linear(consumer, reduction) if isinstance(consumer, nn.Linear)
               else project_conv(consumer, reduction))
        return {name: new}, None
    if isinstance(consumer, nn.Linear):
        return width_linear(model, reduction), None
    return width_conv(model, reduction), None


def reduce_site(model: nn.Module, reduction: Reduction, *, force: bool = False
                ) -> ReductionResult:
    """Apply ``reduction`` to ``model`` in place, unless it would not reduce parameters.

    Args:
        model: the model holding the site (a whole model or a bare block).
        reduction: the site's mode, k, basis (d x k) and mean (d,).
        force: apply even when the parameter count does not drop (e.g. k = d, for checks).

    Returns:
        A :class:`ReductionResult` with the whole model's parameter counts; when skipped,
        ``applied`` is False, ``reason`` says why and the model is untouched.
    """
    new, stream = _plan(model, reduction)
    old_local = sum(n_params(model.get_submodule(n)) for n in new)
    new_local = sum(n_params(m) for m in new.values())
    before = n_params(model)
    if new_local >= old_local and not force:
        reason = (f"skipped: {reduction.mode} mode at k={reduction.k} of d={reduction.d} "
                  f"would not reduce parameters ({old_local} -> {new_local} in "
                  f"{', '.join(new)})")
        return ReductionResult(reduction, False, reason, before, before)
    for n, m in new.items():
        set_module(model, n, m)
    owner = None if stream is None else config_owner(model)
    if owner is not None:   # recorded for save / load (names relative to the config's model)
        setattr(owner[1].config, RESIDUAL_KEY, stream_record(stream, reduction, owner[0]))
    record_widths(model)  # per-block widths on model.config (transformers only)
    reason = (f"{reduction.mode} d={reduction.d} -> k={reduction.k}: replaced "
              f"{', '.join(new)} ({old_local} -> {new_local} parameters)")
    return ReductionResult(reduction, True, reason, before, n_params(model))
