"""Surgery on Llama-family decoder layers (Hugging Face ``LlamaForCausalLM`` and models sharing
its layout: Mistral, Qwen2, ...).

The layer is recognised by its structure, not its class (``transformers`` is never imported
here): a module with ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``. The MLP
is gated, ``down_proj(act(gate_proj(x)) * up_proj(x))``; attention is grouped-query (GQA):
``num_key_value_heads`` value heads of ``head_dim``, each shared by ``n_rep =
num_attention_heads / num_key_value_heads`` consecutive query heads (HF ``repeat_kv``). Two
sites per layer (names relative to the layer, see :func:`llama_layer_sites`):

1. MLP inner width, site = input of ``mlp.down_proj`` (d = intermediate size), the gated
   activation ``a = act(g) * u``. :func:`reduce_llama_mlp` cuts it to k units. Rotation does
   not commute with the gated product, so it *selects* k units S
   (:func:`rmtkd.reduce.plan.select_units` on the site covariance and the spike basis):
   ``gate_proj``/``up_proj`` keep rows S (their biases too), the kept ``a_S`` pass through
   unchanged, and the others are predicted linearly, ``a ~= mean + R (a_S - mean_S)``, so
   ``down_proj`` becomes ``W R`` with bias ``b + W (mean - R mean_S)``. Llama's down_proj has
   no bias: one is added when a mean is given (``mean_correction=True``, the default; the
   widths record it so save/load rebuild it). Exact when ``a`` has rank k and the units S
   span it (``a = R a_S``); otherwise the error is that of the linear prediction, which
   self-distillation then recovers.

2. Attention value, site = output of ``self_attn.v_proj`` (d = num_key_value_heads *
   head_dim, kv head g in block ``g*hd:(g+1)*hd``). :func:`reduce_llama_attention` keeps per
   kv head an orthonormal ``U_g`` (hd x k_g, the top eigenvectors of the head's diagonal
   covariance block). ``v_proj`` becomes a :class:`~rmtkd.reduce.bert.HeadPaddedLinear`
   (rows ``U_g^T W_v,g``, bias ``U_g^T b_v,g``; outputs zero-padded back to ``hd`` per kv
   head, so every HF tensor shape and the KV cache are unchanged) and ``o_proj`` a
   :class:`~rmtkd.reduce.bert.HeadSelectLinear` over the *query* heads: head h of group
   ``g = h // n_rep`` keeps ``k_g`` dims, columns ``W_o,h U_g``, so the padded zeros meet
   removed columns. Attention weights act per head linearly and their rows sum to 1, so the
   result equals the original model with the v_proj output replaced by ``mean + P (v -
   mean)``, P = blockdiag(U_g U_g^T), exactly: the constant ``(I - P) mean`` reaches o_proj
   unchanged and goes into its bias (added when o_proj had none and a mean is given).
   With ``k_g = hd`` for every head the layer is unchanged (up to rounding). A layer whose
   values are normalised after v_proj (``self_attn.v_norm``) is rejected: there the
   projection does not commute.

:func:`project_llama_linear` replaces any of the seven projections by an exact rank-k
:class:`rmtkd.nn.ProjectedLinear` of its input (``mean + U U^T (x - mean)``).

Width bookkeeping (for :func:`rmtkd.save` / :func:`rmtkd.load`): :func:`record_llama_widths`
writes on ``model.config``, per layer, ``rmtkd_llama_intermediate_sizes`` (int),
``rmtkd_llama_value_head_dims`` (None or k_g per kv head), ``rmtkd_llama_projected_ranks``
(``{relative name: rank}``) and ``rmtkd_llama_biases`` (``{relative name: has bias}`` for the
seven projections); :func:`apply_llama_widths` reshapes a model freshly built from that
config so the reduced state dict loads with ``strict=True``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..capture import Site, make_site
from ..nn import ProjectedLinear
from .bert import HeadPaddedLinear, HeadSelectLinear, _dense_out, _dense_value
from .mlp import project_linear
from .plan import (ELEMENTWISE, PASSTHROUGH, Reduction, UnsupportedModuleError,
                   check_orthonormal, n_params, select_units, set_module, width_maps)

LLAMA_SUPPORTED = (
    "Llama-family decoder layers (self_attn.{q,k,v,o}_proj as nn.Linear, grouped-query "
    "attention with self_attn.head_dim, no norm on the values; mlp.{gate,up,down}_proj as "
    "nn.Linear with an elementwise mlp.act_fn, forward down(act(gate(x)) * up(x))): the MLP "
    "inner width (site 'mlp.down_proj:input', reduce_llama_mlp, surgery 'select'), the value "
    "dims per key-value head (site 'self_attn.v_proj:output', reduce_llama_attention) and "
    "rank-k projection of any of the seven projections (project_llama_linear)")

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
MLP_SITE, ATTENTION_SITE = "mlp.down_proj", "self_attn.v_proj"

# transformers.activations classes (all elementwise), matched by name: no import needed.
_HF_ELEMENTWISE = {"AccurateGELUActivation", "ClippedGELUActivation", "FastGELUActivation",
                   "GELUActivation", "GELUTanh", "LaplaceActivation", "LinearActivation",
                   "MishActivation", "NewGELUActivation", "PytorchGELUTanh",
                   "QuickGELUActivation", "ReLUSquaredActivation", "SiLUActivation",
                   "SqrtSoftplusActivation", "XIELUActivation"}

WIDTH_KEYS = ("rmtkd_llama_intermediate_sizes", "rmtkd_llama_value_head_dims",
              "rmtkd_llama_projected_ranks", "rmtkd_llama_biases")


# ----------------------------------------------------------------------------- detection

def is_llama_layer(module: nn.Module) -> bool:
    """Duck-typed Llama decoder layer: self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj
    (whatever their current types, so reduced layers still count)."""
    attn, mlp = getattr(module, "self_attn", None), getattr(module, "mlp", None)
    return (isinstance(attn, nn.Module) and isinstance(mlp, nn.Module)
            and all(isinstance(getattr(attn, a, None), nn.Module)
                    for a in ("q_proj", "k_proj", "v_proj", "o_proj"))
            and all(isinstance(getattr(mlp, a, None), nn.Module)
                    for a in ("gate_proj", "up_proj", "down_proj")))


def llama_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Llama decoder layers of ``model`` by name, in registration (= execution) order."""
    return [(n, m) for n, m in model.named_modules() if is_llama_layer(m)]


