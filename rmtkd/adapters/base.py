"""What an architecture adapter says about a model, as plain records.

An adapter (one module per family in :mod:`rmtkd.adapters`) names a model's structure once:
its transformer blocks with, per block, the norms, the attention projections (heads,
key-value groups) and the MLP (plain or gated), plus the embeddings, final norm and head;
and the *coupled dimensions* a reduction acts on, each with every module that reads or
writes it. Surgery (:mod:`rmtkd.reduce`), capture sites, save/load and the block-wise path
ask the adapter and never name a model class or an attribute path themselves.

Names inside a :class:`BlockSpec` are relative to the block module; :attr:`BlockSpec.name`
is the block's name in ``model.named_modules()`` ("" for a bare block).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

NORM_KINDS = ("layernorm", "rmsnorm")
DIM_KINDS = ("mlp_width", "value_width", "head_width", "embedding_rank", "residual_width")


class UnsupportedArchitectureError(ValueError):
    """No adapter recognises the model (the message says what is missing and how to add
    an adapter)."""


@dataclass(frozen=True)
class NormSpec:
    """A normalisation inside a block: ``kind`` "layernorm" / "rmsnorm"; ``placement``
    "pre" (normalises a sub-layer's input) or "post" (after the residual add)."""

    name: str
    kind: str
    placement: Literal["pre", "post"]


@dataclass(frozen=True)
class AttentionSpec:
    """Self-attention: the q/k/v/o projections, ``heads`` query heads of ``head_dim``,
    ``kv_heads`` key-value heads (``heads // kv_heads`` query heads share one), and which
    activation carries the value width: ``value_site`` ("v_output": v's output, per
    key-value head; "o_input": o's input, the concatenated per-head contexts)."""

    q: str
    k: str
    v: str
    o: str
    heads: int
    kv_heads: int
    head_dim: int
    value_site: Literal["v_output", "o_input"] = "v_output"

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class MLPSpec:
    """The feed-forward: ``producers`` write the inner width (plain: one; gated:
    ``(gate, up)`` with ``consumer(act(gate(x)) * up(x))``), ``consumer`` reads it, ``act``
    the elementwise activation module between them."""

    producers: tuple[str, ...]
    consumer: str
    act: str | None
    gated: bool = False


@dataclass(frozen=True)
class BlockSpec:
    """One transformer block (names relative to it; ``name`` is the block's own)."""

    name: str
    index: int
    attention: AttentionSpec
    mlp: MLPSpec
    norms: tuple[NormSpec, ...] = ()

    def full(self, rel: str) -> str:
        """The module name of ``rel`` in the whole model."""
        return f"{self.name}.{rel}" if self.name else rel

    @property
    def linears(self) -> tuple[str, ...]:
        a, m = self.attention, self.mlp
        return (a.q, a.k, a.v, a.o, *m.producers, m.consumer)


@dataclass(frozen=True)
class CoupledDim:
    """A dimension that one cut changes in several modules at once.

    ``kind``: "mlp_width" (a block's MLP inner width), "value_width" (the value width per
    key-value head), "head_width" (one head size for a block's queries, keys and values,
    captured at the attention's input; :mod:`rmtkd.reduce.attention`), "embedding_rank" (the rank of the token-embedding table; ``block``
    None) or "residual_width" (the hidden units of a post-norm encoder's residual stream,
    :class:`StreamSpec`; ``block`` None, ``capture`` its first state). ``capture``: the module whose ``where`` ("input"/"output") activation is
    analysed; ``writers`` / ``readers``: the modules (full names) that produce and consume
    the dimension.
    """

    kind: str
    block: BlockSpec | None
    capture: str
    where: Literal["input", "output"]
    writers: tuple[str, ...]
    readers: tuple[str, ...]

    @property
    def site_name(self) -> str:
        return f"{self.capture}:{self.where}"


@dataclass(frozen=True)
class StreamSpec:
    """The residual stream of a post-norm encoder, as one width cut keeps k of its d units
    (full module names). ``tables``: the embedding tables summed into it (their columns are
    cut); ``states``: the norms whose outputs are the stream, in execution order;
    ``readers[i]``: the Linears reading state i (their input columns); ``writers``: the
    Linears adding into a residual sum (their output rows); ``lift``: the last state, mapped
    back to d units because the model's output carries it (None where only ``readers`` of
    the last state consume it, e.g. a pooler)."""

    tables: tuple[str, ...]
    states: tuple[str, ...]
    readers: tuple[tuple[str, ...], ...]
    writers: tuple[str, ...]
    lift: str | None


@dataclass(frozen=True)
class ModelStructure:
    """The whole model as the adapter sees it (full module names; None where absent)."""

    family: str
    blocks: tuple[BlockSpec, ...]
    embeddings: str | None = None
    final_norm: str | None = None
    head: str | None = None
    extra: dict = field(default_factory=dict)


def get(module: nn.Module, rel: str) -> Any:
    """``module``'s attribute at the dotted path ``rel`` (modules or plain attributes);
    None when any part is missing."""
    obj: Any = module
    for part in rel.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj
