"""The shared part of the transformer adapters: a :class:`Layout` (the relative paths of one
family's block) and :class:`TransformerAdapter`, which finds the blocks of a model by that
layout and derives their specs and coupled dimensions.

A block is recognised by structure (every path of the layout resolves to a module), not by
class, so reduced blocks (narrower Linears, head-padded values, ProjectedLinear) and models
that embed the family's blocks (a sentence encoder wrapping a BertModel) are found too.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Sequence

from torch import nn

from .base import (AttentionSpec, BlockSpec, CoupledDim, MLPSpec, ModelStructure, NormSpec,
                   StreamSpec, UnsupportedArchitectureError, get)


@dataclass(frozen=True)
class Layout:
    """Relative paths of one family's block and where its sizes live."""

    family: str
    q: str
    k: str
    v: str
    o: str
    head_dim_attr: str            # int attribute: the head dimension
    mlp_producers: tuple[str, ...]
    mlp_consumer: str
    mlp_act: str | None
    gated: bool
    norms: tuple[NormSpec, ...]
    value_site: str               # "v_output" or "o_input"
    value_norm: str | None = None   # a norm applied to the values (blocks the value cut)
    embeddings: str | None = None   # relative to the model that holds the blocks' list
    token_embedding: str | None = None   # the token-embedding table (nn.Embedding), ditto
    final_norm: str | None = None
    head: str | None = None
    #: integer attributes (relative to the block) that hold the MLP inner width and follow
    #: it when it is cut; None: ``intermediate_size`` of the module holding the consumer,
    #: where that is an int
    mlp_width_attrs: tuple[str, ...] | None = None
    #: post-norm families whose residual stream can be cut by unit selection: the norm of
    #: the embeddings (relative to ``embeddings``) and the pooler's Linear (relative to the
    #: model that holds the blocks' list's parent), else None
    embedding_norm: str | None = None
    pooler: str | None = None
    #: model classes whose output reads the last state only through the pooler (no lift)
    pooled_classes: tuple[str, ...] = ()
    #: the attention reads its head size from ``head_dim_attr`` at run time and has no
    #: rotary embedding tied to it, so a block may take a smaller one (the head width cut)
    head_size_cut: bool = False

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.q, self.k, self.v, self.o, *self.mlp_producers, self.mlp_consumer,
                *(n.name for n in self.norms))


def _features(m: Any, attr: str) -> int | None:
    v = getattr(m, attr, None)
    return int(v) if isinstance(v, int) else None


