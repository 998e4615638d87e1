"""Residual-stream (hidden-size) cut of pre-norm RMSNorm decoders (the Llama family).

The rotation argument of SliceGPT (Ashkboos et al., arXiv 2401.15024), written from the
paper: an RMSNorm is ``x / rms(x) * g``. Fold ``g`` into the Linears that read the norm's
output and the norm is ``x / rms(x)``, which commutes with any orthogonal Q:
``(xQ) / rms(xQ) = (x / rms(x)) Q``. So the residual stream can be carried in the basis Q
(the embedding ``E -> E Q``, every reader ``W -> W Q``, every writer ``W -> Q^T W``, in
nn.Linear's (out, in) layout) with unchanged logits, and keeping the first k columns Q_k
(the top eigenvectors of the stream's second moment) slices it to k dims.

A k-wide RMSNorm averages over k, not d: with ``eps' = eps d / k`` and weight ``sqrt(d/k)``
it equals the d-wide norm of the sliced vector, so the cut model is a stock decoder with
``hidden_size = k`` (``head_dim`` kept) and the same weights' shapes otherwise. The final
norm: an untied head becomes ``W diag(g) Q_k``; a head tied to the embedding must stay
``E Q_k``, so the norm carries a (k x k) mix ``Q_k^T diag(g) Q_k`` after it
(:class:`~rmtkd.hf.modeling_rmtkd.MixedRMSNorm`, ``config.rmtkd_residual``).

Exact at k = d (up to rounding); below, the model equals the original with the residual
stream projected onto span(Q_k) after the embedding and after every block's attention and
MLP (and, tied, before the head), with every norm's mean square taken over d.
One basis serves every block, so no change of basis is carried between blocks and the model
stays loadable by transformers' own class (except the tied mix, a remote-code module).
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from ..adapters.base import UnsupportedArchitectureError
from ..adapters.transformer import Layout
from ..hf.modeling_rmtkd import RESIDUAL_KEY, MixedRMSNorm

#: the residual width is cut to a multiple of this (matrix shapes that run fast) and of
#: the number of query heads (transformers' configs require hidden_size % heads == 0)
ROUND = 8


def check_layout(layout: Layout) -> None:
    """Raise UnsupportedArchitectureError unless the blocks are pre-norm RMSNorm (the
    rotation does not commute with LayerNorm's mean or a post-norm's per-unit scale)."""
    bad = [n.name for n in layout.norms if n.kind != "rmsnorm" or n.placement != "pre"]
    if bad or len(layout.norms) != 2:
        raise UnsupportedArchitectureError(
            f"the residual-stream cut needs two pre-norm RMSNorms per block (attention, "
            f"MLP); the {layout.family} layout has {[(n.name, n.kind, n.placement) for n in layout.norms]}")


def readers(layout: Layout) -> dict[str, tuple[str, ...]]:
    """``{norm: the Linears that read its output}`` of one block."""
    check_layout(layout)
    attn, mlp = layout.norms
    return {attn.name: (layout.q, layout.k, layout.v), mlp.name: tuple(layout.mlp_producers)}


def writers(layout: Layout) -> tuple[str, str]:
    """The Linears of one block that write the residual stream."""
    return layout.o, layout.mlp_consumer


def second_moment(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(sum over tokens of u u^T, tokens)`` of the RMS-normalised rows ``u = x / rms(x)``
    of ``x`` [..., d] (float64): what the blocks read, each token weighted alike, so the
    few tokens with massive activations do not dominate the basis."""
    u = x.reshape(-1, x.shape[-1]).double()
    u = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True).clamp_min(1e-30))
    return u.T @ u, u.shape[0]


def basis_of(moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eigenvalues descending, eigenvectors as columns)`` of a symmetric matrix."""
    vals, vecs = torch.linalg.eigh(moment.double())
    return vals.flip(0), vecs.flip(1)


def quantum(config: Any) -> int:
    """The step of the residual width: lcm(:data:`ROUND`, query heads)."""
    return math.lcm(ROUND, int(config.num_attention_heads))


def round_k(k: int, d: int, step: int = ROUND) -> int:
    """k rounded up to a multiple of ``step``, at least ``step``, at most d."""
    return min(d, max(step, math.ceil(k / step) * step))


@torch.no_grad()
def rotate_layer_state(state: dict[str, torch.Tensor], layout: Layout, basis: torch.Tensor,
                       d: int) -> dict[str, torch.Tensor]:
    """One block's state dict (names relative to the block) with its norms folded into
    their readers and the residual stream in ``basis`` (d x k): readers ``W diag(g) Q``,
    writers ``Q^T W`` (and bias), norms ``sqrt(d/k)``. Computed in float64, stored in
    each tensor's dtype."""
    q = basis.double()
    k = q.shape[1]
    out = dict(state)
    for norm, reads in readers(layout).items():
        g = state[f"{norm}.weight"]
        for r in reads:
            w = state[f"{r}.weight"]
            out[f"{r}.weight"] = ((w.double() * g.double()) @ q).to(w.dtype)
        out[f"{norm}.weight"] = torch.full((k,), math.sqrt(d / k), dtype=g.dtype)
    for wr in writers(layout):
        w = state[f"{wr}.weight"]
        out[f"{wr}.weight"] = (q.T @ w.double()).to(w.dtype)
        if f"{wr}.bias" in state:
            b = state[f"{wr}.bias"]
            out[f"{wr}.bias"] = (b.double() @ q).to(b.dtype)
    return out


