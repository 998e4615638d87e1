"""Per-head value widths: the padded value / selecting output modules and the per-head
bases.

Stock attention code views q, k and v alike as ``(..., heads, head_dim)``, so a narrower
value tensor does not fit it. :class:`HeadPaddedLinear` computes only the kept value dims
and zero-pads each head back to ``head_size``; :class:`HeadSelectLinear` drops the padded
zeros before the (narrower) output projection. Every framework tensor shape (and a KV
cache) stays as it was, any attention backend works, and heads may keep different widths
(0 too). Parameters and the value/output matmuls shrink to ``sum(head_dims)``.

Opt-in (``rmtkd.hf.modeling_rmtkd.COMPACT_VALUES = True``): where every kept head has the
same width and the attention is a Llama-family one
(:func:`~rmtkd.hf.modeling_rmtkd.supports_compact_values`), the two modules are
``compact``: no padding, and the attention (:func:`compact_attention`) reads value heads
of that width, so the KV cache and the attention itself shrink too.

The two modules (and :func:`kept_index`) are defined in :mod:`rmtkd.hf.modeling_rmtkd`,
re-exported here.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

# The modules live in the self-contained file that a saved Hugging Face model carries
# (loadable by transformers without rmtkd); this is the one implementation.
from ..hf.modeling_rmtkd import (HeadPaddedLinear, HeadSelectLinear, compact_attention,
                                 kept_index, supports_compact_values, uniform_dims)

__all__ = ["HeadPaddedLinear", "HeadSelectLinear", "kept_index", "head_bases", "padded_layout",
           "compact_attention", "supports_compact_values", "uniform_dims",
           "block_diagonal_basis", "dense_value", "dense_out", "top_eigenvectors", "f64"]


def f64(t: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(t).detach().to(device="cpu", dtype=torch.float64)


def top_eigenvectors(C: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k eigenvectors (columns, float64) of the symmetric ``C``."""
    from ..rank_rules import top_eigenvectors as eigh_descending

    return eigh_descending(C)[1][:, :k]


def head_bases(basis: torch.Tensor, num_heads: int, head_size: int, *,
               rtol: float = 1e-6) -> list[torch.Tensor]:
    """Per head h, an orthonormal basis (head_size x k_h, float64) of the column space of
    ``basis[h*head_size:(h+1)*head_size, :]`` (numerical rank with relative tolerance
    ``rtol``). For a block-structured basis, head h keeps exactly its own columns' span."""
    B = f64(basis)
    if B.shape[0] != num_heads * head_size:
        raise ValueError(f"basis has {B.shape[0]} rows; expected heads x head_size = "
                         f"{num_heads} x {head_size}")
    out = []
    scale = max(torch.linalg.matrix_norm(B, ord=2).item(), 1e-300)
    for h in range(num_heads):
        block = B[h * head_size:(h + 1) * head_size]
        u, s, _ = torch.linalg.svd(block, full_matrices=False)
        out.append(u[:, : int((s > rtol * scale).sum())])
    return out


def block_diagonal_basis(covariance: torch.Tensor, num_heads: int, ks: Sequence[int]
                         ) -> torch.Tensor:
    """``(d, sum k_h)`` basis: per head h the top ``k_h`` eigenvectors of the head's
    diagonal block of the d x d ``covariance``, in that head's rows."""
    C = f64(covariance)
    d = C.shape[0]
    if C.shape != (d, d) or d % num_heads:
        raise ValueError(f"covariance must be d x d with d divisible by num_heads={num_heads};"
                         f" got {tuple(C.shape)}")
    hd = d // num_heads
    if len(ks) != num_heads or any(not 0 <= int(x) <= hd for x in ks):
        raise ValueError(f"k must be in [0, {hd}] per head ({num_heads} values); got "
                         f"{list(ks)}")
    cols = []
    for h, kh in enumerate(ks):
        full = torch.zeros(d, int(kh), dtype=torch.float64)
        full[h * hd:(h + 1) * hd] = top_eigenvectors(C[h * hd:(h + 1) * hd,
                                                       h * hd:(h + 1) * hd], int(kh))
        cols.append(full)
    return torch.cat(cols, dim=1)


def padded_layout(value: nn.Module, t: torch.Tensor, *, square: bool = False) -> torch.Tensor:
    """A value site's statistic in the padded layout (kv heads x head_size rows): a compact
    :class:`HeadPaddedLinear` outputs only the kept dims, so its site's mean (d,), basis
    (d, k) or, with ``square``, covariance (d, d) is scattered to the kept positions (zeros
    elsewhere). Any other value module's statistic is returned as it is."""
    if not (isinstance(value, HeadPaddedLinear) and value.compact):
        return t
    idx = value.index.cpu()
    out = t.new_zeros((value.padded_features,) * (2 if square else 1) + t.shape[2 if square
                                                                              else 1:])
    if square:
        out[idx[:, None], idx] = t
    else:
        out[idx] = t
    return out


def dense_value(value: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out x in weight, bias) in float64 of a value map, padded rows zero."""
    from .maths import UnsupportedModuleError

    if type(value) is nn.Linear:
        return f64(value.weight), None if value.bias is None else f64(value.bias)
    if isinstance(value, HeadPaddedLinear):
        w = torch.zeros(value.padded_features, value.in_features, dtype=torch.float64)
        w[value.index.cpu()] = f64(value.linear.weight)
        b = None
        if value.linear.bias is not None:
            b = torch.zeros(value.padded_features, dtype=torch.float64)
            b[value.index.cpu()] = f64(value.linear.bias)
        return w, b
    raise UnsupportedModuleError(f"value width cut: {name!r} is a {type(value).__name__}; "
                                 f"expected nn.Linear or HeadPaddedLinear (already projected?)")


def dense_out(dense: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out x in weight, bias) in float64 of an output map, removed columns zero."""
    from .maths import UnsupportedModuleError

    if type(dense) is nn.Linear:
        return f64(dense.weight), None if dense.bias is None else f64(dense.bias)
    if isinstance(dense, HeadSelectLinear):
        w = torch.zeros(dense.out_features, dense.padded_features, dtype=torch.float64)
        w[:, dense.index.cpu()] = f64(dense.linear.weight)
        return w, None if dense.linear.bias is None else f64(dense.linear.bias)
    raise UnsupportedModuleError(
        f"value width cut: {name!r} is a {type(dense).__name__}, not an nn.Linear or "
        f"HeadSelectLinear (already projected?)")
