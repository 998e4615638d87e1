"""Decoder LLMs (Llama family), one block at a time.

- :mod:`rmtkd.llm.hfdir`: read a Hugging Face model directory tensor by tensor
  (``safetensors.safe_open``), write the sharded output directory, load a compressed one.
- :mod:`rmtkd.llm.evaluate`: tokenization into fixed-length sequences, perplexity,
  generation tokens/s, parameter counts.

The driver is :func:`rmtkd.engine.compress_blockwise`.
"""
from .evaluate import (compare_models, count_params, generation_tokens_per_s, perplexity,
                       read_token_data, split_heldout, token_sequences)
from .hfdir import WeightSource, load_compressed

__all__ = ["WeightSource", "load_compressed", "perplexity", "generation_tokens_per_s",
           "count_params", "token_sequences", "read_token_data", "split_heldout",
           "compare_models"]
