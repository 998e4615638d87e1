"""Tracy–Widom law for beta = 1 (GOE) and the largest eigenvalue of a null sample covariance.

The CDF is evaluated as a Fredholm determinant (Ferrari & Spohn, J. Phys. A 38 (2005) L557;
Bornemann, Markov Process. Related Fields 16 (2010) 803):

    F1(s) = det(I - B_s) on L^2(0, inf),   B_s(x, y) = Ai(x + y + s),

discretised by the Nyström method with Gauss–Legendre nodes on a truncated interval [0, L]:
``F1(s) ~ det(I - W^{1/2} K W^{1/2})`` with ``K_ij = Ai(x_i + x_j + s)``. (Bornemann writes
the same operator as ``Ai((x + y)/2 + s) / 2``; substituting ``x -> 2x`` gives the form above.)
With 80 nodes the absolute error is ~1e-15 for every s.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import brentq
from scipy.special import airy

from rmtkd.spectral.mp import _as_output, _check_positive, _check_prob

__all__ = ["tw1_cdf", "tw1_quantile", "largest_eigenvalue_quantile"]

_NODES = 80
_TAIL = 16.0  # Ai(16) ~ 1e-19: the kernel is negligible once x + y + s >= _TAIL
_S_MIN = -20.0  # F1(-20) < 1e-100 (log F1(s) ~ -|s|^3 / 24): below it F1 is returned as 0
_S_MAX = 20.0  # 1 - F1(20) < 1e-25: rounds to 1 in float64
_GL_X, _GL_W = np.polynomial.legendre.leggauss(_NODES)


def _fredholm_det(s: float) -> float:
    """``det(I - W^{1/2} K W^{1/2})``, ``K_ij = Ai(x_i + x_j + s)``; x_i in [0, 16 - min(s, 0)]"""
    length = _TAIL + max(-s, 0.0)
    x = 0.5 * length * (_GL_X + 1.0)
    sqrt_w = np.sqrt(0.5 * length * _GL_W)
    i, j = np.triu_indices(_NODES)  # K is symmetric: evaluate Ai on one triangle only
    upper = airy(x[i] + x[j] + s)[0] * sqrt_w[i] * sqrt_w[j]
    k = np.zeros((_NODES, _NODES))
    k[i, j] = upper
    k[j, i] = upper
    return float(np.linalg.det(np.eye(_NODES) - k))


def _tw1_cdf_scalar(s: float) -> float:
    if math.isnan(s):
        return math.nan
    if s < _S_MIN:
        return 0.0
    return min(1.0, max(0.0, _fredholm_det(s)))


def tw1_cdf(s: ArrayLike) -> float | np.ndarray:
    """Tracy–Widom GOE CDF ``F1(s)`` (float for scalar input, float64 array of ``s``'s shape
    otherwise), absolute accuracy ~1e-15."""
    flat = np.asarray(s, dtype=np.float64).ravel()
    values = np.array([_tw1_cdf_scalar(float(v)) for v in flat]).reshape(np.shape(s))
    return _as_output(values, s)


@functools.lru_cache(maxsize=4096)
def _tw1_quantile_scalar(p: float) -> float:
    if p == 0.0:
        return -math.inf
    if p == 1.0:
        return math.inf
    return float(brentq(lambda s: _tw1_cdf_scalar(s) - p, _S_MIN, _S_MAX, xtol=1e-13))


def tw1_quantile(p: ArrayLike) -> float | np.ndarray:
    """Inverse of :func:`tw1_cdf` by Brent's method (cached per scalar ``p``).

    Returns -inf / +inf for p = 0 / 1. Since ``F1`` is accurate to ~1e-15 absolute, quantiles
    for ``p`` (or ``1 - p``) below ~1e-13 are not meaningful.
    """
    q = _check_prob(p)
    values = np.array([_tw1_quantile_scalar(float(v)) for v in q.ravel()]).reshape(q.shape)
    return _as_output(values, p)


def _check_count(value: int, name: str) -> int:
    """A positive integer (integral floats such as ``400.0`` are accepted)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not (math.isfinite(value) and value >= 1 and int(value) == value):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def largest_eigenvalue_quantile(
    p: ArrayLike, d: int, n: int, sigma2: float = 1.0
) -> float | np.ndarray:
    """``p``-quantile of the largest eigenvalue of ``C = X^T X / n``, ``X`` n x d iid N(0, sigma2).

    Johnstone (Ann. Statist. 29 (2001) 295), with the 1/2 corrections: ``(l_1 - mu) / s -> TW1``
    for the largest eigenvalue ``l_1`` of the unnormalised ``X^T X / sigma2``, where

        mu = (sqrt(n - 1/2) + sqrt(d - 1/2))^2,
        s  = (sqrt(n - 1/2) + sqrt(d - 1/2)) (1/sqrt(n - 1/2) + 1/sqrt(d - 1/2))^(1/3).

    Both are symmetric in ``(d, n)``, so the formula covers ``d > n`` (``X^T X`` and ``X X^T``
    share their nonzero eigenvalues). Returns ``sigma2 * (mu + s * tw1_quantile(p)) / n``.
    """
    d, n = _check_count(d, "d"), _check_count(n, "n")
    sigma2 = _check_positive(sigma2, "sigma2 (noise variance)")
    rn, rd = math.sqrt(n - 0.5), math.sqrt(d - 0.5)
    mu = (rn + rd) ** 2
    scale = (rn + rd) * (1.0 / rn + 1.0 / rd) ** (1.0 / 3.0)
    values = sigma2 * (mu + scale * np.asarray(tw1_quantile(p))) / n
    return _as_output(values, p)
