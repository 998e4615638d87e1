"""Surgery on transformer blocks, written against the adapters' :class:`BlockSpec`
(:mod:`rmtkd.adapters`): the same code cuts a BERT layer, a Llama, Qwen2 or Mistral decoder
layer, whatever their attribute paths.

1. **MLP inner width** (site: the consumer's input, d = inner width). The producers keep k
   outputs and the consumer k inputs with the maps of :func:`rmtkd.reduce.maths.width_maps`.
   A plain MLP (BERT: ``output.dense(gelu(intermediate.dense(x)))``) may select k units
   (they pass the GELU unchanged; the others are predicted linearly from them) or rotate
   onto the spike directions (approximate through the GELU). A gated MLP
   (``down(act(gate(x)) * up(x))``) only selects: a rotation does not commute with the
   gated product. The consumer gets ``W R`` and the bias ``b + W c`` (added when it had
   none and a mean is given). Exact at k = d; self-distillation recovers the rest.

2. **Value width per key-value head** (site: v's output, or o's input, d = kv heads x
   head_dim). Per kv head g an orthonormal ``U_g`` (head_dim x k_g) is kept: v becomes a
   :class:`HeadPaddedLinear` (rows ``U_g^T W_v,g``), o a :class:`HeadSelectLinear` over the
   query heads (head h of group g = h // (heads / kv_heads) keeps columns ``W_o,h U_g``).
   Attention rows sum to 1 and act per head linearly, so the block equals the original with
   the values replaced by ``mean + P (v - mean)``, P = blockdiag(U_g U_g^T), exactly: the
   constant ``(I - P) mean`` reaches o unchanged and goes into its bias. With compact
   value heads opted in, the engine keeps one width for every kept head of a Llama-family
   block (``rmtkd.engine.step.one_width``) and its attention reads them unpadded
   (``compact`` modules, see :mod:`rmtkd.reduce.heads`).

3. **Project**: any Linear of a block -> :class:`rmtkd.nn.ProjectedLinear`, the exact
   rank-k projection of its input (:func:`rmtkd.reduce.mlp.project_linear`).

4. **Head width** (site: the attention's input; BERT family): one head size r for the
   queries, keys and values of a block, :mod:`rmtkd.reduce.attention`.

Widths: :func:`record_widths` writes per block ``{"mlp": inner width, "value_heads": None
or k_g per kv head, "head_size": the head size, "ranks": {relative name: rank}, "biases": {relative name: has bias}}``
on ``model.config.rmtkd_blocks``; :func:`apply_widths` reshapes a model freshly built from
that config so the reduced state dict loads with ``strict=True``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..adapters import TransformerAdapter, adapter_for, get
from ..adapters.base import BlockSpec, CoupledDim
from ..capture import Site
from ..hf.modeling_rmtkd import EMBEDDING_KEY, RESIDUAL_KEY, FactorizedEmbedding, \
    module_has_bias, reshape, set_attr
from ..nn import ProjectedLinear
from .heads import (HeadPaddedLinear, HeadSelectLinear, compact_attention, dense_out,
                    dense_value, f64, head_bases, padded_layout, supports_compact_values,
                    top_eigenvectors, uniform_dims)
from .maths import (ELEMENTWISE, PASSTHROUGH, Reduction, UnsupportedModuleError,
                    check_orthonormal, n_params, select_units, set_module, width_maps)
from .attention import head_width_replacements
from .embedding import factorize_embedding
from .mlp import _linear, project_linear

WIDTHS_KEY = "rmtkd_blocks"

# transformers.activations classes (all elementwise), matched by name: no import needed.
_HF_ELEMENTWISE = {"AccurateGELUActivation", "ClippedGELUActivation", "FastGELUActivation",
                   "GELUActivation", "GELUTanh", "LaplaceActivation", "LinearActivation",
                   "MishActivation", "NewGELUActivation", "PytorchGELUTanh",
                   "QuickGELUActivation", "ReLUSquaredActivation", "SiLUActivation",
                   "SqrtSoftplusActivation", "XIELUActivation"}


def _is_elementwise(act: Any) -> bool:
    if isinstance(act, ELEMENTWISE + PASSTHROUGH):
        return True
    if isinstance(act, nn.Module):
        return type(act).__name__ in _HF_ELEMENTWISE and \
            type(act).__module__.startswith("transformers.")
    # BERT stores a plain function (ACT2FN may give torch.nn.functional.gelu)
    return callable(act) and getattr(act, "__name__", "") in ("gelu", "relu", "silu", "tanh")


def block_of(block: nn.Module) -> tuple[TransformerAdapter, BlockSpec]:
    """The adapter and spec of a bare block module.

    Raises:
        UnsupportedModuleError: ``block`` is not a block of a known family.
    """
    ad = adapter_for(block, strict=False)
    if not isinstance(ad, TransformerAdapter) or not ad.is_block(block):
        from ..adapters import ADAPTERS

        raise UnsupportedModuleError(
            f"{type(block).__name__} is not a transformer block of a known family; "
            f"supported: {'; '.join(a.describe() for a in ADAPTERS)}")
    return ad, ad.block_spec(block)


# ----------------------------------------------------------------------------- MLP

def mlp_replacements(block: nn.Module, spec: BlockSpec, reduction: Reduction
                     ) -> dict[str, nn.Module]:
    """``{relative name: new module}`` cutting the MLP inner width of ``block`` by
    ``reduction`` (its ``d`` = the current inner width)."""
    m = spec.mlp
    prods = [get(block, p) for p in m.producers]
    cons = get(block, m.consumer)
    for name, mod in zip((*m.producers, m.consumer), (*prods, cons)):
        if type(mod) is not nn.Linear:
            raise UnsupportedModuleError(
                f"MLP width cut: {spec.full(name)} is a {type(mod).__name__}, not an "
                f"nn.Linear (already projected?); project mode is the only further "
                f"reduction there")
    act = get(block, m.act) if m.act else None
    if not _is_elementwise(act):
        raise UnsupportedModuleError(
            f"MLP width cut: {spec.full(m.act or 'act')} is "
            f"{type(act).__name__ if act is not None else 'missing'}, not a known elementwise "
            f"activation (torch.nn activations or transformers.activations classes), so "
            f"keeping units may not commute with it")
    widths = {p.out_features for p in prods} | {cons.in_features}
    if len(widths) != 1:
        raise UnsupportedModuleError(
            f"MLP width cut: producer outputs {[p.out_features for p in prods]} and "
            f"consumer inputs {cons.in_features} of {spec.name or 'the block'} differ")
    if cons.in_features != reduction.d:
        raise ValueError(f"Reduction {reduction.site!r}: the MLP width of "
                         f"{spec.name or 'the block'} is {cons.in_features} but the reduction "
                         f"has d={reduction.d}")
    if m.gated and (reduction.units is None or reduction.surgery == "rotate"):
        raise ValueError(f"MLP width cut of {spec.name or 'the block'}: surgery "
                         f"{reduction.surgery!r} is not supported on a gated MLP: a rotation "
                         f"does not commute with the gated product act(gate) * up; use "
                         f"'select' (or 'auto'), or mode 'project'")
    check_orthonormal(reduction)
    P, R, c, _ = width_maps(reduction, nonlinear=True)
    out = {p_name: _linear(P @ f64(p.weight), None if p.bias is None else P @ f64(p.bias), p)
           for p_name, p in zip(m.producers, prods)}
    b = None if cons.bias is None else f64(cons.bias)
    if c is not None:
        b = f64(cons.weight) @ c + (0 if b is None else b)
    out[m.consumer] = _linear(f64(cons.weight) @ R, b, cons)
    return out


def cut_mlp(block: nn.Module, mean: torch.Tensor | None, cov: torch.Tensor, k: int, *,
            surgery: str = "auto", basis: torch.Tensor | None = None, ridge: float = 1e-6,
            mean_correction: bool = True) -> dict:
    """Cut the MLP inner width of a block to ``k``, in place.

    Args:
        block: a transformer block of a known family.
        mean, cov: (d,) / (d, d) statistics of the consumer's input (None: no mean term).
        k: kept width, ``1 <= k <= d``.
        surgery: "select" / "auto" (keep k units) or "rotate" (plain MLPs only).
        basis: (d, >= k) orthonormal spike basis (its first k columns; default: the top-k
            eigenvectors of ``cov``).
        ridge: relative ridge of the unit reconstruction (:func:`select_units`).
        mean_correction: fold the mean term into the consumer's bias.

    Returns:
        ``{"site", "d", "k", "units", "params_before", "params_after", "how",
        "mean_corrected"}`` (parameters of the block).
    """
    _, spec = block_of(block)
    cons = get(block, spec.mlp.consumer)
    d = getattr(cons, "in_features", None)
    C = f64(cov)
    if d is None or tuple(C.shape) != (d, d):
        raise ValueError(f"cut_mlp: cov must be ({d}, {d}) for an inner width of {d}; got "
                         f"{tuple(C.shape)}")
    if not 1 <= int(k) <= d:
        raise ValueError(f"cut_mlp: need 1 <= k <= {d}; got k={k}")
    k = int(k)
    if surgery == "rotate" and spec.mlp.gated:
        raise ValueError("cut_mlp: surgery 'rotate' is not supported: a rotation does not "
                         "commute with the gated product act(gate) * up; use 'select'")
    U = top_eigenvectors(C, k) if basis is None else f64(basis)
    if U.ndim != 2 or U.shape[0] != d or U.shape[1] < k:
        raise ValueError(f"cut_mlp: basis must be ({d}, >= {k}); got {tuple(U.shape)}")
    U = U[:, :k]
    units = recon = None
    if surgery != "rotate":
        units, recon = select_units(C, U, ridge=ridge)
    m = None if mean is None or not mean_correction else f64(mean)
    site = f"{spec.mlp.consumer}:input"
    red = Reduction(site, spec.mlp.consumer, "width", d, k, U, m, units, recon,
                    "rotate" if surgery == "rotate" else "select")
    before = n_params(block)
    for name, mod in mlp_replacements(block, spec, red).items():
        set_module(block, name, mod)
    _sync_mlp_attrs(block, spec, k)
    return {"site": site, "d": d, "k": k,
            "units": None if units is None else units.tolist(),
            "params_before": before, "params_after": n_params(block),
            "how": "rotate" if units is None else "select", "mean_corrected": m is not None}


def _sync_mlp_attrs(block: nn.Module, spec: BlockSpec, size: int) -> None:
    """Set the block's attributes that hold its MLP width (the adapter names them)."""
    ad, _ = block_of(block)
    for attr in ad.mlp_width_attrs(block):
        set_attr(block, attr, int(size))


# ----------------------------------------------------------------------------- values

def reads_compact_values(block: nn.Module, spec: BlockSpec) -> bool:
    """Whether ``block``'s attention reads value heads of one kept width unpadded
    (:func:`~rmtkd.hf.modeling_rmtkd.supports_compact_values`): its value cut then keeps
    one width for every kept head."""
    return supports_compact_values(get(block, spec.attention.v.rpartition(".")[0]))


def value_replacements(block: nn.Module, spec: BlockSpec, bases: Sequence[torch.Tensor],
                       mean: torch.Tensor | None) -> dict[str, nn.Module]:
    """``{v: HeadPaddedLinear, o: HeadSelectLinear}`` keeping ``bases[g]`` (head_dim x k_g,
    orthonormal, float64) per key-value head g of ``block`` (see the module docstring)."""
    ad = adapter_for(block, strict=False)
    a = spec.attention
    if isinstance(ad, TransformerAdapter) and ad.value_norm(block):
        raise UnsupportedModuleError(
            f"value width cut of {spec.name or 'the block'}: it normalises the values after "
            f"the value projection ({ad.layout.value_norm}), so a projection of the values "
            f"does not commute with it")
    H, Hkv, hd, rep = a.heads, a.kv_heads, a.head_dim, a.group
    ks = [int(b.shape[1]) for b in bases]
    if len(bases) != Hkv or any(tuple(b.shape) != (hd, k) for b, k in zip(bases, ks)):
        raise ValueError(f"value width cut: need {Hkv} bases of shape (head_dim={hd}, k_g)")
    if sum(ks) < 1:
        raise ValueError("value width cut: the bases keep no direction")
    for g, b in enumerate(bases):
        dev = (b.T @ b - torch.eye(b.shape[1], dtype=torch.float64)).abs().max().item() \
            if b.shape[1] else 0.0
        if dev > 1e-4:
            raise ValueError(f"value width cut: the basis of kv head {g} is not orthonormal "
                             f"(max |U^T U - I| = {dev:.3g})")
    v_mod, o_mod = get(block, a.v), get(block, a.o)
    wv, bv = dense_value(v_mod, spec.full(a.v))
    wo, bo = dense_out(o_mod, spec.full(a.o))
    d = Hkv * hd
    Pv = torch.zeros(d, sum(ks), dtype=torch.float64)
    Po = torch.zeros(H * hd, rep * sum(ks), dtype=torch.float64)
    col_v = col_o = 0
    for g, b in enumerate(bases):
        Pv[g * hd:(g + 1) * hd, col_v:col_v + ks[g]] = b
        col_v += ks[g]
        for h in range(g * rep, (g + 1) * rep):
            Po[h * hd:(h + 1) * hd, col_o:col_o + ks[g]] = b
            col_o += ks[g]
    if mean is not None:
        m = f64(mean)
        r = m - Pv @ (Pv.T @ m)                         # (I - P) mean per kv head
        r_q = r.view(Hkv, 1, hd).expand(Hkv, rep, hd).reshape(H * hd)
        bo = wo @ r_q + (0 if bo is None else bo)
    # A key-value head that keeps no value dim is removed whole: its key and its group's
    # query heads too (where q and k are plain Linears), so nothing is computed for it.
    # The function is the same: the head's output was its value mean, now in o's bias.
    q_mod, k_mod = get(block, a.q), get(block, a.k)
    kept = [g for g in range(Hkv) if ks[g] > 0]
    removable = len(kept) < Hkv and type(q_mod) is nn.Linear and type(k_mod) is nn.Linear
    heads_kept = kept if removable else list(range(Hkv))
    q_rows = [h for g in heads_kept for h in range(g * rep, (g + 1) * rep)]
    ref_v = v_mod.linear if isinstance(v_mod, HeadPaddedLinear) else v_mod
    ref_o = o_mod.linear if isinstance(o_mod, HeadSelectLinear) else o_mod
    # one width for every kept head: the attention reads it unpadded where it can
    compact = uniform_dims([ks[g] for g in heads_kept]) and reads_compact_values(block, spec)
    if compact:   # computes the stock function until v and o are swapped
        compact_attention(get(block, a.v.rpartition(".")[0]))
    value = HeadPaddedLinear(wv.shape[1], [ks[g] for g in heads_kept], hd,
                             bias=bv is not None, compact=compact,
                             device=ref_v.weight.device, dtype=ref_v.weight.dtype)
    out = HeadSelectLinear([ks[h // rep] for h in q_rows], hd, wo.shape[0],
                           bias=bo is not None, compact=compact,
                           device=ref_o.weight.device, dtype=ref_o.weight.dtype)
    with torch.no_grad():
        value.linear.weight.copy_(Pv.T @ wv)
        if bv is not None:
            value.linear.bias.copy_(Pv.T @ bv)
        out.linear.weight.copy_(wo @ Po)   # a removed head's rows of Po are zero
        if bo is not None:
            out.linear.bias.copy_(bo)
    new = {a.v: value.train(ref_v.training), a.o: out.train(ref_o.training)}
    if removable:
        new[a.q] = _rows(q_mod, q_rows, hd)
        new[a.k] = _rows(k_mod, heads_kept, hd)
    return new


def _rows(linear: nn.Linear, heads: Sequence[int], head_dim: int) -> nn.Linear:
    """A copy of ``linear`` keeping the output rows of ``heads`` (blocks of head_dim)."""
    idx = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])
    return _linear(f64(linear.weight)[idx],
                   None if linear.bias is None else f64(linear.bias)[idx], linear)


