"""Surgery on BERT encoder layers (Hugging Face ``BertModel`` and models reusing its layer).

The layer is recognised by its structure, not its class (so ``transformers`` is never
imported here): a module with children ``attention`` (``.self`` holding ``query``, ``key``,
``value``, ``num_attention_heads``, ``attention_head_size``; ``.output.dense``),
``intermediate`` (``.dense``) and ``output`` (``.dense``, ``.LayerNorm``). This covers
BertModel, BertForSequenceClassification, sentence-transformers' all-MiniLM-L6-v2 and the
BERT copies (RoBERTa, ELECTRA, ...). Two sites per layer ``P`` are supported:

1. Feed-forward inner width, site = input of ``P.output.dense`` (after intermediate.dense
   and its GELU), d = current intermediate width.

   * ``width``: ``P.intermediate.dense`` gets k outputs and ``P.output.dense`` k inputs,
     with the maps of :func:`rmtkd.reduce.plan.width_maps`: through the GELU a reduction
     carrying units keeps k of the intermediate units (``W1[S]``, ``b1[S]``; consumer
     ``W2 R``, ``b2 + W2 (mean - R mean_S)``), else it rotates (``U^T W1``, ``U^T b1``;
     ``W2 U``, ``b2 + W2 (I - U U^T) mean``). Both approximate what the GELU does to the
     dropped directions, which self-distillation recovers; with k = d both are exact. BertIntermediate and BertOutput just call the Linear, so the
     HF module runs unchanged.
   * ``project``: ``P.output.dense`` -> :class:`rmtkd.nn.ProjectedLinear` (the generic
     Linear path), an exact rank-k projection of the site.

2. Attention value/output, site = input of ``P.attention.output.dense``: the context vectors
   (d = hidden, heads concatenated, head h in block ``h*hd:(h+1)*hd``). Each head's context
   is ``A_h (X W_v,h^T + b_v,h)`` with attention rows summing to 1, linear in the value, so
   projecting the value per head projects the context exactly.

   * ``width``: per head h an orthonormal ``U_h`` (hd x k_h) is kept. ``value`` becomes a
     :class:`HeadPaddedLinear` (an ``nn.Linear(hidden -> sum k_h)`` with rows ``U_h^T W_v,h``
     and bias ``U_h^T b_v,h``, whose outputs are zero-padded back to ``hd`` per head), and
     ``attention.output.dense`` a :class:`HeadSelectLinear` (drops the padded zeros, then
     ``nn.Linear(sum k_h -> hidden)`` with columns ``W_o,h U_h`` and bias
     ``b_o + W_o r``, r = the mean's part outside the kept subspace). The zero padding is
     needed because BertSelfAttention views q, k and v alike as ``(..., heads,
     attention_head_size)`` (transformers 4.x ``transpose_for_scores`` and 5.x
     ``view(*input_shape, -1, attention_head_size)``), so a narrower value tensor does not
     fit its code; the padding keeps every HF tensor shape, so any attention backend (eager,
     sdpa) and any transformers version works, and heads may keep different k_h (k_h = 0
     too). Parameters and the value/output matmuls shrink to sum k_h; the attention-weighted
     sum still runs over the padded head_dim (a minor FLOP share). Exact: with full per-head
     bases the output is identical; with k_h < hd it equals the model whose context vectors
     are replaced by ``mean + P (ctx - mean)``, P the block-diagonal projection.

     The per-head bases come from the Reduction's basis: head h keeps an orthonormal basis of
     ``U[h-block, :]`` (its column space). For a block-structured basis (each column inside
     one head's block, as :func:`head_reduction` builds from the per-head covariance blocks)
     that is exactly the given subspace; for a general basis it is the smallest per-head
     subspace containing span(U), which can have more than k directions in all.
   * ``project``: ``attention.output.dense`` -> ProjectedLinear (generic path): the exact
     rank-k projection of the context onto span(U).

Everything else inside a BERT model (embeddings, query, key, value, intermediate.dense as a
consumer, pooler, classifier, cross-attention) is left alone: asking for it raises
:class:`UnsupportedModuleError` naming the supported sites.

Width bookkeeping: after a reduction :func:`record_bert_widths` writes the real per-layer
shapes on ``model.config`` (``config.intermediate_size`` is no longer the truth):

* ``rmtkd_intermediate_sizes``: list, per layer, of the feed-forward inner width;
* ``rmtkd_value_head_dims``: list, per layer, of None (untouched) or the kept k_h per head;
* ``rmtkd_projected_ranks``: list, per layer, of ``{relative name: rank}`` for consumers
  replaced by ProjectedLinear (``"output.dense"``, ``"attention.output.dense"``).

They are plain JSON in ``config.to_dict()``, so ``save_pretrained``'s config.json keeps them;
:func:`apply_bert_widths` rebuilds a freshly constructed model (from that config) to those
shapes so that the saved state dict loads into it with ``strict=True``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..nn import ProjectedLinear
from .plan import Reduction, UnsupportedModuleError, width_maps

BERT_SUPPORTED = (
    "BERT encoder layers (Hugging Face BertLayer structure): the feed-forward inner width, "
    "site '<layer>.output.dense' (mode 'width': intermediate.dense and output.dense cut to k; "
    "mode 'project': output.dense -> ProjectedLinear), and the attention value/output per "
    "head, site '<layer>.attention.output.dense' (mode 'width': value and "
    "attention.output.dense cut to the kept per-head directions; mode 'project': "
    "attention.output.dense -> ProjectedLinear). Embeddings, query, key, pooler, classifier "
    "and cross-attention are left alone")

FFN, ATTENTION = "ffn", "attention"


# ----------------------------------------------------------------------------- modules

def _head_dims(head_dims: Sequence[int], head_size: int) -> tuple[list[int], int]:
    """Validated per-head kept dimensions (each in [0, head_size]) and the head size."""
    dims, size = [int(k) for k in head_dims], int(head_size)
    if any(not 0 <= k <= size for k in dims):
        raise ValueError(f"head_dims must be in [0, {size}]; got {dims}")
    return dims, size


class HeadPaddedLinear(nn.Module):
    """``nn.Linear(in_features -> sum(head_dims))`` whose outputs are zero-padded per head to
    ``head_size`` (out: ``len(head_dims) * head_size``): head h's kept values sit in the
    first ``head_dims[h]`` entries of its block."""

    def __init__(self, in_features: int, head_dims: Sequence[int], head_size: int,
                 bias: bool = True, *, device=None, dtype=None) -> None:
        super().__init__()
        self.head_dims, self.head_size = _head_dims(head_dims, head_size)
        self.in_features = int(in_features)
        self.out_features = len(self.head_dims) * self.head_size
        self.linear = nn.Linear(in_features, sum(self.head_dims), bias=bias, device=device,
                                dtype=dtype)
        self.register_buffer("index", _kept_index(self.head_dims, self.head_size),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        out = y.new_zeros(*y.shape[:-1], self.out_features)
        return out.index_copy(-1, self.index, y)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, head_dims={self.head_dims}, " \
               f"head_size={self.head_size}"


class HeadSelectLinear(nn.Module):
    """Keeps the first ``head_dims[h]`` entries of each head's ``head_size`` block of the
    input (``len(head_dims) * head_size`` features), then ``nn.Linear(sum(head_dims) ->
    out_features)``."""

    def __init__(self, head_dims: Sequence[int], head_size: int, out_features: int,
                 bias: bool = True, *, device=None, dtype=None) -> None:
        super().__init__()
        self.head_dims, self.head_size = _head_dims(head_dims, head_size)
        self.in_features = len(self.head_dims) * self.head_size
        self.out_features = int(out_features)
        self.linear = nn.Linear(sum(self.head_dims), out_features, bias=bias, device=device,
                                dtype=dtype)
        self.register_buffer("index", _kept_index(self.head_dims, self.head_size),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.index_select(-1, self.index))

    def extra_repr(self) -> str:
        return f"head_dims={self.head_dims}, head_size={self.head_size}, " \
               f"out_features={self.out_features}"


def _kept_index(head_dims: Sequence[int], head_size: int) -> torch.Tensor:
    return torch.cat([torch.arange(k, dtype=torch.long) + h * head_size
                      for h, k in enumerate(head_dims)] or [torch.zeros(0, dtype=torch.long)])


# ----------------------------------------------------------------------------- detection

def is_bert_layer(module: nn.Module) -> bool:
    """Duck-typed BertLayer: attention.self.{query,key,value}, attention.output.dense,
    intermediate.dense, output.dense and output.LayerNorm."""
    attn = getattr(module, "attention", None)
    sa = getattr(attn, "self", None)
    return (sa is not None and all(hasattr(sa, a) for a in ("query", "key", "value",
                                                              "num_attention_heads",
                                                              "attention_head_size"))
            and hasattr(getattr(attn, "output", None), "dense")
            and hasattr(getattr(module, "intermediate", None), "dense")
            and hasattr(getattr(module, "output", None), "dense")
            and hasattr(getattr(module, "output", None), "LayerNorm"))


def bert_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The BERT layers of ``model`` by name, in registration (= execution) order."""
    return [(n, m) for n, m in model.named_modules() if is_bert_layer(m)]