class TransformerAdapter:
    """An adapter for one family of transformer blocks (see :class:`Layout`).

    Subclasses set ``layout``, ``hf_classes`` (transformers classes that save/load rebuild)
    and may add family-specific helpers (e.g. the decoders' block-wise pieces)."""

    layout: Layout
    hf_classes: tuple[str, ...] = ()
    #: where an unsupported model's message points (README section)
    name: str = "transformer"

    # ------------------------------------------------------------------ structure
    def is_block(self, module: nn.Module) -> bool:
        """Whether ``module`` is a block of this family (every layout path resolves)."""
        return (all(isinstance(get(module, p), nn.Module) for p in self.layout.paths)
                and isinstance(get(module, self.layout.head_dim_attr), int))

    def block_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of every block, in registration (= execution) order."""
        return [(n, m) for n, m in model.named_modules() if self.is_block(m)]

    def matches(self, model: nn.Module) -> bool:
        return bool(self.block_modules(model))

    def block_spec(self, block: nn.Module, name: str = "", index: int = 0) -> BlockSpec:
        """The :class:`BlockSpec` of ``block`` from its current module shapes.

        Raises:
            UnsupportedArchitectureError: inconsistent head shapes.
        """
        L = self.layout
        hd = int(get(block, L.head_dim_attr))
        o, k, v = get(block, L.o), get(block, L.k), get(block, L.v)
        # per-head value modules count their padded layout (compact ones compute less)
        n_q, n_kv, n_v = (_features(o, "padded_features") or _features(o, "in_features"),
                          _features(k, "out_features"),
                          _features(v, "padded_features") or _features(v, "out_features"))
        ok = (n_q is not None and n_kv is not None and hd > 0 and n_q % hd == 0
              and n_kv % hd == 0 and n_kv > 0 and n_v == n_kv
              and (n_q // hd) % (n_kv // hd) == 0)
        if not ok:
            raise UnsupportedArchitectureError(
                f"{self.name} block {name or '(root)'}: {L.o} inputs {n_q}, {L.k} outputs "
                f"{n_kv}, {L.v} outputs {n_v} do not fit heads x head_dim={hd} with query "
                f"heads a multiple of key-value heads")
        attn = AttentionSpec(L.q, L.k, L.v, L.o, n_q // hd, n_kv // hd, hd, L.value_site)
        mlp = MLPSpec(L.mlp_producers, L.mlp_consumer, L.mlp_act, L.gated)
        return BlockSpec(name, index, attn, mlp, L.norms)

    def blocks(self, model: nn.Module) -> list[BlockSpec]:
        return [self.block_spec(m, n, i) for i, (n, m) in enumerate(self.block_modules(model))]

    def structure(self, model: nn.Module) -> ModelStructure:
        blocks = tuple(self.blocks(model))
        L = self.layout
        named = dict(model.named_modules())

        def find(rel: str | None) -> str | None:
            if rel is None:
                return None
            hits = [n for n in named if n == rel or n.endswith("." + rel)]
            return hits[0] if hits else None

        return ModelStructure(L.family, blocks, find(L.embeddings), find(L.final_norm),
                              find(L.head))

    def token_embedding(self, model: nn.Module) -> str | None:
        """The full name of ``model``'s token-embedding table (an ``nn.Embedding`` or an
        already factorised one), or None where the layout names none or ``model`` (e.g. a
        bare block) does not hold it."""
        rel = self.layout.token_embedding
        if rel is None:
            return None
        for n, m in model.named_modules():
            if (n == rel or n.endswith("." + rel)) and hasattr(m, "num_embeddings"):
                return n
        return None

    def final_norm(self, model: nn.Module) -> str | None:
        """The full name of ``model``'s final norm (after the last block), or None where
        the layout names none or ``model`` does not hold it."""
        rel = self.layout.final_norm
        if rel is None:
            return None
        blocks = [n for n, _ in self.block_modules(model)]
        for n, m in model.named_modules():
            if (n == rel or n.endswith("." + rel)) and hasattr(m, "weight") and \
                    not any(n.startswith(b + ".") for b in blocks):
                return n
        return None

    def tied_embedding(self, model: nn.Module) -> bool:
        """Whether another module of ``model`` shares the token-embedding table (a decoder's
        tied lm_head): a cut of its rank would have to cut both."""
        path = self.token_embedding(model)
        if path is None:
            return False
        w = getattr(model.get_submodule(path), "weight", None)
        return w is not None and any(
            p is w for n, p in model.named_parameters(remove_duplicate=False)
            if not n.startswith(path + "."))

    def mlp_width_attrs(self, block: nn.Module) -> tuple[str, ...]:
        """The integer attributes of ``block`` (relative paths) that hold its MLP inner
        width, to be updated when the width is cut (see :attr:`Layout.mlp_width_attrs`)."""
        L = self.layout
        if L.mlp_width_attrs is not None:
            cands: tuple[str, ...] = L.mlp_width_attrs
        else:
            owner = L.mlp_consumer.rpartition(".")[0]
            cands = (f"{owner}.intermediate_size" if owner else "intermediate_size",)
        return tuple(a for a in cands if isinstance(get(block, a), int)
                     and not isinstance(get(block, a), bool))

    def head_size_attrs(self) -> tuple[str, ...]:
        """The block attributes that hold the head size and follow a head width cut (empty:
        the family does not take one)."""
        return (self.layout.head_dim_attr,) if self.layout.head_size_cut else ()

    def layout_record(self, model: nn.Module) -> dict:
        """A JSON-able record of where the blocks of ``model`` are and what they hold, for
        :func:`rmtkd.hf.modeling_rmtkd.reshape` (which walks a model with these strings
        only, without rmtkd): ``{"format": "rmtkd-layout", "version", "family",
        "container"`` (the module holding the blocks as ``<container>.<i>``, or None)
        ``, "blocks": [...]}``, per block ``{"path"`` (its module name), ``"q", "k", "v",
        "o", "heads", "kv_heads", "head_dim", "group", "mlp_producers", "mlp_consumer",
        "linears"`` (relative paths of every projection) ``, "mlp_width_attrs",
        "head_size_attrs"}``, and the
        full names of the token embedding and the final norm (``"embedding"``,
        ``"final_norm"``; None where there is none)."""
        from ..hf.modeling_rmtkd import LAYOUT_FORMAT, LAYOUT_VERSION

        mods = self.block_modules(model)
        blocks = []
        for i, (name, block) in enumerate(mods):
            spec = self.block_spec(block, name, i)
            a, m = spec.attention, spec.mlp
            blocks.append({"path": name, "q": a.q, "k": a.k, "v": a.v, "o": a.o,
                           "heads": a.heads, "kv_heads": a.kv_heads, "head_dim": a.head_dim,
                           "group": a.group, "mlp_producers": list(m.producers),
                           "mlp_consumer": m.consumer, "linears": list(spec.linears),
                           "mlp_width_attrs": list(self.mlp_width_attrs(block)),
                           "head_size_attrs": list(self.head_size_attrs())})
        prefixes = {n.rpartition(".")[0] for n, _ in mods}
        container = prefixes.pop() if len(prefixes) == 1 else None
        if container is not None and [n.rpartition(".")[2] for n, _ in mods] != \
                [str(i) for i in range(len(mods))]:
            container = None
        return {"format": LAYOUT_FORMAT, "version": LAYOUT_VERSION,
                "family": self.layout.family, "container": container, "blocks": blocks,
                "embedding": self.token_embedding(model),
                "final_norm": self.final_norm(model)}

    def value_norm(self, block: nn.Module) -> bool:
        return self.layout.value_norm is not None and isinstance(
            get(block, self.layout.value_norm), nn.Module)

    def stream(self, model: nn.Module) -> StreamSpec | None:
        """The residual stream of a post-norm ``model`` (:class:`StreamSpec`), or None where
        the family has none to cut by units (pre-norm decoders: :mod:`rmtkd.reduce.residual`)
        or ``model`` does not hold its embeddings (a bare block)."""
        L = self.layout
        mods = self.block_modules(model)
        if L.embedding_norm is None or not mods or any(n.placement != "post" for n in L.norms):
            return None
        named = dict(model.named_modules())
        emb = [n for n in named if n == L.embeddings or n.endswith("." + L.embeddings)]
        if len(emb) != 1:
            return None
        emb = emb[0]
        tables = tuple(n for n, m in named.items() if n.startswith(emb + ".")   # children
                       and "." not in n[len(emb) + 1:] and hasattr(m, "num_embeddings"))
        states, readers, writers = [f"{emb}.{L.embedding_norm}"], [], []
        for name, block in mods:
            spec = self.block_spec(block, name)
            a, m = spec.attention, spec.mlp
            readers.append(tuple(spec.full(r) for r in (a.q, a.k, a.v)))
            states.append(spec.full(L.norms[0].name))
            readers.append(tuple(spec.full(p) for p in m.producers))
            states.append(spec.full(L.norms[1].name))
            writers.extend((spec.full(a.o), spec.full(m.consumer)))
        pooled = type(model).__name__ in L.pooled_classes
        pooler = [n for n in named if L.pooler and (n == L.pooler or
                                                    n.endswith("." + L.pooler))]
        readers.append(tuple(pooler) if pooled else ())
        return StreamSpec(tables, tuple(states), tuple(readers), tuple(writers),
                          None if pooled and pooler else states[-1])

    # ------------------------------------------------------------------ coupled dims
    def coupled_dims(self, model: nn.Module) -> list[CoupledDim]:
        """The residual-stream width (post-norm encoders that hold their embeddings), the
        token-embedding rank (where ``model`` holds an untied table), then per block, in
        execution order: the head width (families that take one), the value width, then the
        MLP inner width."""
        dims = []
        stream = self.stream(model)
        if stream is not None:
            dims.append(CoupledDim("residual_width", None, stream.states[0], "output",
                                   stream.tables + stream.writers,
                                   tuple(r for rs in stream.readers for r in rs)))
        emb = self.token_embedding(model)
        if emb is not None and not self.tied_embedding(model):
            dims.append(CoupledDim("embedding_rank", None, emb, "output", (emb,), ()))
        for spec in self.blocks(model):
            a, m = spec.attention, spec.mlp
            if self.layout.head_size_cut:
                dims.append(CoupledDim("head_width", spec, spec.full(a.q), "input",
                                       tuple(spec.full(n) for n in (a.q, a.k, a.v)),
                                       (spec.full(a.o),)))
            if a.value_site == "v_output":
                cap, where = a.v, "output"
            else:
                cap, where = a.o, "input"
            dims.append(CoupledDim("value_width", spec, spec.full(cap), where,
                                   (spec.full(a.v),), (spec.full(a.o),)))
            dims.append(CoupledDim("mlp_width", spec, spec.full(m.consumer), "input",
                                   tuple(spec.full(p) for p in m.producers),
                                   (spec.full(m.consumer),)))
        return dims

    def dim_for(self, model: nn.Module, site_name: str, module_name: str | None = None
                ) -> CoupledDim | None:
        """The coupled dimension analysed at ``site_name`` ("module:where"), else the one
        captured at the module ``module_name``; None when neither names one."""
        dims = self.coupled_dims(model)
        for d in dims:
            if d.site_name == site_name:
                return d
        for d in dims:
            if module_name is not None and d.capture == module_name:
                return d
        return None

    def select_dims(self, model: nn.Module, include: Sequence[str] | None
                    ) -> list[CoupledDim]:
        """The coupled dims that a pattern of ``include`` names (when None: all but the
        residual width, which changes the width of the model's hidden states, and the head
        width, both cut only when named): a kind ("mlp_width", "value_width",
        "head_width": every block's;
        "embedding_rank", "residual_width") or a glob of the capture module's name. They
        are cut in the order of the patterns that first name them (the schedule), in the
        adapter's order (shallow to deep) within one pattern.
        Raises ValueError for a pattern that matches none (listing the sites)."""
        dims = self.coupled_dims(model)
        if include is None:
            return [d for d in dims if d.kind not in ("residual_width", "head_width")]
        patterns = [include] if isinstance(include, str) else list(include)

        def hit(d: CoupledDim, p: str) -> bool:
            return p == d.kind or fnmatch.fnmatchcase(d.capture, p)

        for p in patterns:
            if not any(hit(d, p) for d in dims):
                names = ", ".join(d.capture for d in dims[:4])
                raise ValueError(
                    f"site pattern {p!r} matches no reducible dimension of this "
                    f"{self.layout.family} model; its sites are the residual-stream width "
                    f"(kind 'residual_width', post-norm encoders), the token-embedding rank "
                    f"(kind 'embedding_rank', where the table is not tied to the head) and "
                    f"the head width (BERT family), the value width and the MLP inner width "
                    f"of each block (kinds 'head_width', 'value_width', 'mlp_width'), named "
                    f"by the modules {names}, ...")
        # the schedule: in the order the patterns are listed, the adapter's order within one
        picked = [(min(i for i, p in enumerate(patterns) if hit(d, p)), j, d)
                  for j, d in enumerate(dims) if any(hit(d, p) for p in patterns)]
        return [d for _, _, d in sorted(picked, key=lambda t: t[:2])]

    def describe(self) -> str:
        L = self.layout
        return (f"{self.name} blocks ({', '.join(L.paths)}; head size "
                f"{L.head_dim_attr})")