def llama_layer_sites(layer: nn.Module) -> list[Site]:
    """``[MLP site, attention site]`` with names relative to ``layer``:
    ``mlp.down_proj:input`` (d = current intermediate size) and ``self_attn.v_proj:output``
    (d = num_key_value_heads * head_dim; after :func:`reduce_llama_attention` the padded
    output, whose removed dims are exactly zero)."""
    _require_layer(layer)
    return [_site(MLP_SITE, layer.mlp.down_proj, "input"),
            _site(ATTENTION_SITE, layer.self_attn.v_proj, "output")]


def _site(name: str, module: nn.Module, where: str) -> Site:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return make_site(name, module, where)
    dim = getattr(module, "in_features" if where == "input" else "out_features", None)
    if dim is None:
        raise UnsupportedModuleError(f"{name!r} is a {type(module).__name__}; cannot make a "
                                     f"site of its {where}. Supported: {LLAMA_SUPPORTED}")
    return Site(f"{name}:{where}", name, "linear", int(dim), where)


def _require_layer(layer: nn.Module) -> None:
    if not is_llama_layer(layer):
        raise UnsupportedModuleError(
            f"{type(layer).__name__} is not a Llama-family decoder layer (needs "
            f"self_attn.{{q,k,v,o}}_proj and mlp.{{gate,up,down}}_proj). "
            f"Supported: {LLAMA_SUPPORTED}")


def _is_elementwise(act: Any) -> bool:
    return isinstance(act, ELEMENTWISE + PASSTHROUGH) or (
        isinstance(act, nn.Module) and type(act).__name__ in _HF_ELEMENTWISE
        and type(act).__module__.startswith("transformers."))