def kept_value_dims(block: nn.Module, spec: BlockSpec) -> list[int]:
    v = get(block, spec.attention.v)
    return (list(v.head_dims) if isinstance(v, HeadPaddedLinear)
            else [spec.attention.head_dim] * spec.attention.kv_heads)


def value_bases(block: nn.Module, spec: BlockSpec, cov: torch.Tensor,
                head_ks: Sequence[int]) -> list[torch.Tensor]:
    """Per kv head g the top ``head_ks[g]`` eigenvectors of its diagonal block of ``cov``
    (restricted to the dims it still keeps), in head_dim rows."""
    a = spec.attention
    hd, Hkv = a.head_dim, a.kv_heads
    v = get(block, a.v)
    C = f64(cov)
    if tuple(C.shape) == (v.out_features,) * 2:
        C = padded_layout(v, C, square=True)
    if tuple(C.shape) != (Hkv * hd, Hkv * hd):
        raise ValueError(f"value width cut: cov must be ({Hkv * hd}, {Hkv * hd}) = ({Hkv} kv "
                         f"heads x head_dim {hd})^2; got {tuple(C.shape)}")
    kept = kept_value_dims(block, spec)
    ks = [int(x) for x in head_ks]
    if len(ks) != Hkv or any(not 0 <= x <= kk for x, kk in zip(ks, kept)) or sum(ks) < 1:
        raise ValueError(f"value width cut: head_ks must be {Hkv} ints with 0 <= k_g <= the "
                         f"dims each kv head keeps ({kept}), not all 0; got {list(head_ks)}")
    out = []
    for g, kg in enumerate(ks):
        block_c = C[g * hd:g * hd + kept[g], g * hd:g * hd + kept[g]]
        top = top_eigenvectors(block_c, kg)
        out.append(torch.cat([top, top.new_zeros(hd - kept[g], kg)]))
    return out


