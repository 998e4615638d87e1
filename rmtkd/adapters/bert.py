"""BERT family: Hugging Face ``BertModel`` and the models that reuse its layer
(``BertForSequenceClassification``, the all-MiniLM-L6-v2 sentence encoder, RoBERTa-style
copies): post-norm blocks (LayerNorm after each residual add), full multi-head attention,
a plain feed-forward ``output.dense(gelu(intermediate.dense(x)))``.

Coupled dimensions per block: the feed-forward inner width (read at ``output.dense``'s
input) and the value width per head, read at the attention output's input (the per-head
contexts, which are linear in the values: attention rows sum to 1); and, cut only when
named, the head width (one head size for the queries, keys and values of a layer:
``attention_head_size`` is read at run time, the softmax scale stays the original).
"""
from __future__ import annotations

from .base import NormSpec
from .transformer import Layout, TransformerAdapter

LAYOUT = Layout(
    family="bert",
    q="attention.self.query", k="attention.self.key", v="attention.self.value",
    o="attention.output.dense", head_dim_attr="attention.self.attention_head_size",
    mlp_producers=("intermediate.dense",), mlp_consumer="output.dense",
    mlp_act="intermediate.intermediate_act_fn", gated=False,
    norms=(NormSpec("attention.output.LayerNorm", "layernorm", "post"),
           NormSpec("output.LayerNorm", "layernorm", "post")),
    value_site="o_input",
    embeddings="embeddings", token_embedding="embeddings.word_embeddings",
    final_norm=None, head="classifier",
    embedding_norm="LayerNorm", pooler="pooler.dense",
    pooled_classes=("BertForSequenceClassification", "BertForMultipleChoice"),
    head_size_cut=True)

HF_CLASSES = ("BertModel", "BertForSequenceClassification", "BertForMaskedLM",
              "BertForTokenClassification", "BertForQuestionAnswering",
              "BertForMultipleChoice", "BertForPreTraining")


class BertAdapter(TransformerAdapter):
    layout = LAYOUT
    hf_classes = HF_CLASSES
    name = "BERT"
