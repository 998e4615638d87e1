"""Reduced rmtkd models for ``transformers`` without rmtkd (``trust_remote_code``).

This file is self-contained: it imports only the standard library, ``torch`` and (lazily)
``transformers``, never rmtkd. ``rmtkd.save`` copies it verbatim into every directory of a
Hugging Face model it writes, next to ``config.json`` (with ``rmtkd_blocks``,
``rmtkd_layout`` and ``auto_map``) and ``model.safetensors``, so that::

    transformers.AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True)

(``AutoModel`` for a bare encoder, ``AutoModelForCausalLM`` for a decoder, ...) builds the
stock class of ``model_type``, reshapes it to the recorded widths and loads the weights. It
is also the one implementation inside rmtkd: ``rmtkd.reduce.heads`` re-exports the head
modules, ``rmtkd.nn.ProjectedLinear`` subclasses :class:`ProjectedLinear` (adding kernel
dispatch) and ``rmtkd.reduce.apply_widths`` runs :func:`reshape` with the layout that
rmtkd's architecture adapters derive from the model.

Contents:

- :class:`HeadPaddedLinear`, :class:`HeadSelectLinear`: per-head value widths (a value
  projection computing only the kept dims, zero-padded per head; an output projection that
  drops the padding first). Their ``index`` buffer is not persistent: it is rebuilt from
  ``head_dims`` (:func:`refresh_buffers`). With :data:`COMPACT_VALUES` on (opt-in), where
  every kept head has the same width and the block's attention is a Llama-family one
  (:func:`supports_compact_values`), they are
  ``compact`` (no padding, no selection) and :func:`compact_attention` lets the attention
  read value heads of that width: the KV cache and the attention shrink too. The state dict
  is the same either way, so the same files load padded elsewhere.
- :class:`ProjectedLinear`: ``y = (x @ V) @ W.T + bias`` (parameters ``V``, ``W``, ``bias``).
- :class:`FactorizedEmbedding`: a token embedding of rank k, ``proj(embed(ids))``, recorded
  as ``config.rmtkd_embedding = {"rank": k}`` with its path in ``rmtkd_layout["embedding"]``.
- :class:`MixedRMSNorm`: an RMSNorm followed by a (k x k) mix, the final norm of a decoder
  whose residual stream was rotated and sliced while its head stays tied to the embedding,
  recorded as ``config.rmtkd_residual = {"hidden_size": d, "final_norm_mix": true}`` with
  its path in ``rmtkd_layout["final_norm"]``.
- a post-norm encoder whose residual stream keeps k of its d hidden units, recorded as
  ``config.rmtkd_residual = {"units": [...], "hidden_size": d, "tables", "norms",
  "readers", "writers", "lift"}`` (full module names): :func:`reshape_stream` gives the
  embedding tables and norms k features, the readers k inputs (with a bias), the writers
  k outputs and the ``lift`` norm a ``Linear(k, d)`` after it (``nn.Sequential``).
- :func:`reshape`: reshape a freshly built model from ``config.rmtkd_blocks`` (per block:
  ``{"mlp": inner width, "value_heads": kept dims per kept key-value head or None,
  "heads", "kv_heads": the query / key-value heads kept (a head without value dims is
  removed with its key and query rows), "head_size": the block's head size (a head width
  cut narrows q, k, v and o to it and sets the layout's ``head_size_attrs``; the softmax
  scale stays the stock one), "ranks": {linear: rank}, "biases": {linear: has bias}}``) and ``config.rmtkd_layout`` (the block
  paths and, per block, the relative paths of its projections; written by
  ``rmtkd.adapters.TransformerAdapter.layout_record``). Only these strings are used to walk
  the model.
- ``Rmtkd<Class>`` (e.g. ``RmtkdBertForSequenceClassification``,
  ``RmtkdLlamaForCausalLM``): ``transformers.<Class>`` whose ``__init__`` reshapes the
  model (before the weights are loaded), made on first access (:func:`rmtkd_model_class`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

BLOCKS_KEY = "rmtkd_blocks"
EMBEDDING_KEY = "rmtkd_embedding"
RESIDUAL_KEY = "rmtkd_residual"
LAYOUT_KEY = "rmtkd_layout"
LAYOUT_FORMAT = "rmtkd-layout"
LAYOUT_VERSION = 1
CLASS_PREFIX = "Rmtkd"

__all__ = ["HeadPaddedLinear", "HeadSelectLinear", "ProjectedLinear", "kept_index",
           "compact_attention", "supports_compact_values", "uniform_dims",
           "reshape", "reshape_block", "refresh_buffers", "rmtkd_model_class",
           "module_has_bias", "set_attr", "BLOCKS_KEY", "LAYOUT_KEY", "EMBEDDING_KEY",
           "FactorizedEmbedding", "MixedRMSNorm", "RESIDUAL_KEY", "reshape_stream"]


# ----------------------------------------------------------------------------- modules

def _head_dims(head_dims: Sequence[int], head_size: int, compact: bool = False
               ) -> tuple[list[int], int]:
    """Validated per-head kept dimensions (each in [0, head_size]; ``compact``: all equal
    and positive) and the head size."""
    dims, size = [int(k) for k in head_dims], int(head_size)
    if any(not 0 <= k <= size for k in dims):
        raise ValueError(f"head_dims must be in [0, {size}]; got {dims}")
    if compact and not uniform_dims(dims):
        raise ValueError(f"compact value heads need one positive width for every head; got "
                         f"{dims}")
    return dims, size


def uniform_dims(dims: Sequence[int]) -> bool:
    """Every head keeps the same positive number of value dims."""
    return len(dims) > 0 and min(dims) == max(dims) > 0


def kept_index(head_dims: Sequence[int], head_size: int, device=None) -> torch.Tensor:
    """Positions of the kept dims in the padded ``len(head_dims) * head_size`` layout."""
    idx = torch.cat([torch.arange(k, dtype=torch.long) + h * head_size
                     for h, k in enumerate(head_dims)] or [torch.zeros(0, dtype=torch.long)])
    return idx if device is None or torch.device(device).type == "meta" else idx.to(device)


class _HeadIndexed(nn.Module):
    """Shared part of the head modules: the ``index`` of the kept dims (not persistent)."""

    head_dims: list[int]
    head_size: int
    compact: bool
    linear: nn.Linear

    @property
    def padded_features(self) -> int:
        """Width of the padded layout (every head ``head_size`` wide)."""
        return len(self.head_dims) * self.head_size

    def refresh_index(self) -> None:
        """Recompute ``index`` from ``head_dims`` on the weight's device (a loader that
        creates the model on the meta device leaves non-persistent buffers empty)."""
        self.index = kept_index(self.head_dims, self.head_size, self.linear.weight.device)


class HeadPaddedLinear(_HeadIndexed):
    """``nn.Linear(in_features -> sum(head_dims))`` whose outputs are zero-padded per head to
    ``head_size`` (out: ``len(head_dims) * head_size``): head h's kept values sit in the
    first ``head_dims[h]`` entries of its block. ``compact``: no padding (out:
    ``sum(head_dims)``), for an attention that reads value heads of their own width
    (:func:`compact_attention`; the head dims must then be equal)."""

    def __init__(self, in_features: int, head_dims: Sequence[int], head_size: int,
                 bias: bool = True, *, compact: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self.head_dims, self.head_size = _head_dims(head_dims, head_size, compact)
        self.compact = bool(compact)
        self.in_features = int(in_features)
        self.out_features = sum(self.head_dims) if compact else \
            len(self.head_dims) * self.head_size
        self.linear = nn.Linear(in_features, sum(self.head_dims), bias=bias, device=device,
                                dtype=dtype)
        self.register_buffer("index", kept_index(self.head_dims, self.head_size, device),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        if self.compact:
            return y
        out = y.new_zeros(*y.shape[:-1], self.out_features)
        return out.index_copy(-1, self.index, y)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, head_dims={self.head_dims}, " \
               f"head_size={self.head_size}, compact={self.compact}"


class HeadSelectLinear(_HeadIndexed):
    """Keeps the first ``head_dims[h]`` entries of each head's ``head_size`` block of the
    input (``len(head_dims) * head_size`` features), then ``nn.Linear(sum(head_dims) ->
    out_features)``. ``compact``: the input holds only the kept entries (``sum(head_dims)``
    features, equal head dims), nothing to select."""

    def __init__(self, head_dims: Sequence[int], head_size: int, out_features: int,
                 bias: bool = True, *, compact: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self.head_dims, self.head_size = _head_dims(head_dims, head_size, compact)
        self.compact = bool(compact)
        self.in_features = sum(self.head_dims) if compact else \
            len(self.head_dims) * self.head_size
        self.out_features = int(out_features)
        self.linear = nn.Linear(sum(self.head_dims), out_features, bias=bias, device=device,
                                dtype=dtype)
        self.register_buffer("index", kept_index(self.head_dims, self.head_size, device),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x if self.compact else x.index_select(-1, self.index))

    def extra_repr(self) -> str:
        return f"head_dims={self.head_dims}, head_size={self.head_size}, " \
               f"out_features={self.out_features}, compact={self.compact}"


# ----------------------------------------------------------------------------- compact values

#: Llama-family attention classes whose forward :func:`compact_attention` generalises, and
#: the transformers release from which it follows their forward (older ones pad instead).
ROPE_ATTENTIONS = ("LlamaAttention", "Qwen2Attention", "MistralAttention")
COMPACT_TRANSFORMERS = (5, 25)
#: Opt in to compact value heads (set before compressing or loading). Off by default: on
#: CPU, torch's fused SDPA kernel needs the value head dim equal to the query's, so compact
#: heads run attention on its unfused path, which costs about what the padding saved
#: (SmolLM2 decode at batch 1: no measurable difference, BENCHMARKS.md) and materialises
#: the attention matrix on long prompts. What it does buy: a smaller value KV cache.
COMPACT_VALUES = False


def _stock_class(cls: type) -> type:
    return getattr(cls, "rmtkd_stock_class", cls)


def _transformers_version() -> tuple[int, int]:
    import re

    import transformers

    major, minor = (transformers.__version__.split(".") + ["0"])[:2]
    return int(major), int(re.match(r"\d*", minor).group() or 0)


def supports_compact_values(attention: nn.Module) -> bool:
    """Whether ``attention`` (a block's attention module) can read value heads narrower
    than its ``head_dim`` (:func:`compact_attention`): a Llama-family attention under
    transformers >= 5.25 (and :data:`COMPACT_VALUES`). Others read zero-padded value
    heads."""
    return COMPACT_VALUES and _stock_class(type(attention)).__name__ in ROPE_ATTENTIONS \
        and _transformers_version() >= COMPACT_TRANSFORMERS


def _compact_rope_forward(self, hidden_states: torch.Tensor,
                          position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                          attention_mask: torch.Tensor | None = None, cache: Any = None,
                          **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """The stock Llama-family attention forward, but the value heads take v_proj's width
    (``v_proj`` out / kv heads) instead of ``head_dim``; q and k (RoPE) are unchanged."""
    import sys

    stock = sys.modules[_stock_class(type(self)).__module__]
    cache = kwargs.pop("past_key_values", cache)
    shape = hidden_states.shape[:-1]
    q = self.q_proj(hidden_states).view(*shape, -1, self.head_dim).transpose(1, 2)
    k = self.k_proj(hidden_states).view(*shape, -1, self.head_dim).transpose(1, 2)
    v = self.v_proj(hidden_states).view(*shape, k.shape[1], -1).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = stock.apply_rotary_pos_emb(q, k, cos, sin)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
    attend = stock.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                        stock.eager_attention_forward)
    window = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
    if window is not None:
        kwargs["sliding_window"] = window
    out, weights = attend(self, q, k, v, attention_mask,
                          dropout=0.0 if not self.training else self.attention_dropout,
                          scaling=self.scaling, **kwargs)
    return self.o_proj(out.reshape(*shape, -1).contiguous()), weights


_COMPACT: dict[type, type] = {}


def compact_attention(attention: nn.Module) -> nn.Module:
    """Let ``attention`` read value heads of v_proj's width, in place (its class becomes a
    subclass with :func:`_compact_rope_forward`; with full-width value heads it computes
    what the stock forward does). Returns ``attention``."""
    base = _stock_class(type(attention))
    cls = _COMPACT.get(base)
    if cls is None:
        cls = type(base.__name__ + "CompactValues", (base,),
                   {"forward": _compact_rope_forward, "rmtkd_stock_class": base,
                    "__module__": __name__,
                    "__doc__": f"{base.__name__} reading value heads of v_proj's width."})
        _COMPACT[base] = cls
    attention.__class__ = cls
    return attention


class ProjectedLinear(nn.Module):
    """``y = (x @ V) @ W.T + bias``: a rank-``rank`` linear map through the columns of ``V``.

    Parameters: ``V`` (in_features, rank), initialised with orthonormal columns; ``W``
    (out_features, rank), initialised like ``nn.Linear``'s weight with fan-in ``rank``;
    ``bias`` (out_features,) or None. (``rmtkd.nn.ProjectedLinear`` is this module with
    argument checks and a choice of kernels.)
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = (int(in_features), int(out_features),
                                                          int(rank))
        if not 1 <= self.rank <= self.in_features or self.out_features < 1:
            raise ValueError(f"ProjectedLinear: need 1 <= rank <= in_features and "
                             f"out_features >= 1; got in_features={in_features}, "
                             f"out_features={out_features}, rank={rank}")
        kw = {"device": device, "dtype": dtype}
        self.V = nn.Parameter(torch.empty(self.in_features, self.rank, **kw))
        self.W = nn.Parameter(torch.empty(self.out_features, self.rank, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, **kw))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """V: orthonormal columns (QR of a Gaussian, in fp32); W and bias as nn.Linear would
        initialise a (out_features x rank) layer."""
        if self.V.device.type == "meta":
            return
        with torch.no_grad():
            g = torch.randn(self.in_features, self.rank, dtype=torch.float32,
                            device=self.V.device)
            q, r = torch.linalg.qr(g)
            self.V.copy_(q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0))  # Haar-uniform
        nn.init.kaiming_uniform_(self.W, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.rank)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x @ self.V, self.W, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}")


