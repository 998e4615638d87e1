"""Architecture adapters: one module per model family, naming its structure once.

- :mod:`rmtkd.adapters.bert`: BERT encoders (BertModel, BertForSequenceClassification, the
  MiniLM sentence encoder, and whatever shares the layer layout);
- :mod:`rmtkd.adapters.llama`: Llama-family decoders (Llama, Qwen2, Mistral), with the
  pieces the block-wise path needs;
- :mod:`rmtkd.adapters.sequential`: plain MLP chains and ResNet-style CNNs (Linear / Conv2d
  producer -> consumer chains).

:func:`adapter_for` picks the adapter of a model. A Hugging Face model (one with a
``config.model_type``) that no transformer adapter recognises is refused with
:class:`UnsupportedArchitectureError`, naming what was looked for; adding a family is one
module with a :class:`~rmtkd.adapters.transformer.Layout` (see the README, "Adding an
architecture").
"""
from __future__ import annotations

from torch import nn

from .base import (AttentionSpec, BlockSpec, CoupledDim, MLPSpec, ModelStructure, NormSpec,
                   StreamSpec, UnsupportedArchitectureError, get)
from .bert import BertAdapter
from .llama import LlamaAdapter
from .sequential import SequentialAdapter
from .transformer import Layout, TransformerAdapter

#: transformer adapters, tried in order
ADAPTERS: list[TransformerAdapter] = [BertAdapter(), LlamaAdapter()]

__all__ = ["ADAPTERS", "AttentionSpec", "BlockSpec", "CoupledDim", "Layout", "MLPSpec",
           "ModelStructure", "NormSpec", "SequentialAdapter", "StreamSpec", "TransformerAdapter",
           "UnsupportedArchitectureError", "adapter_for", "block_modules", "get",
           "hf_classes", "register_adapter"]


def register_adapter(adapter: TransformerAdapter) -> None:
    """Add a transformer adapter (tried before the built-in ones)."""
    ADAPTERS.insert(0, adapter)


def hf_classes() -> tuple[str, ...]:
    """Every transformers class name that save/load can rebuild."""
    return tuple(c for a in ADAPTERS for c in a.hf_classes)


def adapter_for(model: nn.Module, *, strict: bool = True
                ) -> TransformerAdapter | SequentialAdapter:
    """The adapter of ``model``: the first transformer adapter that finds blocks in it,
    else the sequential one.

    Raises:
        UnsupportedArchitectureError: (``strict``) a Hugging Face model (``config.model_type``)
            in which no transformer adapter finds a block.
    """
    for ad in ADAPTERS:
        if ad.matches(model):
            return ad
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if strict and isinstance(model_type, str):
        looked = "; ".join(a.describe() for a in ADAPTERS)
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} (model_type {model_type!r}) has no block that an rmtkd "
            f"adapter recognises. Looked for: {looked}. To support it, add an adapter: a "
            f"Layout naming its block's projections, norms and head size "
            f"(rmtkd.adapters.register_adapter; README 'Adding an architecture')")
    return SequentialAdapter()


def block_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every transformer block of ``model`` (empty without)."""
    ad = adapter_for(model, strict=False)
    return ad.block_modules(model) if isinstance(ad, TransformerAdapter) else []