def cut_values(block: nn.Module, mean: torch.Tensor | None, cov: torch.Tensor,
               head_ks: Sequence[int], *, bases: Sequence[torch.Tensor] | None = None) -> dict:
    """Keep ``head_ks[g]`` value dims per key-value head of ``block``, in place.

    Args:
        block: a transformer block of a known family.
        mean, cov: (d,) / (d, d) statistics of its value site (d = kv heads x head_dim;
            the kept dims for compact value heads).
        head_ks: k_g per kv head (0 drops the head's values), not all 0.
        bases: optional per-head (head_dim x k_g) orthonormal bases instead of the
            eigenvectors (rows of dims already removed must be zero).

    Returns:
        ``{"site", "d", "k", "head_ks", "params_before", "params_after", "how",
        "mean_corrected"}`` (parameters of the block).
    """
    _, spec = block_of(block)
    a = spec.attention
    if bases is None:
        bases = value_bases(block, spec, cov, head_ks)
    bases = [f64(b) for b in bases]
    if mean is not None:
        mean = padded_layout(get(block, a.v), f64(mean))
    before = n_params(block)
    for name, mod in value_replacements(block, spec, bases, mean).items():
        set_module(block, name, mod)
    ks = [int(b.shape[1]) for b in bases]
    site = f"{a.v}:output" if a.value_site == "v_output" else f"{a.o}:input"
    return {"site": site, "d": a.kv_heads * a.head_dim, "k": sum(ks), "head_ks": ks,
            "params_before": before, "params_after": n_params(block),
            "how": "rotate per kv head", "mean_corrected": mean is not None}