class FactorizedEmbedding(nn.Module):
    """A token-embedding table of rank ``rank``: ``proj(embed(ids))``, i.e. the rows of the
    (num_embeddings x rank) table ``embed.weight`` mapped to ``embedding_dim`` by the
    Linear ``proj`` (weight (embedding_dim x rank), bias (embedding_dim,)).
    ``(V x d) -> (V x k) + (k x d) + d`` parameters. ``padding_idx`` as nn.Embedding's
    (its row gets no gradient)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int,
                 padding_idx: int | None = None, *, device=None, dtype=None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.rank = (
            int(num_embeddings), int(embedding_dim), int(rank))
        if not 1 <= self.rank <= self.embedding_dim:
            raise ValueError(f"FactorizedEmbedding: need 1 <= rank <= embedding_dim = "
                             f"{embedding_dim}; got rank={rank}")
        kw = {"device": device, "dtype": dtype}
        self.padding_idx = padding_idx
        self.embed = nn.Embedding(self.num_embeddings, self.rank, padding_idx=padding_idx,
                                  **kw)
        self.proj = nn.Linear(self.rank, self.embedding_dim, **kw)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(ids))

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"rank={self.rank}, padding_idx={self.padding_idx}")


def reshape_embedding(model: nn.Module, path: str, record: dict) -> None:
    """Replace the token embedding at ``path`` by a :class:`FactorizedEmbedding` of the
    recorded ``{"rank": k}`` (a no-op when it already is one of that rank)."""
    old = get(model, path)
    rank = int(record["rank"])
    if isinstance(old, FactorizedEmbedding) and old.rank == rank:
        return
    if not isinstance(old, (nn.Embedding, FactorizedEmbedding)):
        raise ValueError(f"{EMBEDDING_KEY}: {path!r} is not an embedding of "
                         f"{type(model).__name__}")
    ref = _weight(old) if isinstance(old, nn.Embedding) else old.proj.weight
    new = FactorizedEmbedding(old.num_embeddings, old.embedding_dim, rank,
                              getattr(old, "padding_idx", None), device=ref.device,
                              dtype=ref.dtype)
    set_attr(model, path, new.train(old.training))


class MixedRMSNorm(nn.Module):
    """``(x / rms(x) * weight) @ mix.T``: an RMSNorm of ``hidden_size`` (computed in fp32
    like transformers' Llama norm) followed by a (hidden_size x hidden_size) linear mix."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, device=None, dtype=None
                 ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(hidden_size, **kw))
        self.mix = nn.Parameter(torch.empty(hidden_size, hidden_size, **kw))
        self.variance_epsilon = float(eps)
        if self.mix.device.type != "meta":
            with torch.no_grad():
                self.mix.copy_(torch.eye(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return ((self.weight.float() * h) @ self.mix.float().T).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"


def reshape_final_norm(model: nn.Module, path: str, record: dict) -> None:
    """Replace the final norm at ``path`` by a :class:`MixedRMSNorm` when ``record``
    (``config.rmtkd_residual``) says the norm carries a mix (a no-op when it already is)."""
    if not record.get("final_norm_mix"):
        return
    old = get(model, path)
    if isinstance(old, MixedRMSNorm):
        return
    w = getattr(old, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"{RESIDUAL_KEY}: {path!r} is not a norm of {type(model).__name__}")
    eps = getattr(old, "variance_epsilon", getattr(old, "eps", 1e-6))
    set_attr(model, path, MixedRMSNorm(w.shape[0], eps, device=w.device,
                                       dtype=w.dtype).train(old.training))


# ----------------------------------------------------------------------------- walking

def get(module: Any, rel: str) -> Any:
    """The attribute at the dotted path ``rel`` ("" = ``module``); None when missing."""
    obj = module
    for part in rel.split(".") if rel else ():
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def set_attr(module: nn.Module, rel: str, value: Any) -> None:
    """Set the attribute (a submodule or a plain value) at the dotted path ``rel``."""
    parent, _, child = rel.rpartition(".")
    owner = get(module, parent)
    if owner is None:
        raise AttributeError(f"{type(module).__name__} has no {parent!r}")
    setattr(owner, child, value)


def module_has_bias(m: Any) -> bool:
    """Whether a (possibly reduced) projection has a bias."""
    inner = m.linear if isinstance(m, _HeadIndexed) else m
    return getattr(inner, "bias", None) is not None


def _weight(m: nn.Module) -> torch.Tensor:
    for name in ("weight", "W"):
        w = getattr(m, name, None)
        if isinstance(w, torch.Tensor):
            return w
    if isinstance(getattr(m, "linear", None), nn.Linear):
        return m.linear.weight
    return next(m.parameters())


def _new_linear(n_in: int, n_out: int, like: nn.Module, bias: bool, empty: bool
                ) -> nn.Linear:
    ref = _weight(like)
    kw = {"bias": bool(bias), "device": ref.device, "dtype": ref.dtype}
    layer = (nn.utils.skip_init(nn.Linear, int(n_in), int(n_out), **kw) if empty
             else nn.Linear(int(n_in), int(n_out), **kw))
    return layer.train(like.training)


def _features(m: Any, attr: str, where: str) -> int:
    v = getattr(m, attr, None)
    if not isinstance(v, int):
        raise ValueError(f"rmtkd reshape: {where} has no integer {attr}")
    return v


def reshape_block(block: nn.Module, spec: dict, widths: dict, *, index: int = 0,
                  projected: Callable[..., nn.Module] | None = None, empty: bool = False
                  ) -> nn.Module:
    """Reshape one block to its width record ``widths`` with the relative paths of its
    layout entry ``spec`` (see the module docstring). New modules take the device, dtype and
    training mode of those they replace; ``empty``: narrowed ``nn.Linear`` are left
    uninitialised (weights to be loaded); ``projected``: the ProjectedLinear class (default
    :class:`ProjectedLinear`). Returns ``block``."""
    projected = projected or ProjectedLinear
    bias = widths.get("biases") or {}

    def has(rel: str) -> bool:
        return bool(bias.get(rel, module_has_bias(get(block, rel))))

    producers, consumer = list(spec["mlp_producers"]), spec["mlp_consumer"]
    size = widths.get("mlp")
    if size is not None and int(size) != _features(get(block, consumer), "in_features",
                                                   consumer):
        for p in producers:
            old = get(block, p)
            set_attr(block, p, _new_linear(_features(old, "in_features", p), int(size), old,
                                           has(p), empty))
        old = get(block, consumer)
        set_attr(block, consumer, _new_linear(int(size), _features(old, "out_features",
                                                                   consumer),
                                              old, has(consumer), empty))
        for attr in spec.get("mlp_width_attrs") or ():
            if isinstance(get(block, attr), int):
                set_attr(block, attr, int(size))
    # the head size (a head width cut), then the value heads of that size
    head_dim = int(widths.get("head_size") or spec["head_dim"])
    attrs = spec.get("head_size_attrs") or ()
    if attrs and get(block, attrs[0]) != head_dim:
        heads, kv_heads = int(spec["heads"]), int(spec["kv_heads"])
        for rel, n in ((spec["q"], heads), (spec["k"], kv_heads), (spec["v"], kv_heads)):
            old = get(block, rel)
            set_attr(block, rel, _new_linear(_features(old, "in_features", rel),
                                             n * head_dim, old, has(rel), empty))
        old = get(block, spec["o"])
        set_attr(block, spec["o"], _new_linear(heads * head_dim, _features(
            old, "out_features", spec["o"]), old, has(spec["o"]), empty))
        set_head_size(block, attrs, heads, head_dim)
    dims = widths.get("value_heads")
    if dims is not None:
        # the heads kept (whole heads may be removed), else the layout's
        heads = int(widths.get("heads") or spec["heads"])
        kv_heads = int(widths.get("kv_heads") or spec["kv_heads"])
        group = heads // kv_heads
        if len(dims) != kv_heads:
            raise ValueError(f"recorded value head dims {dims} do not match {kv_heads} "
                             f"key-value heads of block {index}")
        for rel, n in ((spec["q"], heads), (spec["k"], kv_heads)):
            old = get(block, rel)
            if type(old) is nn.Linear and old.out_features != n * head_dim:
                set_attr(block, rel, _new_linear(old.in_features, n * head_dim, old,
                                                 has(rel), empty))
        v_rel, o_rel = spec["v"], spec["o"]
        v, o = get(block, v_rel), get(block, o_rel)
        rv, ro = _weight(v), _weight(o)
        attention = get(block, v_rel.rpartition(".")[0])
        compact = uniform_dims(dims) and supports_compact_values(attention)
        if compact:
            compact_attention(attention)
        set_attr(block, v_rel, HeadPaddedLinear(
            _features(v, "in_features", v_rel), dims, head_dim, bias=has(v_rel),
            compact=compact, device=rv.device, dtype=rv.dtype).train(v.training))
        set_attr(block, o_rel, HeadSelectLinear(
            [dims[h // group] for h in range(heads)], head_dim,
            _features(o, "out_features", o_rel), bias=has(o_rel), compact=compact,
            device=ro.device, dtype=ro.dtype).train(o.training))
    ranks = widths.get("ranks") or {}
    for rel in spec["linears"]:
        mod = get(block, rel)
        if rel in ranks:
            ref = _weight(mod)
            set_attr(block, rel, projected(
                _features(mod, "in_features", rel), _features(mod, "out_features", rel),
                int(ranks[rel]), bias=has(rel), device=ref.device,
                dtype=ref.dtype).train(mod.training))
        elif type(mod) is nn.Linear and has(rel) != (mod.bias is not None):
            set_attr(block, rel, _new_linear(mod.in_features, mod.out_features, mod,
                                             has(rel), empty))
    return block


def set_head_size(module: nn.Module, attrs: Sequence[str], heads: int, size: int) -> None:
    """Set the head size attributes ``attrs`` (paths relative to ``module``) to ``size``,
    and an ``all_head_size`` beside each, where there is one, to heads x size."""
    for attr in attrs:
        set_attr(module, attr, int(size))
        parent = attr.rpartition(".")[0]
        total = f"{parent}.all_head_size" if parent else "all_head_size"
        if isinstance(get(module, total), int):
            set_attr(module, total, int(heads * size))


def _config_value(config: Any, key: str) -> Any:
    if config is None:
        return None
    if isinstance(config, dict):
        return config.get(key)
    return getattr(config, key, None)


def reshape_stream(model: nn.Module, record: dict, *, empty: bool = False) -> None:
    """Reshape ``model``'s residual stream to the units of ``record`` (see the module
    docstring; a no-op for modules already of that shape)."""
    k, d = len(record["units"]), int(record["hidden_size"])

    def norm(old: nn.Module) -> nn.Module:
        ref = getattr(old, "weight", None)
        kw = {"device": None if ref is None else ref.device,
              "dtype": None if ref is None else ref.dtype}
        return nn.LayerNorm(k, eps=old.eps, elementwise_affine=ref is not None,
                            bias=getattr(old, "bias", None) is not None, **kw
                            ).train(old.training)

    for path in record["tables"]:
        old = get(model, path)
        if isinstance(old, nn.Embedding) and old.embedding_dim != k:
            set_attr(model, path, nn.Embedding(
                old.num_embeddings, k, padding_idx=old.padding_idx, device=old.weight.device,
                dtype=old.weight.dtype).train(old.training))
    for path in record["norms"]:
        old = get(model, path)
        if isinstance(old, nn.LayerNorm) and old.normalized_shape != (k,):
            new = norm(old)
            if path == record.get("lift"):
                new = nn.Sequential(new, _new_linear(k, d, old, True, empty))
            set_attr(model, path, new)
    for path in record["readers"]:
        old = get(model, path)
        if type(old) is nn.Linear and old.in_features != k:
            set_attr(model, path, _new_linear(k, old.out_features, old, True, empty))
    for path in record["writers"]:
        old = get(model, path)
        if type(old) is nn.Linear and old.out_features != k:
            set_attr(model, path, _new_linear(old.in_features, k, old, old.bias is not None,
                                              empty))


def _layout_path(layout: Any, key: str, record: str) -> str:
    """The full module name ``layout[key]`` that the config record ``record`` needs."""
    path = layout.get(key) if isinstance(layout, dict) else None
    if not isinstance(path, str):
        raise ValueError(f"the config records {record} but its layout ({LAYOUT_KEY}) names "
                         f"no {key!r} path; save the model again with a current rmtkd")
    return path


def reshape(model: nn.Module, blocks: list[dict] | None = None, layout: dict | None = None,
            *, projected: Callable[..., nn.Module] | None = None, empty: bool = False
            ) -> nn.Module:
    """Reshape a freshly built model to the recorded widths ``blocks`` (default
    ``model.config.rmtkd_blocks``) using ``layout`` (default ``model.config.rmtkd_layout``),
    in place, so that the reduced state dict loads with ``strict=True``; also the
    factorised embedding (``rmtkd_embedding``) and the final-norm mix (``rmtkd_residual``).
    Nothing happens without these records. Returns ``model``.

    Raises:
        ValueError: widths without a layout, or widths and layout that do not fit.
    """
    config = getattr(model, "config", None)
    if blocks is None:
        blocks = _config_value(config, BLOCKS_KEY)
    embedding = _config_value(config, EMBEDDING_KEY)
    residual = _config_value(config, RESIDUAL_KEY)
    if not blocks and not embedding and not residual:
        return model
    if layout is None:
        layout = _config_value(config, LAYOUT_KEY)
    if residual and residual.get("units") is not None:
        reshape_stream(model, residual, empty=empty)
    if residual and residual.get("final_norm_mix"):
        reshape_final_norm(model, _layout_path(layout, "final_norm", RESIDUAL_KEY),
                           residual)
    if embedding:
        reshape_embedding(model, _layout_path(layout, "embedding", EMBEDDING_KEY), embedding)
    if not blocks:
        return model
    if not isinstance(layout, dict) or not isinstance(layout.get("blocks"), list):
        raise ValueError(f"the config records reduced widths ({BLOCKS_KEY}) but no block "
                         f"layout ({LAYOUT_KEY}); save the model again with a current rmtkd")
    if int(layout.get("version", 1)) > LAYOUT_VERSION:
        raise ValueError(f"{LAYOUT_KEY} version {layout.get('version')} is newer than this "
                         f"modeling file reads ({LAYOUT_VERSION})")
    entries = layout["blocks"]
    if len(blocks) != len(entries):
        raise ValueError(f"recorded widths cover {len(blocks)} blocks; the model has "
                         f"{len(entries)}")
    for i, (spec, w) in enumerate(zip(entries, blocks)):
        block = get(model, spec.get("path", ""))
        if not isinstance(block, nn.Module):
            raise ValueError(f"{LAYOUT_KEY}: block {i} {spec.get('path')!r} is not a module "
                             f"of {type(model).__name__}")
        reshape_block(block, spec, w, index=i, projected=projected, empty=empty)
    return model


def refresh_buffers(model: nn.Module) -> nn.Module:
    """Recompute the (non-persistent) index buffers of every head module of ``model``."""
    for m in model.modules():
        if isinstance(m, _HeadIndexed):
            m.refresh_index()
    return model


# ----------------------------------------------------------------------------- classes

_CLASSES: dict[str, type] = {}


def rmtkd_model_class(base: type | str) -> type:
    """``Rmtkd<base>``: the transformers class ``base`` (a class or its name) whose
    ``__init__`` reshapes the freshly built model with :func:`reshape` (from its config)
    before any weight is loaded, and whose ``from_pretrained`` rebuilds the head index
    buffers after loading."""
    if isinstance(base, str):
        import transformers

        cls = getattr(transformers, base, None)
        if not isinstance(cls, type):
            raise AttributeError(f"transformers {transformers.__version__} has no model "
                                 f"class {base!r}")
        base = cls
    name = CLASS_PREFIX + base.__name__
    made = _CLASSES.get(name)
    if made is not None and made.__bases__[0] is base:
        return made

    class RmtkdModel(base):   # type: ignore[misc, valid-type]
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            reshape(self)

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            out = super().from_pretrained(*args, **kwargs)
            refresh_buffers(out[0] if isinstance(out, tuple) else out)
            return out

    RmtkdModel.__name__ = RmtkdModel.__qualname__ = name
    RmtkdModel.__module__ = __name__
    RmtkdModel.__doc__ = (f"transformers.{base.__name__} reshaped to the widths recorded by "
                          f"rmtkd ({BLOCKS_KEY} / {LAYOUT_KEY} of its config).")
    _CLASSES[name] = RmtkdModel
    return RmtkdModel


def __getattr__(name: str) -> type:
    """``Rmtkd<Class>`` made on first access (``auto_map`` names these)."""
    if name.startswith(CLASS_PREFIX) and len(name) > len(CLASS_PREFIX):
        cls = rmtkd_model_class(name[len(CLASS_PREFIX):])
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