def bert_site(model: nn.Module, name: str) -> tuple[str, str] | None:
    """``(kind, layer name)`` with kind ``"ffn"`` or ``"attention"`` when ``name`` is a
    supported BERT site; None when ``model`` has no BERT layer.

    Raises:
        UnsupportedModuleError: ``name`` is inside a model with BERT layers but is not a
            supported site.
    """
    for suffix, kind in (("attention.output.dense", ATTENTION), ("output.dense", FFN)):
        if name == suffix or name.endswith("." + suffix):
            layer_name = name[: -len(suffix)].rstrip(".")
            try:
                layer = model.get_submodule(layer_name)
            except AttributeError:
                continue
            if is_bert_layer(layer):
                return kind, layer_name
    layers = bert_layers(model)
    if not layers:
        return None
    try:
        what = type(model.get_submodule(name)).__name__
    except AttributeError:
        what = "missing"
    raise UnsupportedModuleError(
        f"cannot reduce the input of {name!r} ({what}) in this BERT model: it is left alone. "
        f"Supported: {BERT_SUPPORTED} (e.g. {layers[0][0]}.output.dense, "
        f"{layers[0][0]}.attention.output.dense)")


# ----------------------------------------------------------------------------- surgery

def width_bert_ffn(model: nn.Module, reduction: Reduction, layer_name: str
                   ) -> dict[str, nn.Module]:
    """``{layer.intermediate.dense: Linear(hidden -> k), layer.output.dense: Linear(k ->
    hidden)}`` for a width reduction of the feed-forward inner width."""
    layer = model.get_submodule(layer_name)
    prod, cons = layer.intermediate.dense, layer.output.dense
    pre = f"{layer_name}." if layer_name else ""
    for what, m in (("intermediate.dense", prod), ("output.dense", cons)):
        if not isinstance(m, nn.Linear):
            raise UnsupportedModuleError(
                f"width reduction of {reduction.module_name!r}: {pre}{what} is a "
                f"{type(m).__name__}, not an nn.Linear (already reduced in project mode?)")
    if prod.out_features != reduction.d or cons.in_features != reduction.d:
        raise ValueError(f"Reduction {reduction.site!r}: the feed-forward width of "
                         f"{layer_name!r} is {cons.in_features} but the reduction has "
                         f"d={reduction.d}")
    P, R, c, _ = width_maps(reduction, nonlinear=True)   # the GELU sits between
    w1, w2 = _f64(prod.weight), _f64(cons.weight)
    b1 = None if prod.bias is None else P @ _f64(prod.bias)
    b2 = None if cons.bias is None else _f64(cons.bias)
    if c is not None:
        b2 = w2 @ c if b2 is None else b2 + w2 @ c
    return {f"{pre}intermediate.dense": _linear(P @ w1, b1, prod),
            f"{pre}output.dense": _linear(w2 @ R, b2, cons)}


