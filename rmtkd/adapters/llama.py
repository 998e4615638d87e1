"""Llama family: decoders with pre-norm RMSNorm blocks, grouped-query attention with rotary
positions and a gated MLP ``down_proj(act(gate_proj(x)) * up_proj(x))``: ``LlamaForCausalLM``,
``Qwen2ForCausalLM`` (biases on q/k/v) and ``MistralForCausalLM`` (sliding-window attention).

Coupled dimensions per block: the MLP inner width (read at ``mlp.down_proj``'s input) and
the value width per key-value head (read at ``self_attn.v_proj``'s output; each value head
is shared by ``heads // kv_heads`` query heads). A block that normalises its values
(``self_attn.v_norm``) has no value cut.

The block-wise path (:mod:`rmtkd.engine.blockwise`) runs one decoder layer at a time; the
:class:`Decoder` record of a family says which transformers classes build a layer and its
rotary embedding, how the causal mask of each layer is made, and the state-dict names of
the embedding, layers, final norm and head. Adding a family that shares this layout is one
entry in :data:`DECODERS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .base import NormSpec, UnsupportedArchitectureError
from .transformer import Layout, TransformerAdapter

LAYOUT = Layout(
    family="llama",
    q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
    head_dim_attr="self_attn.head_dim",
    mlp_producers=("mlp.gate_proj", "mlp.up_proj"), mlp_consumer="mlp.down_proj",
    mlp_act="mlp.act_fn", gated=True,
    norms=(NormSpec("input_layernorm", "rmsnorm", "pre"),
           NormSpec("post_attention_layernorm", "rmsnorm", "pre")),
    value_site="v_output", value_norm="self_attn.v_norm",
    embeddings="embed_tokens", token_embedding="embed_tokens", final_norm="norm",
    head="lm_head",
    mlp_width_attrs=("mlp.intermediate_size",))


@dataclass(frozen=True)
class Decoder:
    """One decoder family's transformers names (module ``transformers.models.<module>``)."""

    model_type: str
    module: str
    causal_lm: str
    layer: str
    rotary: str
    norm: str
    #: "none": one causal mask; "config": a sliding-window mask when config.sliding_window
    #: is set (Mistral); "layer_types": per layer from config.layer_types (Qwen2)
    sliding: str = "none"


DECODERS = {
    "llama": Decoder("llama", "llama", "LlamaForCausalLM", "LlamaDecoderLayer",
                     "LlamaRotaryEmbedding", "LlamaRMSNorm"),
    "qwen2": Decoder("qwen2", "qwen2", "Qwen2ForCausalLM", "Qwen2DecoderLayer",
                     "Qwen2RotaryEmbedding", "Qwen2RMSNorm", sliding="layer_types"),
    "mistral": Decoder("mistral", "mistral", "MistralForCausalLM", "MistralDecoderLayer",
                       "MistralRotaryEmbedding", "MistralRMSNorm", sliding="config"),
}

HF_CLASSES = ("LlamaModel", "LlamaForCausalLM", "LlamaForSequenceClassification",
              "MistralModel", "MistralForCausalLM", "Qwen2Model", "Qwen2ForCausalLM")

# State-dict names of a causal LM of this layout.
EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


class LlamaAdapter(TransformerAdapter):
    layout = LAYOUT
    hf_classes = HF_CLASSES
    name = "Llama-family"


def decoder(config: Any) -> Decoder:
    """The :class:`Decoder` of a config (object or dict) by its ``model_type``.

    Raises:
        UnsupportedArchitectureError: another model type (names the supported ones).
    """
    d = config if isinstance(config, dict) else config.to_dict()
    mt = d.get("model_type")
    if mt not in DECODERS:
        raise UnsupportedArchitectureError(
            f"block-wise compression supports the decoder families "
            f"{', '.join(sorted(DECODERS))} (rmtkd.adapters.llama.DECODERS); got model_type "
            f"{mt!r}. A decoder with the same layout (self_attn.{{q,k,v,o}}_proj, "
            f"mlp.{{gate,up,down}}_proj, RMSNorm) is one entry there; see the README section "
            f"'Adding an architecture'")
    return DECODERS[mt]


def _module(dec: Decoder) -> Any:
    import importlib

    return importlib.import_module(f"transformers.models.{dec.module}.modeling_{dec.module}")


def decoder_config(config: Any) -> Any:
    """A transformers config object of the family from a config object or dict (the
    attention implementation set to ``sdpa`` when unset, as the CPU default)."""
    from transformers import CONFIG_MAPPING

    dec = decoder(config)
    if isinstance(config, dict):
        d = {k: v for k, v in config.items() if k != "model_type"}
        config = CONFIG_MAPPING[dec.model_type].from_dict(d)
    if getattr(config, "_attn_implementation", None) is None:
        config._attn_implementation = "sdpa"
    return config


def causal_lm_class(config: Any) -> type:
    return getattr(_module(decoder(config)), decoder(config).causal_lm)


def new_layer(config: Any, index: int, device: Any = "meta") -> nn.Module:
    """An uninitialised decoder layer ``index`` of the family on ``device``."""
    cls = getattr(_module(decoder(config)), decoder(config).layer)
    with torch.device(device):
        return cls(config, index)


def final_norm(config: Any, weight: torch.Tensor) -> nn.Module:
    """The model's final norm with ``weight`` (fp32)."""
    cls = getattr(_module(decoder(config)), decoder(config).norm)
    norm = cls(config.hidden_size, eps=config.rms_norm_eps)
    with torch.no_grad():
        norm.weight.copy_(weight.float())
    return norm.float().eval()


def position_embeddings(config: Any, seq_len: int, device: Any) -> tuple:
    """``((cos, sin), position_ids)`` for positions 0..seq_len-1, as the family's model
    computes them (shared by every layer, broadcast over the batch)."""
    rotary = getattr(_module(decoder(config)), decoder(config).rotary)(config=config).to(device)
    pos = torch.arange(seq_len, device=device)[None]
    x = torch.zeros(1, seq_len, 1, device=device)
    return rotary(x, position_ids=pos), pos


def causal_mask(config: Any, index: int, x: torch.Tensor, pos: torch.Tensor) -> Any:
    """The attention mask layer ``index`` gets from the family's model for inputs ``x``."""
    from transformers.masking_utils import (create_causal_mask,
                                            create_sliding_window_causal_mask)

    dec = decoder(config)
    sliding = False
    if dec.sliding == "config":
        sliding = getattr(config, "sliding_window", None) is not None
    elif dec.sliding == "layer_types":
        types = getattr(config, "layer_types", None) or []
        sliding = index < len(types) and types[index] == "sliding_attention"
    make = create_sliding_window_causal_mask if sliding else create_causal_mask
    return make(config=config, inputs_embeds=x, attention_mask=None, cache=None,
                position_ids=pos)


def run_layer(layer: nn.Module, x: torch.Tensor, config: Any, index: int, pe: tuple
              ) -> torch.Tensor:
    """Decoder layer ``index`` on ``x`` [B, T, hidden], causal, as the family's model calls
    it (``pe``: :func:`position_embeddings`)."""
    (cos, sin), pos = pe
    out = layer(x, attention_mask=causal_mask(config, index, x, pos),
                position_embeddings=(cos, sin), position_ids=pos)
    return out[0] if isinstance(out, tuple) else out
