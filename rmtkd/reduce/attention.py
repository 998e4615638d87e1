"""Head width: every head of a block keeps ``r`` of its ``head_dim`` dims for its queries,
keys and values alike, so the block stays a stock attention of head size ``r`` (q, k, v
and o plain Linears ``heads x r`` wide, the fused attention kernels and ONNX Runtime's
attention fusion still apply; its softmax scale stays the original ``head_dim ** -0.5``).

Site: the attention's input x (q's input, the d_s-wide stream). Its mean and covariance
give every head's statistics exactly, as linear images (:func:`head_statistics`): the
value mean and covariance, the key covariance and the query second moment.

* **Values** (as the value width cut, :mod:`rmtkd.reduce.transformer`): per head the top-r
  eigenvectors ``U_h`` of its value covariance; v keeps ``U_h^T v_h``, o reads ``W_o,h
  U_h``, and the constant ``(I - U_h U_h^T) mean_h`` goes into o's bias (attention rows sum
  to 1), so the block equals the original with values ``mean + P (v - mean)``.
* **Queries and keys**: the scores ``q_h^T k_h`` enter a softmax over keys, which ignores a
  per-query constant, so only the centred keys matter. The rank-r bilinear form closest to
  ``q^T k`` in mean square over the calibration queries and keys, ``q^T A_h B_h^T k``,
  comes from the SVD of ``S = G_q^{1/2} C_k^{1/2}`` (``G_q`` the query second moment,
  ``C_k`` the key covariance; :func:`qk_maps`): ``A = G_q^{+1/2} U_r Sigma_r^{1/2}``, ``B =
  C_k^{+1/2} V_r Sigma_r^{1/2}``. q keeps ``A_h^T q_h``, k keeps ``B_h^T k_h``. At ``r =
  head_dim`` with full-rank statistics ``A B^T = I``: exact.

``r`` is chosen per block by the engine: per head the MP spike count of its value and of
its key spectrum, the largest over heads (one head size for the block), then the budget.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapters import get
from ..adapters.base import BlockSpec
from ..capture import Site
from ..hf.modeling_rmtkd import set_head_size
from .heads import f64, head_bases, top_eigenvectors
from .maths import Reduction, UnsupportedModuleError, n_params, set_module
from .mlp import _linear

__all__ = ["HeadStatistics", "head_statistics", "qk_maps", "head_width_reduction",
           "head_width_replacements", "set_head_size", "cut_head_width"]


@dataclass
class HeadStatistics:
    """Per-head statistics of a block's attention, derived from its input's. ``mean`` /
    ``cov``: the values' (heads x head_dim; the site statistic the rank rule and the kept
    energy read), ``key_cov`` / ``query_moment``: (heads, head_dim, head_dim) key covariance
    and query second moment ``E[q q^T]``; all float64."""

    mean: torch.Tensor
    cov: torch.Tensor
    key_cov: torch.Tensor
    query_moment: torch.Tensor
    heads: int
    head_dim: int


def _plain(block: nn.Module, spec: BlockSpec) -> tuple[nn.Linear, ...]:
    a = spec.attention
    mods = tuple(get(block, n) for n in (a.q, a.k, a.v, a.o))
    if any(type(m) is not nn.Linear for m in mods) or a.kv_heads != a.heads:
        raise UnsupportedModuleError(
            f"head width cut of {spec.name or 'the block'}: needs plain nn.Linear q, k, v, o "
            f"and as many key-value heads as query heads (got "
            f"{', '.join(type(m).__name__ for m in mods)}, {a.kv_heads}/{a.heads} heads); cut "
            f"the head width before the value width")
    return mods


def head_statistics(block: nn.Module, spec: BlockSpec, mean: torch.Tensor,
                    cov: torch.Tensor) -> HeadStatistics:
    """The per-head statistics of ``block`` from the (d_s,) mean and (d_s, d_s) covariance
    of its attention input."""
    q, k, v, _ = _plain(block, spec)
    H, hd = spec.attention.heads, spec.attention.head_dim
    mu, C = f64(mean).cpu(), f64(cov).cpu()

    def image(lin: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        w = f64(lin.weight).cpu()
        m = w @ mu + (0 if lin.bias is None else f64(lin.bias).cpu())
        return m, w @ C @ w.T

    mv, cv = image(v)
    _, ck = image(k)
    mq, cq = image(q)
    gq = cq + torch.outer(mq, mq)
    blocks = lambda M: torch.stack([M[h * hd:(h + 1) * hd, h * hd:(h + 1) * hd]  # noqa: E731
                                    for h in range(H)])
    return HeadStatistics(mv, cv, blocks(ck), blocks(gq), H, hd)


def _sqrt_pair(M: torch.Tensor, rtol: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """(M^{1/2}, M^{+1/2}) of a symmetric PSD matrix (eigenvalues below ``rtol`` times the
    largest count as 0)."""
    e, V = torch.linalg.eigh(0.5 * (M + M.T))
    keep = e > rtol * max(float(e.max()), 1e-300)
    s = torch.where(keep, e.clamp_min(0).sqrt(), torch.zeros_like(e))
    inv = torch.where(keep, 1.0 / s.clamp_min(1e-300), torch.zeros_like(e))
    return (V * s) @ V.T, (V * inv) @ V.T


def qk_maps(query_moment: torch.Tensor, key_cov: torch.Tensor, r: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B), each (head_dim, r) float64: the rank-r form ``q^T A B^T k`` closest to ``q^T
    k`` in mean square over queries of second moment ``query_moment`` and centred keys of
    covariance ``key_cov`` (see the module docstring)."""
    gh, gi = _sqrt_pair(f64(query_moment))
    ch, ci = _sqrt_pair(f64(key_cov))
    U, s, Vh = torch.linalg.svd(gh @ ch)
    root = s[:r].sqrt()
    return gi @ U[:, :r] * root, ci @ Vh[:r].T * root


def head_width_reduction(site: Any, stats: HeadStatistics, r: int) -> Reduction:
    """The :class:`Reduction` keeping ``r`` dims per head: ``basis`` the block-diagonal value
    bases (d = heads x head_dim, k = heads x r), ``mean`` the value mean, ``maps`` the
    block-diagonal query and key maps (2, d, k)."""
    H, hd = stats.heads, stats.head_dim
    if not 1 <= int(r) <= hd:
        raise ValueError(f"head width cut: need 1 <= r <= head_dim = {hd}; got r={r}")
    r = int(r)
    cv = f64(stats.cov)
    values = [top_eigenvectors(cv[h * hd:(h + 1) * hd, h * hd:(h + 1) * hd], r)
              for h in range(H)]
    pairs = [qk_maps(stats.query_moment[h], stats.key_cov[h], r) for h in range(H)]
    maps = torch.stack([torch.block_diag(*[p[0] for p in pairs]),
                        torch.block_diag(*[p[1] for p in pairs])])
    return Reduction(site.name, site.module_name, "width", H * hd, H * r,
                     torch.block_diag(*values), f64(stats.mean), maps=maps)


def head_width_replacements(block: nn.Module, spec: BlockSpec, reduction: Reduction,
                            attrs: tuple[str, ...]) -> dict[str, nn.Module]:
    """``{attention: a copy with q, k, v narrowed and the head size attributes ``attrs`` (of
    the block) set, o: nn.Linear}`` (relative names) applying a head width ``reduction``
    (:func:`head_width_reduction`) to ``block``."""
    q, k, v, o = _plain(block, spec)
    a = spec.attention
    H, hd = a.heads, a.head_dim
    if reduction.maps is None:
        raise UnsupportedModuleError(
            f"Reduction {reduction.site!r}: {spec.full(a.q)}'s input is the head width site, "
            f"cut by a head width reduction (rmtkd.reduce.attention.head_width_reduction, "
            f"with its query/key maps); a query or key projection on its own is left alone; "
            f"the value width is read at {spec.full(a.o)}'s input")
    if reduction.d != H * hd or reduction.k % H:
        raise ValueError(f"Reduction {reduction.site!r}: a head width cut of {H} heads x "
                         f"{hd} needs d = {H * hd}, k = heads x r and query/key maps")
    owner = a.q.rpartition(".")[0]
    inside = lambda rel: rel.startswith(owner + ".") and "." not in rel[len(owner) + 1:]  # noqa: E731
    if not (owner and all(inside(rel) for rel in (a.q, a.k, a.v, *attrs))):
        raise UnsupportedModuleError(
            f"head width cut of {spec.name or 'the block'}: q, k, v and the head size "
            f"({', '.join(attrs)}) must be direct members of one attention module")
    r = reduction.k // H
    U = head_bases(reduction.basis, H, hd)   # per head an orthonormal basis of its span
    if any(u.shape[1] != r for u in U):
        raise ValueError(f"Reduction {reduction.site!r}: the value basis must keep {r} "
                         f"orthonormal directions per head")
    P = torch.block_diag(*U)
    # the q/k maps act per head: block-diagonal, head h in its own rows and columns
    outside = 1 - torch.block_diag(*[torch.ones(hd, r, dtype=torch.float64)] * H)
    A, B = (f64(t).cpu() for t in reduction.maps)
    if max(float((M * outside).abs().max()) for M in (A, B)) > 0:
        raise ValueError(f"Reduction {reduction.site!r}: the query/key maps must be "
                         f"block-diagonal, {r} columns per head")

    def rows(lin: nn.Linear, M: torch.Tensor) -> nn.Linear:
        return _linear(M.T @ f64(lin.weight).cpu(),
                       None if lin.bias is None else M.T @ f64(lin.bias).cpu(), lin)

    wo = f64(o.weight).cpu()
    bo = None if o.bias is None else f64(o.bias).cpu()
    if reduction.mean is not None:   # (I - P P^T) mean reaches o unchanged
        m = f64(reduction.mean).cpu()
        bo = wo @ (m - P @ (P.T @ m)) + (0 if bo is None else bo)
    attention = copy.deepcopy(get(block, owner))
    tail = lambda rel: rel[len(owner) + 1:]  # noqa: E731
    for rel, new in ((a.q, rows(q, A)), (a.k, rows(k, B)), (a.v, rows(v, P))):
        setattr(attention, tail(rel), new)
    set_head_size(attention, tuple(tail(x) for x in attrs), H, r)
    return {owner: attention, a.o: _linear(wo @ P, bo, o)}


def cut_head_width(block: nn.Module, mean: torch.Tensor, cov: torch.Tensor, r: int) -> dict:
    """Keep ``r`` dims per head of ``block``'s queries, keys and values, in place, from the
    (d_s,) mean and (d_s, d_s) covariance of its attention input.

    Returns:
        ``{"site", "d", "k", "head_size", "params_before", "params_after"}`` (the block's
        parameters).
    """
    from .transformer import block_of   # (it imports this module)

    ad, spec = block_of(block)
    attrs = ad.head_size_attrs()
    if not attrs:
        raise UnsupportedModuleError(f"head width cut: the {ad.layout.family} attention "
                                     f"does not take another head size")
    a = spec.attention
    stats = head_statistics(block, spec, mean, cov)
    site = Site(f"{a.q}:input", a.q, "heads", a.heads * a.head_dim, "input")
    red = head_width_reduction(site, stats, r)
    before = n_params(block)
    for name, mod in head_width_replacements(block, spec, red, attrs).items():
        set_module(block, name, mod)
    return {"site": site.name, "d": red.d, "k": red.k, "head_size": int(r),
            "params_before": before, "params_after": n_params(block)}
