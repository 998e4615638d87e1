"""The RMT-KD engine: one step loop (:mod:`rmtkd.engine.loop`) and its strategies.

- :func:`compress` (:mod:`rmtkd.engine.whole`): a model that fits in memory, one site per
  step, live calibration, distillation against the previous (or original) model, the
  metric budget ``epsilon``; under torch.distributed the same loop with sharded
  calibration and DDP / FSDP2 distillation;
- :func:`compress_blockwise` (:mod:`rmtkd.engine.blockwise`): decoder LLMs one block at a
  time, memory-mapped hidden states, local distillation on the original block's outputs,
  the held-out perplexity budget ``blockwise.ppl_ratio``.

One config type (:class:`CompressConfig` with :class:`BlockwiseSettings` nested), one record
type (:class:`StepRecord`), one checkpoint format (:mod:`rmtkd.checkpoint`), one seeding
scheme (:func:`rmtkd.engine.step.step_seed`).
"""
from .blockwise import BlockwiseResult, compress_blockwise, format_blocks
from .config import BlockwiseSettings, CompressConfig
from .data import calibration_subset, evaluate, first_sample, input_shape
from .step import StepRecord
from .whole import CompressionResult, compress

__all__ = ["BlockwiseResult", "BlockwiseSettings", "CompressConfig", "CompressionResult",
           "StepRecord", "calibration_subset", "compress", "compress_blockwise",
           "evaluate", "first_sample", "format_blocks", "input_shape"]
