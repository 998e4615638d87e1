"""Noise-level (sigma^2) estimators for a Marchenko-Pastur bulk.

Every estimator sees the same input, a ``Spectrum``: the eigenvalues of the non-degenerate
part of a sample covariance (``d`` features, ``n`` samples, gamma = d/n), and the current
candidate spikes (the ``k`` largest eigenvalues, excluded from the bulk). ``fit_noise``
alternates between estimating sigma^2 on the bulk and recounting the spikes above the
threshold until the count is stable.

Estimators (``ESTIMATORS``):
- ``paper``: RMT-KD's: start at the tau-quantile of the eigenvalues, refine by least squares
  between the eigenvalue histogram and the MP density on [lambda_-, lambda_+].
- ``median``: Gavish-Donoho style: the median eigenvalue over the MP median.
- ``quantile-match``: least squares between the middle order statistics and MP quantiles.
- ``moments``: the bulk's first moment, tr(C) minus the spikes, corrected for the mass the
  spikes take from the bulk (BBP). Needs only tr(C) and the spikes, so it is the estimator of
  the randomized solver, which never sees the full spectrum.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .bbp import spike_strength
from .mp import mp_cdf, mp_continuous_quantile, mp_edges

ESTIMATORS = ("paper", "median", "quantile-match", "moments")
# Chosen by measurement: bench/bench_estimators.py, results in docs/estimators.md.
DEFAULT_ESTIMATOR = "moments"
# Detection threshold margin, also chosen there: the Tracy-Widom 0.95 quantile of the largest
# null eigenvalue (the paper's plain lambda_+ is margin=0).
DEFAULT_MARGIN = "tw"
# Estimators that need every eigenvalue (the randomized solver cannot feed them).
FULL_SPECTRUM_ESTIMATORS = ("paper", "median", "quantile-match")


@dataclass
class Spectrum:
    """What an estimator may look at.

    top: the largest eigenvalues, descending (all ``d`` when ``full``); float64.
    trace: sum of all ``d`` eigenvalues (tr C restricted to the non-degenerate features).
    d, n: features and samples; gamma = d / n.
    full: whether ``top`` holds the whole spectrum.
    """

    top: np.ndarray
    trace: float
    d: int
    n: int
    full: bool

    @property
    def gamma(self) -> float:
        return self.d / self.n

    def bulk(self, k: int) -> tuple[np.ndarray, float, float]:
        """The noise part once the k spikes are removed, as (eigenvalues, ratio, scale).

        eigenvalues: the continuous part below the spikes, descending. The spikes take k
        dimensions from the smaller side of the n x d data: for d <= n the bulk is MP of
        ratio (d - k) / n over d - k eigenvalues; for d > n its nonzero eigenvalues are
        those of n - k samples, MP of ratio d / (n - k) scaled by (n - k) / n.
        """
        if self.d <= self.n:
            return self.top[k: self.d], (self.d - k) / self.n, 1.0
        m = self.n - k
        return self.top[k: self.n], self.d / m, m / self.n


def _levels(count: int) -> np.ndarray:
    """MP levels of the order statistics of ``count`` eigenvalues, descending order."""
    return 1.0 - (np.arange(count) + 0.5) / count


def _median(spec: Spectrum, k: int, tau: float) -> float:
    cont, gamma, scale = spec.bulk(k)
    return float(np.median(cont)) / mp_continuous_quantile(0.5, gamma) / scale


def _quantile_match(spec: Spectrum, k: int, tau: float, lo: float = 0.1, hi: float = 0.9) -> float:
    cont, gamma, scale = spec.bulk(k)
    p = _levels(cont.size)
    keep = (p >= lo) & (p <= hi)
    lam, q = cont[keep], mp_continuous_quantile(p[keep], gamma)
    return float(np.dot(lam, q) / max(np.dot(q, q), np.finfo(float).tiny)) / scale


def _paper(spec: Spectrum, k: int, tau: float, bins: int = 60) -> float:
    """Start at the tau-quantile of the eigenvalues, then least-squares fit the histogram."""
    from scipy.optimize import least_squares

    bulk, gamma, scale = spec.bulk(k)
    s0 = float(np.quantile(bulk, tau))
    # Histogram of the bulk on a fixed grid covering MP's support for the starting value,
    # against MP's mass per bin (bin-averaged density: finite even where the pdf is not,
    # at 0 for gamma = 1).
    lo, hi = mp_edges(gamma, s0)
    edges = np.linspace(0.0 if gamma >= 1 else 0.5 * lo, 1.5 * hi, bins + 1)
    hist, _ = np.histogram(bulk, bins=edges)
    frac = hist / bulk.size
    atom = max(0.0, 1.0 - 1.0 / gamma)

    def resid(x: np.ndarray) -> np.ndarray:
        cdf = (mp_cdf(edges, gamma, float(x[0])) - atom) / (1.0 - atom)
        return frac - np.diff(np.clip(cdf, 0.0, 1.0))

    sol = least_squares(resid, x0=[s0], bounds=([s0 * 0.25], [s0 * 4.0]))
    return float(sol.x[0]) / scale


def _moments(spec: Spectrum, k: int, tau: float, iters: int = 50) -> float:
    """First moment of the bulk with the BBP correction for the k spikes.

    For population spikes theta_i over noise sigma^2, E tr C = d sigma^2 + sum theta_i and a
    spike's sample eigenvalue is (sigma^2 + theta)(1 + gamma sigma^2 / theta), so the bulk holds
    (d - k) sigma^2 - gamma sigma^2 sum_i (1 + sigma^2 / theta_i); solve that by fixed point.
    """
    spikes = spec.top[:k]
    bulk_sum = max(spec.trace - float(spikes.sum()), 0.0)
    m = spec.d - k
    if m <= 0 or bulk_sum <= 0.0:
        return float(np.finfo(float).tiny)
    s2 = bulk_sum / m
    gamma = spec.gamma
    for _ in range(iters):
        theta = spike_strength(spikes, gamma, s2) if k else np.zeros(0)
        theta = theta[np.isfinite(theta) & (theta > 0)]
        denom = m - gamma * float(np.sum(1.0 + s2 / theta))
        new = bulk_sum / denom if denom > 0.5 * m else bulk_sum / m
        if abs(new - s2) <= 1e-12 * s2:
            s2 = new
            break
        s2 = new
    return float(s2)


_IMPL: dict[str, Callable[[Spectrum, int, float], float]] = {
    "paper": _paper,
    "median": _median,
    "quantile-match": _quantile_match,
    "moments": _moments,
}


def resolve_estimator(name: str) -> str:
    """Map ``"auto"`` to the measured default and validate the name."""
    name = DEFAULT_ESTIMATOR if name == "auto" else name
    if name not in _IMPL:
        raise ValueError(f"unknown estimator {name!r}; expected 'auto' or one of {ESTIMATORS}")
    return name


def fit_noise(spec: Spectrum, estimator: str, threshold_of: Callable[[float], float], *,
              tau: float = 0.5, max_iter: int = 20) -> tuple[float, int]:
    """Alternate sigma^2 estimation on the bulk and spike counting until k is stable.

    threshold_of(sigma2) gives the detection threshold (lambda_+ plus any margin).
    Returns (sigma2, k) with k = number of ``spec.top`` entries above the threshold.
    """
    impl = _IMPL[resolve_estimator(estimator)]
    if impl is not _moments and not spec.full:
        raise ValueError(f"estimator {estimator!r} needs the full spectrum; use 'moments' "
                         f"or solver='full'")
    k_max = min(spec.top.size, spec.d - 1, spec.n - 1)
    k, seen = 0, set()
    sigma2 = 0.0
    for _ in range(max_iter):
        sigma2 = impl(spec, k, tau)
        thr = threshold_of(sigma2)
        new_k = min(int(np.count_nonzero(spec.top > thr)), k_max)
        if new_k == k or new_k in seen:   # stable, or a 2-cycle: keep the latest
            k = new_k
            break
        seen.add(k)
        k = new_k
    return sigma2, k
