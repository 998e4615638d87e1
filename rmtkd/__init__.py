"""rmtkd: compress neural networks with random matrix theory (RMT-KD).

Public API:
    CovarianceAccumulator, CovarianceStats   streaming covariance (rmtkd.ops.covariance)
    spikes, SpectrumFit                      spike detection above the MP bulk
    spectral                                 MP law, BBP, Tracy-Widom, estimators, analyze
    capture                                  reduction sites and calibration hooks
    nn.ProjectedLinear                       y = (x V) W^T + b, the projected low-rank layer
    compress, CompressConfig, CompressionResult   RMT-KD end to end (reduce + self-distil)
    compress_blockwise, BlockwiseSettings    decoder LLMs block by block, perplexity budget
    adapters                                 what a model family is made of
    save, load                               compressed model <-> safetensors + plan.json
    CorruptCheckpointError                   a damaged checkpoint (rmtkd.checkpoint), not loaded
    AccumulatorMemoryError                   a site's covariance accumulator does not fit
    SmallSampleWarning                       a site calibrated on n < d samples (gamma > 1)
"""
from . import adapters, capture, nn, spectral
from .ops.covariance import AccumulatorMemoryError, CovarianceAccumulator, CovarianceStats
from .spectral import SpectrumFit, analyze, spikes
from .engine import (BlockwiseSettings, CompressConfig, CompressionResult, compress,
                     compress_blockwise)
from .saving import load, save
from .checkpoint import CorruptCheckpointError
from .analysis import SmallSampleWarning

__version__ = "0.1.0"
__all__ = ["CovarianceAccumulator", "CovarianceStats", "SpectrumFit", "analyze", "spikes",
           "spectral", "capture", "nn", "adapters", "compress", "compress_blockwise",
           "CompressConfig", "BlockwiseSettings", "CompressionResult",
           "save", "load", "CorruptCheckpointError", "AccumulatorMemoryError",
           "SmallSampleWarning", "__version__"]