def _check_mlp(layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    mlp = layer.mlp
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    for name, m in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
        if type(m) is not nn.Linear:
            raise UnsupportedModuleError(
                f"MLP width cut: mlp.{name} is a {type(m).__name__}, not an nn.Linear "
                f"(already projected?); project mode is the only further reduction there. "
                f"Supported: {LLAMA_SUPPORTED}")
    act = getattr(mlp, "act_fn", None)
    if not _is_elementwise(act):
        raise UnsupportedModuleError(
            f"MLP width cut: mlp.act_fn is {type(act).__name__ if act is not None else 'missing'}"
            f", not a known elementwise activation (torch.nn activations or "
            f"transformers.activations classes), so keeping units may not commute with it. "
            f"Supported: {LLAMA_SUPPORTED}")
    if not gate.out_features == up.out_features == down.in_features:
        raise UnsupportedModuleError(
            f"MLP width cut: gate_proj / up_proj outputs ({gate.out_features}, "
            f"{up.out_features}) and down_proj inputs ({down.in_features}) differ; expected "
            f"the gated layout down(act(gate(x)) * up(x))")
    return gate, up, down


def llama_heads(layer: nn.Module) -> tuple[int, int, int]:
    """``(num_attention_heads, num_key_value_heads, head_dim)`` of ``layer.self_attn``, read
    from its modules' shapes (``head_dim`` from the attention module).

    Raises:
        UnsupportedModuleError: no ``head_dim``, inconsistent shapes or a value norm.
    """
    _require_layer(layer)
    attn = layer.self_attn
    hd = getattr(attn, "head_dim", None)
    if not isinstance(hd, int) or hd < 1:
        raise UnsupportedModuleError(f"self_attn ({type(attn).__name__}) has no int head_dim; "
                                     f"Supported: {LLAMA_SUPPORTED}")
    if isinstance(getattr(attn, "v_norm", None), nn.Module):
        raise UnsupportedModuleError(
            f"self_attn ({type(attn).__name__}) normalises the values after v_proj "
            f"(self_attn.v_norm), so a projection of the v_proj output does not commute with "
            f"it. Supported: {LLAMA_SUPPORTED}")
    n_q = getattr(attn.o_proj, "in_features", None)
    n_kv = getattr(attn.k_proj, "out_features", None)
    n_v = getattr(attn.v_proj, "out_features", None)
    if not (isinstance(n_q, int) and isinstance(n_kv, int) and n_q % hd == 0
            and n_kv % hd == 0 and n_v == n_kv and (n_q // hd) % max(n_kv // hd, 1) == 0
            and n_kv > 0):
        raise UnsupportedModuleError(
            f"self_attn ({type(attn).__name__}): o_proj inputs {n_q}, k_proj outputs {n_kv}, "
            f"v_proj outputs {n_v} do not fit heads x head_dim={hd} with query heads a "
            f"multiple of key-value heads. Supported: {LLAMA_SUPPORTED}")
    H, Hkv = n_q // hd, n_kv // hd
    groups = getattr(attn, "num_key_value_groups", None)
    if isinstance(groups, int) and groups != H // Hkv:
        raise UnsupportedModuleError(
            f"self_attn.num_key_value_groups={groups} but the shapes give {H} query heads / "
            f"{Hkv} key-value heads; Supported: {LLAMA_SUPPORTED}")
    return H, Hkv, hd


# ----------------------------------------------------------------------------- MLP

def reduce_llama_mlp(layer: nn.Module, mean: torch.Tensor | None, cov: torch.Tensor, k: int,
                     *, surgery: str = "select", basis: torch.Tensor | None = None,
                     ridge: float = 1e-6, mean_correction: bool = True) -> dict:
    """Cut the gated MLP of ``layer`` to ``k`` inner units, in place (see the module doc).

    Args:
        layer: a Llama decoder layer (its ``mlp`` is changed).
        mean: (d,) mean of the site ``mlp.down_proj:input`` (d = intermediate size), or None
            (no bias correction).
        cov: (d, d) covariance of that site.
        k: units kept, ``1 <= k <= d``.
        surgery: ``"select"`` (or ``"auto"``, the same here); ``"rotate"`` is refused: the
            gated product does not commute with a rotation.
        basis: (d, >= k) spike basis with orthonormal columns (its first k columns are used);
            default: the top-k eigenvectors of ``cov``.
        ridge: relative ridge of the least-squares reconstruction (select_units).
        mean_correction: fold ``W (mean - R mean_S)`` into down_proj's bias (adding one if
            it had none); False drops that correction (no bias is added).

    Returns:
        ``{"site", "d", "k", "units", "params_before", "params_after", "how",
        "mean_corrected"}`` (parameters of ``layer.mlp``).
    """
    if surgery not in ("select", "auto"):
        raise ValueError(f"reduce_llama_mlp: surgery {surgery!r} is not supported: a rotation "
                         f"does not commute with the gated product act(gate) * up; use "
                         f"'select' (or project_llama_linear for an exact projection)")
    gate, up, down = _check_mlp(layer)
    d = down.in_features
    C = _f64(cov)
    if tuple(C.shape) != (d, d):
        raise ValueError(f"reduce_llama_mlp: cov must be ({d}, {d}) for an intermediate size "
                         f"of {d}; got {tuple(C.shape)}")
    if not 1 <= int(k) <= d:
        raise ValueError(f"reduce_llama_mlp: need 1 <= k <= {d}; got k={k}")
    k = int(k)
    if basis is None:
        basis = _top_eigenvectors(C, k)
    else:
        basis = _f64(basis)
        if basis.ndim != 2 or basis.shape[0] != d or basis.shape[1] < k:
            raise ValueError(f"reduce_llama_mlp: basis must be ({d}, >= {k}); got "
                             f"{tuple(basis.shape)}")
        basis = basis[:, :k]
    m = None if mean is None or not mean_correction else _f64(mean)
    units, recon = select_units(C, basis, ridge=ridge)
    red = Reduction(f"{MLP_SITE}:input", MLP_SITE, "width", d, k, basis, m, units, recon,
                    "select")
    check_orthonormal(red)
    before = n_params(layer.mlp)
    P, R, c, how = width_maps(red, nonlinear=True)
    b_down = None if down.bias is None else _f64(down.bias)
    if c is not None:
        b_down = _f64(down.weight) @ c + (0 if b_down is None else b_down)
    new = {"gate_proj": _linear(P @ _f64(gate.weight),
                                None if gate.bias is None else P @ _f64(gate.bias), gate),
           "up_proj": _linear(P @ _f64(up.weight),
                              None if up.bias is None else P @ _f64(up.bias), up),
           "down_proj": _linear(_f64(down.weight) @ R, b_down, down)}
    for name, module in new.items():
        setattr(layer.mlp, name, module)
    _sync_mlp_attrs(layer.mlp, k)
    return {"site": f"{MLP_SITE}:input", "d": d, "k": k, "units": units.tolist(),
            "params_before": before, "params_after": n_params(layer.mlp), "how": how,
            "mean_corrected": c is not None}


def _sync_mlp_attrs(mlp: nn.Module, size: int) -> None:
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        mlp.intermediate_size = int(size)


# ----------------------------------------------------------------------------- attention

def llama_head_ks(cov: torch.Tensor, num_kv_heads: int, head_dim: int, n: int, *,
                  min_k: int = 0, **spikes_kwargs: Any) -> list[int]:
    """k per key-value head: :func:`rmtkd.spikes` on each head's (head_dim x head_dim)
    diagonal block of the v_proj output covariance ``cov`` ((num_kv_heads * head_dim)^2)
    from ``n`` samples, at least ``min_k`` (k_g = 0 drops the head's values)."""
    from .. import spikes

    C = _f64(cov)
    d = int(num_kv_heads) * int(head_dim)
    if tuple(C.shape) != (d, d):
        raise ValueError(f"llama_head_ks: cov must be ({d}, {d}) = (kv heads x head_dim)^2; "
                         f"got {tuple(C.shape)}")
    ks = []
    for g in range(num_kv_heads):
        block = C[g * head_dim:(g + 1) * head_dim, g * head_dim:(g + 1) * head_dim]
        ks.append(min(head_dim, max(int(min_k), int(spikes(block, n, **spikes_kwargs).k))))
    return ks


def reduce_llama_attention(layer: nn.Module, mean: torch.Tensor | None, cov: torch.Tensor,
                           head_ks: Sequence[int], *,
                           bases: Sequence[torch.Tensor] | None = None) -> dict:
    """Keep ``head_ks[g]`` value dims per key-value head of ``layer.self_attn``, in place
    (v_proj -> HeadPaddedLinear, o_proj -> HeadSelectLinear; see the module doc).

    Args:
        layer: a Llama decoder layer.
        mean: (d,) mean of the site ``self_attn.v_proj:output`` (d = kv heads x head_dim),
            or None (no bias correction).
        cov: (d, d) covariance of that site; head g's basis is the top ``k_g`` eigenvectors of
            its diagonal block (restricted to the dims it still keeps when already reduced).
        head_ks: k_g per key-value head, ``0 <= k_g <= head_dim`` (or the dims still kept),
            not all 0.
        bases: optional per-head (head_dim x k_g) orthonormal bases used instead of the
            eigenvectors (rows of dims already removed must be zero).

    Returns:
        ``{"site", "d", "k", "head_ks", "params_before", "params_after", "how",
        "mean_corrected"}`` (parameters of ``layer.self_attn``).
    """
    H, Hkv, hd = llama_heads(layer)
    attn = layer.self_attn
    rep = H // Hkv
    d = Hkv * hd
    C = _f64(cov)
    if tuple(C.shape) != (d, d):
        raise ValueError(f"reduce_llama_attention: cov must be ({d}, {d}) = ({Hkv} kv heads x "
                         f"head_dim {hd})^2; got {tuple(C.shape)}")
    ks = [int(x) for x in head_ks]
    kept = (list(attn.v_proj.head_dims) if isinstance(attn.v_proj, HeadPaddedLinear)
            else [hd] * Hkv)
    if len(ks) != Hkv or any(not 0 <= x <= kk for x, kk in zip(ks, kept)) or sum(ks) < 1:
        raise ValueError(f"reduce_llama_attention: head_ks must be {Hkv} ints with 0 <= k_g <= "
                         f"the dims each kv head keeps ({kept}), not all 0; got {list(head_ks)}")
    wv, bv = _dense_value(attn.v_proj, "self_attn.v_proj")
    wo, bo = _dense_out(attn.o_proj, "self_attn.o_proj")
    if bases is None:
        bases = [_top_eigenvectors(C[g * hd:g * hd + kept[g], g * hd:g * hd + kept[g]], kg,
                                   rows=hd) for g, kg in enumerate(ks)]
    else:
        bases = [_f64(b) for b in bases]
        if len(bases) != Hkv or any(tuple(b.shape) != (hd, kg) for b, kg in zip(bases, ks)):
            raise ValueError(f"reduce_llama_attention: bases must be {Hkv} tensors of shape "
                             f"(head_dim={hd}, k_g) for k_g in {ks}")
        for g, b in enumerate(bases):
            dev = (b.T @ b - torch.eye(b.shape[1], dtype=torch.float64)).abs().max().item() \
                if b.shape[1] else 0.0
            if dev > 1e-4:
                raise ValueError(f"reduce_llama_attention: basis of kv head {g} is not "
                                 f"orthonormal (max |U^T U - I| = {dev:.3g})")
    before = n_params(attn)
    # block-diagonal value basis (d x sum k_g) and its query-head expansion (H*hd x sum_h k)
    Pv = torch.zeros(d, sum(ks), dtype=torch.float64)
    Po = torch.zeros(H * hd, rep * sum(ks), dtype=torch.float64)
    col_v = col_o = 0
    for g, b in enumerate(bases):
        Pv[g * hd:(g + 1) * hd, col_v:col_v + ks[g]] = b
        col_v += ks[g]
        for h in range(g * rep, (g + 1) * rep):
            Po[h * hd:(h + 1) * hd, col_o:col_o + ks[g]] = b
            col_o += ks[g]
    q_dims = [ks[h // rep] for h in range(H)]
    if mean is not None:
        m = _f64(mean)
        r = m - Pv @ (Pv.T @ m)                         # (I - P) mean per kv head
        r_q = r.view(Hkv, 1, hd).expand(Hkv, rep, hd).reshape(H * hd)
        bo = wo @ r_q + (0 if bo is None else bo)
    ref_v = attn.v_proj.linear if isinstance(attn.v_proj, HeadPaddedLinear) else attn.v_proj
    ref_o = attn.o_proj.linear if isinstance(attn.o_proj, HeadSelectLinear) else attn.o_proj
    value = HeadPaddedLinear(wv.shape[1], ks, hd, bias=bv is not None,
                             device=ref_v.weight.device, dtype=ref_v.weight.dtype)
    out = HeadSelectLinear(q_dims, hd, wo.shape[0], bias=bo is not None,
                           device=ref_o.weight.device, dtype=ref_o.weight.dtype)
    with torch.no_grad():
        value.linear.weight.copy_(Pv.T @ wv)
        if bv is not None:
            value.linear.bias.copy_(Pv.T @ bv)
        out.linear.weight.copy_(wo @ Po)
        if bo is not None:
            out.linear.bias.copy_(bo)
    # the kept-index buffers are built on the CPU: put them beside the weights
    value = _to_device(value, ref_v.weight.device).train(ref_v.training)
    out = _to_device(out, ref_o.weight.device).train(ref_o.training)
    attn.v_proj, attn.o_proj = value, out
    return {"site": f"{ATTENTION_SITE}:output", "d": d, "k": sum(ks), "head_ks": ks,
            "params_before": before, "params_after": n_params(attn),
            "how": "rotate per kv head", "mean_corrected": mean is not None}


# ----------------------------------------------------------------------------- project

def project_llama_linear(layer: nn.Module, name: str, basis: torch.Tensor,
                         mean: torch.Tensor | None = None) -> dict:
    """Replace the projection ``name`` (one of :data:`PROJECTIONS`, relative to ``layer``) by
    a rank-k :class:`rmtkd.nn.ProjectedLinear` of its input, in place: ``x -> linear(mean +
    U U^T (x - mean))`` with ``basis`` U (in_features x k, orthonormal columns); a bias is
    added when a mean is given and the layer had none.

    Returns:
        ``{"site", "d", "k", "params_before", "params_after", "how"}``.
    """
    _require_layer(layer)
    if name not in PROJECTIONS:
        raise UnsupportedModuleError(f"project_llama_linear: {name!r} is not one of "
                                     f"{PROJECTIONS}. Supported: {LLAMA_SUPPORTED}")
    linear = layer.get_submodule(name)
    if type(linear) is not nn.Linear:
        raise UnsupportedModuleError(
            f"project_llama_linear: {name!r} is a {type(linear).__name__}, not an nn.Linear "
            f"(already reduced?). Supported: {LLAMA_SUPPORTED}")
    U = basis.detach()
    if U.ndim != 2 or U.shape[0] != linear.in_features or not 1 <= U.shape[1]:
        raise ValueError(f"project_llama_linear: basis must be ({linear.in_features}, k); got "
                         f"{tuple(U.shape)}")
    red = Reduction(f"{name}:input", name, "project", linear.in_features, U.shape[1], U,
                    None if mean is None else _f64(mean))
    check_orthonormal(red)
    new = project_linear(linear, red)
    set_module(layer, name, new)
    return {"site": f"{name}:input", "d": red.d, "k": red.k,
            "params_before": n_params(linear), "params_after": n_params(new),
            "how": "project"}


# ----------------------------------------------------------------------------- widths

def _has_bias(m: nn.Module) -> bool:
    inner = m.linear if isinstance(m, (HeadPaddedLinear, HeadSelectLinear)) else m
    return getattr(inner, "bias", None) is not None


def record_llama_widths(model: nn.Module) -> dict | None:
    """Write the per-layer shapes on ``model.config`` (see the module docstring) and return
    them; None (nothing written) when the model has no Llama layers."""
    layers = llama_layers(model)
    if not layers:
        return None
    sizes, heads, ranks, biases = [], [], [], []
    for _, layer in layers:
        sizes.append(int(layer.mlp.gate_proj.out_features))
        v = layer.self_attn.v_proj
        heads.append(list(v.head_dims) if isinstance(v, HeadPaddedLinear) else None)
        ranks.append({rel: int(layer.get_submodule(rel).rank) for rel in PROJECTIONS
                      if isinstance(layer.get_submodule(rel), ProjectedLinear)})
        biases.append({rel: _has_bias(layer.get_submodule(rel)) for rel in PROJECTIONS})
    widths = dict(zip(WIDTH_KEYS, (sizes, heads, ranks, biases)))
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in widths.items():
            setattr(config, key, value)
    return widths


def apply_llama_widths(model: nn.Module, widths: dict | None = None) -> nn.Module:
    """Reshape a freshly built model to recorded widths (default: those on ``model.config``;
    nothing to do when none are recorded) so a reduced model's state dict loads into it;
    weights of replaced modules are left uninitialised (load them). Returns ``model``."""
    if widths is None:
        config = getattr(model, "config", None)
        widths = {key: getattr(config, key, None) for key in WIDTH_KEYS}
    layers = llama_layers(model)
    if not layers or not any(widths.get(key) for key in WIDTH_KEYS):
        return model
    n = len(layers)
    sizes = widths.get("rmtkd_llama_intermediate_sizes") or [None] * n
    heads = widths.get("rmtkd_llama_value_head_dims") or [None] * n
    ranks = widths.get("rmtkd_llama_projected_ranks") or [{}] * n
    biases = widths.get("rmtkd_llama_biases") or [{}] * n
    if not len(sizes) == len(heads) == len(ranks) == len(biases) == n:
        raise ValueError(f"recorded Llama widths cover {len(sizes)}/{len(heads)}/{len(ranks)}/"
                         f"{len(biases)} layers; the model has {n} Llama layers")
    for (_, layer), size, dims, rk, bias in zip(layers, sizes, heads, ranks, biases):
        bias = bias or {}

        def has(rel: str, default: nn.Module) -> bool:
            return bool(bias.get(rel, _has_bias(default)))

        mlp, attn = layer.mlp, layer.self_attn
        if size is not None and int(size) != mlp.gate_proj.out_features:
            g, u, dn = mlp.gate_proj, mlp.up_proj, mlp.down_proj
            mlp.gate_proj = _empty_linear(g.in_features, size, g, has("mlp.gate_proj", g))
            mlp.up_proj = _empty_linear(u.in_features, size, u, has("mlp.up_proj", u))
            mlp.down_proj = _empty_linear(size, dn.out_features, dn, has("mlp.down_proj", dn))
            _sync_mlp_attrs(mlp, int(size))
        if dims is not None:
            H, Hkv, hd = llama_heads(layer)
            v, o = attn.v_proj, attn.o_proj
            rep = H // Hkv
            if len(dims) != Hkv:
                raise ValueError(f"recorded value head dims {dims} do not match {Hkv} "
                                 f"key-value heads")
            attn.v_proj = _to_device(HeadPaddedLinear(
                v.in_features, dims, hd, bias=has("self_attn.v_proj", v),
                device=v.weight.device, dtype=v.weight.dtype), v.weight.device)
            attn.o_proj = _to_device(HeadSelectLinear(
                [dims[h // rep] for h in range(H)], hd, o.out_features,
                bias=has("self_attn.o_proj", o), device=o.weight.device,
                dtype=o.weight.dtype), o.weight.device)
        for rel in PROJECTIONS:
            m = layer.get_submodule(rel)
            if rel in (rk or {}):
                set_module(layer, rel, ProjectedLinear(
                    m.in_features, m.out_features, int(rk[rel]), bias=has(rel, m),
                    device=m.weight.device, dtype=m.weight.dtype))
            elif type(m) is nn.Linear and has(rel, m) != (m.bias is not None):
                set_module(layer, rel, _empty_linear(m.in_features, m.out_features, m,
                                                     has(rel, m)))
    return model


# ----------------------------------------------------------------------------- helpers

def _f64(t: Any) -> torch.Tensor:
    return torch.as_tensor(t).detach().to(device="cpu", dtype=torch.float64)


def _top_eigenvectors(C: torch.Tensor, k: int, rows: int | None = None) -> torch.Tensor:
    """Top-k eigenvectors (columns, float64) of the symmetric C, zero-padded to ``rows``."""
    evals, evecs = torch.linalg.eigh((C + C.T) / 2)
    top = evecs[:, torch.argsort(evals, descending=True)[:k]]
    if rows is not None and rows > C.shape[0]:
        top = torch.cat([top, top.new_zeros(rows - C.shape[0], k)])
    return top


def _to_device(module: nn.Module, device: torch.device) -> nn.Module:
    return module if device.type == "meta" else module.to(device)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    layer = _empty_linear(weight.shape[1], weight.shape[0], like, bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _empty_linear(n_in: int, n_out: int, like: nn.Module, bias: bool) -> nn.Linear:
    ref = like.weight if hasattr(like, "weight") else like.linear.weight
    return nn.utils.skip_init(nn.Linear, int(n_in), int(n_out), bias=bool(bias),
                              device=ref.device, dtype=ref.dtype).train(like.training)