# ----------------------------------------------------------------------------- project

def project_block_linear(block: nn.Module, name: str, basis: torch.Tensor,
                         mean: torch.Tensor | None = None) -> dict:
    """Replace the Linear ``name`` (relative to ``block``) by a rank-k ProjectedLinear of
    its input, in place: ``x -> linear(mean + U U^T (x - mean))``."""
    _, spec = block_of(block)
    if name not in spec.linears:
        raise UnsupportedModuleError(f"project: {name!r} is not one of the block's "
                                     f"projections {spec.linears}")
    linear = get(block, name)
    if type(linear) is not nn.Linear:
        raise UnsupportedModuleError(f"project: {name!r} is a {type(linear).__name__}, not an "
                                     f"nn.Linear (already reduced?)")
    U = basis.detach()
    if U.ndim != 2 or U.shape[0] != linear.in_features or U.shape[1] < 1:
        raise ValueError(f"project: basis must be ({linear.in_features}, k); got "
                         f"{tuple(U.shape)}")
    red = Reduction(f"{name}:input", name, "project", linear.in_features, U.shape[1], U,
                    None if mean is None else f64(mean))
    check_orthonormal(red)
    new = project_linear(linear, red)
    set_module(block, name, new)
    return {"site": f"{name}:input", "d": red.d, "k": red.k,
            "params_before": n_params(linear), "params_after": n_params(new),
            "how": "project"}