@torch.no_grad()
def rotate_embedding(table: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """The token-embedding table (V x d) in ``basis``: (V x k)."""
    return (table.double() @ basis.double()).to(table.dtype)


@torch.no_grad()
def rotate_head(norm_weight: torch.Tensor, head: torch.Tensor | None, basis: torch.Tensor,
                d: int) -> dict[str, torch.Tensor]:
    """The final norm and head in ``basis``: ``{"norm": sqrt(d/k) (k,), "head": W diag(g)
    Q}`` for an untied head (V x d), or ``{"norm", "mix": Q^T diag(g) Q}`` for a head tied
    to the embedding (``head`` None: it is the rotated embedding)."""
    q, g = basis.double(), norm_weight.double()
    k = q.shape[1]
    out = {"norm": torch.full((k,), math.sqrt(d / k), dtype=norm_weight.dtype)}
    if head is None:
        out["mix"] = ((q.T * g) @ q).to(norm_weight.dtype)
    else:
        out["head"] = ((head.double() * g) @ q).to(head.dtype)
    return out


def sliced_config(config: Any, k: int) -> Any:
    """A copy of a decoder config with ``hidden_size = k`` (``head_dim`` kept, the norms'
    epsilon scaled by d / k; see the module docstring)."""
    c = copy.deepcopy(config)
    d = int(config.hidden_size)
    c.head_dim = int(getattr(config, "head_dim", None) or d // config.num_attention_heads)
    c.hidden_size = int(k)
    c.rms_norm_eps = float(config.rms_norm_eps) * d / k
    return c


def residual_record(d: int, k: int, tied: bool) -> dict:
    """``config.rmtkd_residual`` of a cut model."""
    return {"hidden_size": int(d), "rank": int(k), "final_norm_mix": bool(tied)}


@torch.no_grad()
def cut_residual(model: nn.Module, basis: torch.Tensor) -> nn.Module:
    """A new causal LM of ``model``'s class (the Llama family, in memory) with its residual
    stream rotated into ``basis`` (d x k, orthonormal columns) and sliced to k."""
    from ..adapters import adapter_for

    ad = adapter_for(model)
    layout = ad.layout
    check_layout(layout)
    config = model.config
    d, k = int(config.hidden_size), int(basis.shape[1])
    tied = ad.tied_embedding(model)
    emb_path, norm_path = ad.token_embedding(model), ad.final_norm(model)
    head_path = ad.structure(model).head
    if emb_path is None or norm_path is None or head_path is None:
        raise UnsupportedArchitectureError(
            f"the residual-stream cut needs the token embedding, final norm and head of "
            f"{type(model).__name__}; the adapter found {emb_path}, {norm_path}, {head_path}")
    new_cfg = sliced_config(config, k)
    setattr(new_cfg, RESIDUAL_KEY, residual_record(d, k, tied))
    ref = next(model.parameters())
    new = type(model)(new_cfg)   # built for real: its rotary buffers are computed
    if tied:
        new.set_submodule(norm_path, MixedRMSNorm(k, new_cfg.rms_norm_eps))
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, _ in ad.block_modules(model):
        pre = name + "."
        block = {n[len(pre):]: t for n, t in state.items() if n.startswith(pre)}
        out.update({pre + n: t for n, t in rotate_layer_state(block, layout, basis, d).items()})
    out[f"{emb_path}.weight"] = rotate_embedding(state[f"{emb_path}.weight"], basis)
    head = rotate_head(state[f"{norm_path}.weight"],
                       None if tied else state[f"{head_path}.weight"], basis, d)
    out[f"{norm_path}.weight"] = head["norm"]
    if tied:
        out[f"{norm_path}.mix"] = head["mix"]
        out[f"{head_path}.weight"] = out[f"{emb_path}.weight"]
    else:
        out[f"{head_path}.weight"] = head["head"]
    new.load_state_dict(out, strict=True)
    if tied:
        new.tie_weights()
    return new.to(device=ref.device, dtype=ref.dtype).train(model.training)
