"""Random-matrix maths: the Marchenko-Pastur law, BBP spikes, Tracy-Widom margins, noise
estimators and spectrum fits."""
from ..errors import SolverConvergenceError, SolverFallbackWarning
from .bbp import bbp_threshold, spike_eigenvalue, spike_overlap, spike_strength
from .estimators import DEFAULT_ESTIMATOR, ESTIMATORS
from .fit import SOLVERS, SpectrumFit, analyze, spikes
from .mp import (mp_cdf, mp_continuous_quantile, mp_edges, mp_median, mp_moment, mp_pdf,
                 mp_quantile)
from .tracy_widom import largest_eigenvalue_quantile, tw1_cdf, tw1_quantile

__all__ = [
    "mp_pdf", "mp_cdf", "mp_quantile", "mp_continuous_quantile", "mp_edges", "mp_median",
    "mp_moment", "bbp_threshold", "spike_eigenvalue", "spike_strength", "spike_overlap",
    "tw1_cdf", "tw1_quantile", "largest_eigenvalue_quantile", "SpectrumFit", "analyze",
    "spikes", "ESTIMATORS", "DEFAULT_ESTIMATOR", "SOLVERS", "SolverConvergenceError",
    "SolverFallbackWarning",
]