def head_bases(basis: torch.Tensor, num_heads: int, head_size: int, *,
               rtol: float = 1e-6) -> list[torch.Tensor]:
    """Per head h, an orthonormal basis (head_size x k_h, float64) of the column space of
    ``basis[h*head_size:(h+1)*head_size, :]`` (numerical rank with relative tolerance
    ``rtol``). For a block-structured basis, head h keeps exactly its own columns' span."""
    B = _f64(basis)
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


def width_bert_attention(model: nn.Module, reduction: Reduction, layer_name: str
                         ) -> dict[str, nn.Module]:
    """``{layer.attention.self.value: HeadPaddedLinear, layer.attention.output.dense:
    HeadSelectLinear}`` keeping, per head, the subspace :func:`head_bases` finds."""
    attn = model.get_submodule(layer_name).attention
    sa, cons = attn.self, attn.output.dense
    H, hd = int(sa.num_attention_heads), int(sa.attention_head_size)
    pre = f"{layer_name}.attention." if layer_name else "attention."
    if reduction.d != H * hd:
        raise ValueError(f"Reduction {reduction.site!r}: the context of {layer_name!r} has "
                         f"{H} heads x {hd} = {H * hd} features but the reduction has "
                         f"d={reduction.d}")
    wv, bv = _dense_value(sa.value, f"{pre}self.value")
    wo, bo = _dense_out(cons, f"{pre}output.dense")
    bases = head_bases(reduction.basis, H, hd)
    dims = [b.shape[1] for b in bases]
    if sum(dims) == 0:
        raise ValueError(f"Reduction {reduction.site!r}: the basis keeps no direction")
    P_cols = torch.zeros(H * hd, sum(dims), dtype=torch.float64)  # block-diagonal basis
    col = 0
    for h, b in enumerate(bases):
        P_cols[h * hd:(h + 1) * hd, col:col + dims[h]] = b
        col += dims[h]
    ref_v = sa.value.linear if isinstance(sa.value, HeadPaddedLinear) else sa.value
    ref_o = cons.linear if isinstance(cons, HeadSelectLinear) else cons
    value = HeadPaddedLinear(wv.shape[1], dims, hd, bias=bv is not None,
                             device=ref_v.weight.device, dtype=ref_v.weight.dtype)
    out = HeadSelectLinear(dims, hd, wo.shape[0], bias=True,
                           device=ref_o.weight.device, dtype=ref_o.weight.dtype)
    if bo is None:
        bo = torch.zeros(wo.shape[0], dtype=torch.float64)
    if reduction.mean is not None:
        m = _f64(reduction.mean)
        bo = bo + wo @ (m - P_cols @ (P_cols.T @ m))
    with torch.no_grad():
        value.linear.weight.copy_(P_cols.T @ wv)
        if bv is not None:
            value.linear.bias.copy_(P_cols.T @ bv)
        out.linear.weight.copy_(wo @ P_cols)
        out.linear.bias.copy_(bo)
    value.train(ref_v.training)
    out.train(ref_o.training)
    return {f"{pre}self.value": value, f"{pre}output.dense": out}


