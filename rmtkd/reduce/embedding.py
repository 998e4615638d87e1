"""Token-embedding rank: factorise a (V x d) embedding table through its top-k directions.

The site is the table's output over the calibration tokens (padding masked), so its
covariance weighs each token by how often the data uses it; its sample count is the number
of distinct tokens seen (:func:`rmtkd.capture.stream.distinct_inputs`). With U (d x k) the
top eigenvectors and m the mean, every row e of the table becomes
``m + U U^T (e - m)``, stored as :class:`FactorizedEmbedding`: a (V x k) table
``(E - m) U`` and a Linear (k -> d) with weight U and bias m. Exact at k = d; parameters
``V d -> V k + k d + d``. A table that is already factorised is made dense and factorised
again (the composition is one rank-k table). Tied tables (a decoder's lm_head) are not
offered by the adapters.
"""
from __future__ import annotations

import torch
from torch import nn

from ..hf.modeling_rmtkd import FactorizedEmbedding
from .maths import Reduction, UnsupportedModuleError, check_orthonormal


@torch.no_grad()
def dense_table(module: nn.Module) -> torch.Tensor:
    """The (V x d) table an embedding module computes, float64."""
    if isinstance(module, FactorizedEmbedding):
        A = module.embed.weight.detach().double()
        return A @ module.proj.weight.detach().double().T + module.proj.bias.detach().double()
    if isinstance(module, nn.Embedding):
        return module.weight.detach().double()
    raise UnsupportedModuleError(f"cannot factorise a {type(module).__name__}: the token "
                                 f"embedding must be an nn.Embedding")


@torch.no_grad()
def factorize_embedding(module: nn.Module, reduction: Reduction) -> FactorizedEmbedding:
    """The :class:`FactorizedEmbedding` of rank ``reduction.k`` that maps every row e of
    ``module``'s table to ``mean + U U^T (e - mean)`` (U = ``reduction.basis``)."""
    E = dense_table(module)
    d = E.shape[1]
    if reduction.d != d:
        raise ValueError(f"Reduction {reduction.site!r}: the embedding has {d} features but "
                         f"the reduction has d={reduction.d}")
    check_orthonormal(reduction)
    U = reduction.basis.detach().double().cpu()
    m = (torch.zeros(d, dtype=torch.float64) if reduction.mean is None
         else reduction.mean.detach().double().cpu())
    ref = module.proj.weight if isinstance(module, FactorizedEmbedding) else module.weight
    new = FactorizedEmbedding(E.shape[0], d, reduction.k, getattr(module, "padding_idx", None),
                              device=ref.device, dtype=ref.dtype)
    new.embed.weight.copy_((E.cpu() - m) @ U)
    new.proj.weight.copy_(U)
    new.proj.bias.copy_(m)
    return new.train(module.training)
