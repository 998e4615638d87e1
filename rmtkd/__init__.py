"""rmtkd: compress neural networks with random matrix theory (RMT-KD).

Public API:
    CovarianceAccumulator, CovarianceStats   streaming covariance (rmtkd.ops.covariance)
    spikes, SpectrumFit                      spike detection above the MP bulk
    spectral                                 MP law, BBP, Tracy-Widom, estimators, analyze
    capture                                  reduction sites and calibration hooks
    nn.ProjectedLinear                       y = (x V) W^T + b, the projected low-rank layer
"""
from . import capture, nn, spectral
from .ops.covariance import CovarianceAccumulator, CovarianceStats
from .spectral import SpectrumFit, analyze, spikes

__version__ = "0.1.0"
__all__ = ["CovarianceAccumulator", "CovarianceStats", "SpectrumFit", "analyze", "spikes",
           "spectral", "capture", "nn", "__version__"]