def head_reduction(site: str, module_name: str, covariance: torch.Tensor, num_heads: int,
                   k: int | Sequence[int], *, mean: torch.Tensor | None = None,
                   mode: str = "width") -> Reduction:
    """A :class:`Reduction` of an attention site whose basis is block-diagonal: per head h
    the top ``k_h`` eigenvectors of the head's (head_size x head_size) diagonal block of the
    d x d site ``covariance``. ``k`` is one k for every head or a list of k_h (k_h = 0 drops
    the head's value)."""
    C = _f64(covariance)
    d = C.shape[0]
    if C.shape != (d, d) or d % num_heads:
        raise ValueError(f"covariance must be d x d with d divisible by num_heads={num_heads};"
                         f" got {tuple(C.shape)}")
    hd = d // num_heads
    ks = [int(k)] * num_heads if isinstance(k, int) else [int(x) for x in k]
    if len(ks) != num_heads or any(not 0 <= x <= hd for x in ks) or sum(ks) < 1:
        raise ValueError(f"k must be in [0, {hd}] per head (one int or {num_heads} ints, "
                         f"not all 0); got {k}")
    cols = []
    for h, kh in enumerate(ks):
        block = C[h * hd:(h + 1) * hd, h * hd:(h + 1) * hd]
        evals, evecs = torch.linalg.eigh((block + block.T) / 2)
        top = evecs[:, torch.argsort(evals, descending=True)[:kh]]
        full = torch.zeros(d, kh, dtype=torch.float64)
        full[h * hd:(h + 1) * hd] = top
        cols.append(full)
    basis = torch.cat(cols, dim=1)
    return Reduction(site, module_name, mode, d, basis.shape[1], basis,
                     None if mean is None else _f64(mean))


# ----------------------------------------------------------------------------- widths

def record_bert_widths(model: nn.Module) -> dict | None:
    """Write the per-layer shapes on ``model.config`` (see the module docstring) and return
    them; None (nothing written) when the model has no BERT layers or no ``config``."""
    layers = bert_layers(model)
    if not layers:
        return None
    sizes, heads, ranks = [], [], []
    for _, layer in layers:
        dense = layer.intermediate.dense
        sizes.append(int(dense.out_features))
        value = layer.attention.self.value
        heads.append(list(value.head_dims) if isinstance(value, HeadPaddedLinear) else None)
        rk = {}
        for rel, m in (("output.dense", layer.output.dense),
                       ("attention.output.dense", layer.attention.output.dense)):
            if isinstance(m, ProjectedLinear):
                rk[rel] = int(m.rank)
        ranks.append(rk)
    widths = {"rmtkd_intermediate_sizes": sizes, "rmtkd_value_head_dims": heads,
              "rmtkd_projected_ranks": ranks}
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in widths.items():
            setattr(config, key, value)
    return widths


