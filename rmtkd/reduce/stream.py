"""The residual-stream width of a post-norm encoder (BERT family), cut by unit selection.

In a post-norm block the stream is a LayerNorm's output, and LayerNorm's per-unit scale and
bias do not commute with a rotation (the pre-norm decoders' rotation, :mod:`.residual`,
does not apply). So one set S of k hidden units is kept through the whole stream, chosen
from the pooled covariance C of every state (the output of each norm of the stream; see
:class:`rmtkd.adapters.StreamSpec`) as width mode chooses units (:func:`.maths.select_units`:
the k units best spanning C's top-k eigenvectors, and ``R = C[:, S] C[S, S]^-1`` predicting
all units from them):

- embedding tables keep their columns S; every LayerNorm of the stream keeps weight[S],
  bias[S] and normalises over the k units it has (its statistics are taken over S, not d:
  the approximation this cut makes besides dropping the other units);
- a Linear reading state i becomes ``W R`` with bias ``b + W (m_i - R m_i[S])`` (m_i: the
  state's mean), i.e. it reads the least-squares reconstruction of the d units;
- a Linear writing into a residual sum keeps its output rows S (after a value cut, the
  inner Linear of the value's HeadPaddedLinear / the output's HeadSelectLinear is cut the
  same way, so the two cuts may come in either order);
- where the model's output carries the last state (a bare encoder, a sentence encoder), that
  norm is followed by the same reconstruction, ``nn.Sequential(LayerNorm(k), Linear(k, d))``,
  so the outputs keep d features.

At k = d (S = every unit, R = I) the model is unchanged up to fp32 rounding.
"""
from __future__ import annotations

import torch
from torch import nn

from ..adapters import StreamSpec
from ..hf.modeling_rmtkd import (RESIDUAL_KEY, FactorizedEmbedding, HeadPaddedLinear,
                                 HeadSelectLinear)
from .embedding import dense_table
from .maths import Reduction, UnsupportedModuleError
from .mlp import _f64, _linear


def state_means(reduction: Reduction, n_states: int) -> torch.Tensor:
    """``(n_states, d)`` float64 state means of a stream reduction: its ``mean`` per state
    (n_states x d), one mean for all (d,), or zeros without one."""
    d = reduction.d
    if reduction.mean is None:
        return torch.zeros(n_states, d, dtype=torch.float64)
    m = _f64(reduction.mean)
    if m.dim() == 1:
        return m.expand(n_states, d).clone()
    if tuple(m.shape) != (n_states, d):
        raise ValueError(f"Reduction {reduction.site!r}: a stream reduction's mean must be "
                         f"({n_states}, {d}) (one per state) or ({d},); got {tuple(m.shape)}")
    return m


def _plain(model: nn.Module, name: str, kind: type) -> nn.Module:
    m = model.get_submodule(name)
    if type(m) is not kind:
        raise UnsupportedModuleError(
            f"cannot cut the residual stream through {name!r}: it is a {type(m).__name__}, "
            f"not a plain {kind.__name__}; cut the residual width before the sites that "
            f"replace it (put 'residual_width' first)")
    return m


def _stream_linear(model: nn.Module, name: str, head_kind: type) -> tuple[nn.Module, nn.Linear]:
    """``(module, the nn.Linear holding its stream-side weight)``: a plain Linear, or a
    value cut's per-head module ``head_kind`` (HeadPaddedLinear reads the whole stream,
    HeadSelectLinear writes it), whose inner Linear is cut the same way."""
    m = model.get_submodule(name)
    if type(m) is head_kind:
        return m, m.linear
    return m, _plain(model, name, nn.Linear)


def _rewrap(module: nn.Module, linear: nn.Linear) -> nn.Module:
    """``module`` with ``linear`` in place of its weight: the Linear itself, or a copy of
    the per-head module around it (same head dims)."""
    if type(module) is nn.Linear:
        return linear
    bias = linear.bias is not None   # built on the meta device: ``linear`` replaces its own
    if type(module) is HeadPaddedLinear:
        new = HeadPaddedLinear(linear.in_features, module.head_dims, module.head_size,
                               bias=bias, compact=module.compact, device="meta")
    else:
        new = HeadSelectLinear(module.head_dims, module.head_size, linear.out_features,
                               bias=bias, compact=module.compact, device="meta")
    new.linear = linear
    new.refresh_index()
    return new.train(module.training)


def _norm(ln: nn.LayerNorm, S: torch.Tensor) -> nn.LayerNorm:
    ref = ln.weight
    new = nn.LayerNorm(len(S), eps=ln.eps, elementwise_affine=ref is not None,
                       bias=ln.bias is not None,
                       device=None if ref is None else ref.device,
                       dtype=None if ref is None else ref.dtype)
    with torch.no_grad():
        if ln.weight is not None:
            new.weight.copy_(ln.weight[S.to(ln.weight.device)])
        if ln.bias is not None:
            new.bias.copy_(ln.bias[S.to(ln.bias.device)])
    return new.train(ln.training)


