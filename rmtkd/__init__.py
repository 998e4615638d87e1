"""rmtkd: compress neural networks with random matrix theory (RMT-KD).

Public API:
    CovarianceAccumulator, CovarianceStats   streaming covariance (rmtkd.ops.covariance)
    spikes, SpectrumFit                      spike detection above the MP bulk
    spectral                                 MP law, BBP, Tracy-Widom, estimators, analyze
    capture                                  reduction sites and calibration hooks
    nn.ProjectedLinear                       y = (x V) W^T + b, the projected low-rank layer
    compress, CompressConfig, CompressionResult   RMT-KD end to end (reduce + self-distil)
    save, load                               compressed model <-> safetensors + plan.json
"""
from . import capture, nn, spectral
from .ops.covariance import CovarianceAccumulator, CovarianceStats
from .spectral import SpectrumFit, analyze, spikes
from .compress import CompressConfig, CompressionResult, compress
from .io import load, save

__version__ = "0.1.0"
__all__ = ["CovarianceAccumulator", "CovarianceStats", "SpectrumFit", "analyze", "spikes",
           "spectral", "capture", "nn", "compress", "CompressConfig", "CompressionResult",
           "save", "load", "__version__"]