# ----------------------------------------------------------------------------- sites

def dim_site(dim: CoupledDim, model: nn.Module) -> Site:
    """The capture :class:`Site` of a coupled dimension (its current size)."""
    module = model.get_submodule(dim.capture)
    if dim.kind == "residual_width":   # the stream's first norm; its width is the stream's
        return Site(dim.site_name, dim.capture, "residual", int(module.normalized_shape[0]),
                    dim.where)
    if dim.kind == "embedding_rank":
        return Site(dim.site_name, dim.capture, "embedding", int(module.embedding_dim),
                    dim.where)
    if dim.kind == "head_width":   # analysed at q's input, cut in heads x head_dim
        return Site(dim.site_name, dim.capture, "heads", int(module.out_features), dim.where)
    attr = "in_features" if dim.where == "input" else "out_features"
    return Site(dim.site_name, dim.capture, "linear", int(getattr(module, attr)), dim.where)


def block_sites(block: nn.Module) -> list[Site]:
    """The value and MLP sites of a bare block (names relative to it)."""
    ad, _ = block_of(block)
    return [dim_site(d, block) for d in ad.coupled_dims(block)]


def dim_replacements(model: nn.Module, dim: CoupledDim, reduction: Reduction
                     ) -> dict[str, nn.Module]:
    """``{full name: new module}`` applying a width ``reduction`` to the coupled ``dim``."""
    if dim.kind == "embedding_rank":
        return {dim.capture: factorize_embedding(model.get_submodule(dim.capture), reduction)}
    block = model.get_submodule(dim.block.name) if dim.block.name else model
    spec = dim.block
    if dim.kind == "mlp_width":
        new = mlp_replacements(block, spec, reduction)
    elif dim.kind == "head_width":
        new = head_width_replacements(block, spec, reduction, block_of(block)[0]
                                      .head_size_attrs())
    else:
        a = spec.attention
        v = get(block, a.v)
        d = getattr(v, "out_features", None)   # the site's width (compact: the kept dims)
        if reduction.d != d:
            raise ValueError(f"Reduction {reduction.site!r}: the values of "
                             f"{spec.name or 'the block'} ({a.kv_heads} kv heads x "
                             f"{a.head_dim}) have {d} features but the reduction has "
                             f"d={reduction.d}")
        check_orthonormal(reduction)
        bases = head_bases(padded_layout(v, reduction.basis), a.kv_heads, a.head_dim)
        mean = None if reduction.mean is None else padded_layout(v, reduction.mean)
        new = value_replacements(block, spec, bases, mean)
    return {spec.full(n): m for n, m in new.items()}