def _table(module: nn.Module, S: torch.Tensor) -> nn.Module:
    with torch.no_grad():
        if isinstance(module, FactorizedEmbedding) and len(S) <= module.rank:
            # k <= r: the k kept columns of the dense table are fewer parameters
            w = module.proj.weight
            new = nn.Embedding(module.num_embeddings, len(S), padding_idx=module.padding_idx,
                               device=w.device, dtype=w.dtype)
            new.weight.copy_(dense_table(module)[:, S])
            return new.train(module.training)
        if isinstance(module, FactorizedEmbedding):   # (V x r)(r x d): keep rows S of proj
            new = FactorizedEmbedding(module.num_embeddings, len(S), module.rank,
                                      module.padding_idx, device=module.proj.weight.device,
                                      dtype=module.proj.weight.dtype)
            new.embed.weight.copy_(module.embed.weight)
            new.proj = _linear(_f64(module.proj.weight)[S], _f64(module.proj.bias)[S],
                               module.proj)
            return new.train(module.training)
        if type(module) is not nn.Embedding:
            raise UnsupportedModuleError(f"cannot cut the columns of a {type(module).__name__}")
        w = module.weight
        new = nn.Embedding(module.num_embeddings, len(S), padding_idx=module.padding_idx,
                           device=w.device, dtype=w.dtype)
        new.weight.copy_(w[:, S.to(w.device)])
        return new.train(module.training)


def stream_replacements(model: nn.Module, stream: StreamSpec, reduction: Reduction
                        ) -> dict[str, nn.Module]:
    """``{full name: new module}`` keeping the units ``reduction.units`` of the residual
    stream ``stream`` (see the module docstring); the model is not changed.

    Raises:
        ValueError: the reduction carries no units (a rotation) or does not match d.
        UnsupportedModuleError: a module of the stream is not a plain Linear (or a value
            cut's HeadPaddedLinear / HeadSelectLinear) / LayerNorm / embedding table.
    """
    if reduction.units is None:
        raise ValueError(f"Reduction {reduction.site!r}: the residual stream is cut by unit "
                         f"selection; the reduction needs units and a reconstruction")
    S = reduction.units.detach().cpu().long()
    R = _f64(reduction.reconstruction)
    means = state_means(reduction, len(stream.states))
    new: dict[str, nn.Module] = {}
    for name in stream.tables:
        new[name] = _table(model.get_submodule(name), S)
    for i, (state, readers) in enumerate(zip(stream.states, stream.readers)):
        ln = _plain(model, state, nn.LayerNorm)
        if ln.normalized_shape != (reduction.d,):
            raise ValueError(f"Reduction {reduction.site!r}: {state!r} normalises "
                             f"{ln.normalized_shape} features, the reduction has d = "
                             f"{reduction.d}")
        shift = means[i] - R @ means[i][S]   # the reconstruction's constant term
        norm = _norm(ln, S)
        if state == stream.lift:
            ref = ln.weight if ln.weight is not None else torch.empty(0)
            lift = nn.Linear(len(S), reduction.d, device=ref.device, dtype=ref.dtype)
            new[state] = nn.Sequential(norm, _linear(R, shift, lift))
        else:
            new[state] = norm
        for name in readers:
            mod, lin = _stream_linear(model, name, HeadPaddedLinear)
            W = _f64(lin.weight)   # readers always get a bias (reshape relies on it)
            b = W @ shift + (0.0 if lin.bias is None else _f64(lin.bias))
            new[name] = _rewrap(mod, _linear(W @ R, b, lin))
    for name in stream.writers:
        mod, lin = _stream_linear(model, name, HeadSelectLinear)
        new[name] = _rewrap(mod, _linear(_f64(lin.weight)[S], None if lin.bias is None
                                         else _f64(lin.bias)[S], lin))
    return new


def config_owner(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(name, module)`` of ``model`` or of its first submodule with a config (a wrapper
    such as a sentence encoder around a BertModel, which rmtkd.save stores as that model);
    None without any."""
    for name, m in model.named_modules():
        config = getattr(m, "config", None)
        if config is not None and not isinstance(config, (dict, str, int, float)):
            return name, m
    return None


def config_of(model: nn.Module) -> object | None:
    owner = config_owner(model)
    return None if owner is None else owner[1].config


def stream_record(stream: StreamSpec, reduction: Reduction, prefix: str = "") -> dict:
    """The ``config.rmtkd_residual`` record of a unit-selection cut, which
    :func:`rmtkd.hf.modeling_rmtkd.reshape_stream` rebuilds: ``{"units": S, "hidden_size":
    d, "tables", "norms", "readers", "writers"`` (module names relative to the module
    ``prefix`` that owns the config) ``, "lift"}``."""
    cut = len(prefix) + 1 if prefix else 0

    def rel(names):
        return [n[cut:] for n in names]

    return {"units": [int(u) for u in reduction.units.tolist()],
            "hidden_size": int(reduction.d), "tables": rel(stream.tables),
            "norms": rel(stream.states),
            "readers": rel(r for rs in stream.readers for r in rs),
            "writers": rel(stream.writers),
            "lift": None if stream.lift is None else stream.lift[cut:]}


def stream_units(model: nn.Module) -> torch.Tensor | None:
    """The hidden units a residual-stream cut kept in ``model`` (from its config's
    ``rmtkd_residual`` record), or None where the stream was not cut by units."""
    rec = getattr(config_of(model), RESIDUAL_KEY, None)
    units = rec.get("units") if isinstance(rec, dict) else None
    return None if units is None else torch.as_tensor(units, dtype=torch.long)