def apply_bert_widths(model: nn.Module, widths: dict | None = None) -> nn.Module:
    """Reshape a freshly built model to recorded widths (default: those on ``model.config``)
    so a reduced model's state dict loads into it; weights of replaced modules are left
    uninitialised (load them). Returns ``model``."""
    if widths is None:
        config = getattr(model, "config", None)
        widths = {key: getattr(config, key, None) for key in
                  ("rmtkd_intermediate_sizes", "rmtkd_value_head_dims",
                   "rmtkd_projected_ranks")}
    layers = bert_layers(model)
    sizes = widths.get("rmtkd_intermediate_sizes") or [None] * len(layers)
    heads = widths.get("rmtkd_value_head_dims") or [None] * len(layers)
    ranks = widths.get("rmtkd_projected_ranks") or [{}] * len(layers)
    if not len(sizes) == len(heads) == len(ranks) == len(layers):
        raise ValueError(f"recorded widths cover {len(sizes)} layers; the model has "
                         f"{len(layers)} BERT layers")
    for (_, layer), size, dims, rk in zip(layers, sizes, heads, ranks):
        inter, out = layer.intermediate, layer.output
        if size is not None and size != inter.dense.out_features:
            inter.dense = _empty_linear(inter.dense.in_features, size, inter.dense)
            out.dense = _empty_linear(size, out.dense.out_features, out.dense)
        attn = layer.attention
        if dims is not None:
            sa, hd = attn.self, int(attn.self.attention_head_size)
            v, o = sa.value, attn.output.dense
            sa.value = HeadPaddedLinear(v.in_features, dims, hd, bias=v.bias is not None,
                                        device=v.weight.device, dtype=v.weight.dtype)
            attn.output.dense = HeadSelectLinear(dims, hd, o.out_features, bias=True,
                                                 device=o.weight.device, dtype=o.weight.dtype)
        for rel, rank in (rk or {}).items():
            parent = out if rel == "output.dense" else attn.output
            m = parent.dense
            parent.dense = ProjectedLinear(m.in_features, m.out_features, int(rank),
                                           bias=True, device=m.weight.device,
                                           dtype=m.weight.dtype)
    return model


# ----------------------------------------------------------------------------- helpers

def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    layer = _empty_linear(weight.shape[1], weight.shape[0], like, bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.train(like.training)


def _empty_linear(n_in: int, n_out: int, like: nn.Module, bias: bool | None = None
                  ) -> nn.Linear:
    ref = like.weight
    if bias is None:
        bias = getattr(like, "bias", None) is not None
    return nn.utils.skip_init(nn.Linear, n_in, n_out, bias=bias, device=ref.device,
                              dtype=ref.dtype).train(like.training)


def _dense_value(value: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden_out x hidden_in weight, bias) in float64 of the value map, padded rows zero."""
    if isinstance(value, nn.Linear):
        return _f64(value.weight), None if value.bias is None else _f64(value.bias)
    if isinstance(value, HeadPaddedLinear):
        w = torch.zeros(value.out_features, value.in_features, dtype=torch.float64)
        w[value.index] = _f64(value.linear.weight)
        b = None
        if value.linear.bias is not None:
            b = torch.zeros(value.out_features, dtype=torch.float64)
            b[value.index] = _f64(value.linear.bias)
        return w, b
    raise UnsupportedModuleError(f"width reduction: {name!r} is a {type(value).__name__}; "
                                 f"expected nn.Linear or HeadPaddedLinear")


def _dense_out(dense: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(dense, nn.Linear):
        return _f64(dense.weight), None if dense.bias is None else _f64(dense.bias)
    if isinstance(dense, HeadSelectLinear):
        w = torch.zeros(dense.out_features, dense.in_features, dtype=torch.float64)
        w[:, dense.index] = _f64(dense.linear.weight)
        return w, None if dense.linear.bias is None else _f64(dense.linear.bias)
    raise UnsupportedModuleError(
        f"width reduction: {name!r} is a {type(dense).__name__}, not an nn.Linear or "
        f"HeadSelectLinear (already reduced in project mode?)")