# ----------------------------------------------------------------------------- widths

_has_bias = module_has_bias


def block_widths(block: nn.Module, spec: BlockSpec) -> dict:
    """One block's width record (see the module docstring)."""
    v = get(block, spec.attention.v)
    width = getattr(get(block, spec.mlp.consumer), "in_features", None)
    a = spec.attention
    return {"mlp": None if width is None else int(width),
            "value_heads": list(v.head_dims) if isinstance(v, HeadPaddedLinear) else None,
            "heads": int(a.heads), "kv_heads": int(a.kv_heads),
            "head_size": int(a.head_dim),
            "ranks": {rel: int(get(block, rel).rank) for rel in spec.linears
                      if isinstance(get(block, rel), ProjectedLinear)},
            "biases": {rel: _has_bias(get(block, rel)) for rel in spec.linears
                       if isinstance(get(block, rel), nn.Module)}}


def record_widths(model: nn.Module) -> list[dict] | None:
    """Per-block width records, also written on ``model.config.rmtkd_blocks``; None (and
    nothing written) for a model without transformer blocks."""
    ad = adapter_for(model, strict=False)
    if not isinstance(ad, TransformerAdapter):
        return None
    widths = [block_widths(m, ad.block_spec(m, n, i))
              for i, (n, m) in enumerate(ad.block_modules(model))]
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, WIDTHS_KEY, widths)
        emb = ad.token_embedding(model)
        emb = None if emb is None else model.get_submodule(emb)
        if isinstance(emb, FactorizedEmbedding):
            setattr(config, EMBEDDING_KEY, {"rank": emb.rank})
        elif getattr(config, EMBEDDING_KEY, None):   # a later cut made the table dense again
            setattr(config, EMBEDDING_KEY, None)
    return widths


def _legacy_widths(config: Any, n: int) -> list[dict] | None:
    """Width records from the per-family keys of rmtkd <= 0.1 (BERT ``rmtkd_intermediate_
    sizes`` ...; Llama ``rmtkd_llama_*``), so older saved models still load."""
    for pre in ("rmtkd_llama_", "rmtkd_"):
        sizes = getattr(config, f"{pre}intermediate_sizes", None)
        heads = getattr(config, f"{pre}value_head_dims", None)
        ranks = getattr(config, f"{pre}projected_ranks", None)
        biases = getattr(config, f"{pre}biases", None)
        if any(x is not None for x in (sizes, heads, ranks, biases)):
            def at(lst: Any, i: int, default: Any) -> Any:
                return lst[i] if lst is not None and i < len(lst) else default
            return [{"mlp": at(sizes, i, None), "value_heads": at(heads, i, None),
                     "ranks": at(ranks, i, {}) or {}, "biases": at(biases, i, {}) or {}}
                    for i in range(n)]
    return None


def apply_widths(model: nn.Module, widths: list[dict] | None = None) -> nn.Module:
    """Reshape a freshly built model to recorded widths (default: those on its config) so a
    reduced model's state dict loads into it; narrowed Linears are left uninitialised (load
    them). Returns ``model``.

    The reshaping is :func:`rmtkd.hf.modeling_rmtkd.reshape` (the code that a saved model
    runs under ``transformers`` without rmtkd) with the layout the adapter derives from
    ``model`` (:meth:`~rmtkd.adapters.TransformerAdapter.layout_record`), and rmtkd's
    :class:`~rmtkd.nn.ProjectedLinear`."""
    ad = adapter_for(model, strict=False)
    if not isinstance(ad, TransformerAdapter):
        return model
    config = getattr(model, "config", None)
    if widths is None:
        widths = getattr(config, WIDTHS_KEY, None) or \
            _legacy_widths(config, len(ad.block_modules(model)))
    if not widths and not getattr(config, EMBEDDING_KEY, None) and \
            not getattr(config, RESIDUAL_KEY, None):
        return model
    return reshape(model, list(widths or []), ad.layout_record(model),
                   projected=ProjectedLinear, empty=True)

