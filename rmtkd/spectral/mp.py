"""Marchenko–Pastur law (Marchenko & Pastur, 1967).

The law of the eigenvalues of ``C = X^T X / n`` as ``n, d -> inf`` with ``d / n -> gamma``,
where ``X`` is ``n x d`` with iid entries of mean 0 and variance ``sigma2``. With
``a, b = sigma2 (1 -+ sqrt(gamma))^2`` it is

    mu = max(0, 1 - 1/gamma) * delta_0 + f(x) dx,
    f(x) = sqrt((b - x)(x - a)) / (2 pi gamma sigma2 x)   on [a, b].

Everything is float64 NumPy. Functions of ``x`` or ``p`` accept scalars or arrays: a scalar
(0-d) input gives a Python ``float``, an array input a float64 ``ndarray`` of the same shape.

The CDF is in closed form: substituting ``x = sigma2 (m - h cos(phi))`` with ``m = 1 + gamma``,
``h = 2 sqrt(gamma)`` maps ``[a, b]`` onto ``phi in [0, pi]`` and turns the integral of ``f``
into elementary functions (see :func:`_continuous_cdf_phi`).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "mp_edges",
    "mp_pdf",
    "mp_cdf",
    "mp_quantile",
    "mp_continuous_quantile",
    "mp_moment",
    "mp_median",
]

_BISECTION_STEPS = 110  # pi * 2**-110 ~ 2e-33: relative precision even for tiny phi


def _check_positive(value: float, name: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def _check_params(gamma: float, sigma2: float) -> tuple[float, float]:
    return _check_positive(gamma, "gamma = d/n"), _check_positive(sigma2, "sigma2 (noise variance)")


def _check_prob(p: ArrayLike) -> np.ndarray:
    arr = np.asarray(p, dtype=np.float64)
    if not np.all((arr >= 0.0) & (arr <= 1.0)):  # also rejects NaN
        raise ValueError("probabilities p must lie in [0, 1]")
    return arr


def _as_output(values: np.ndarray, like: ArrayLike) -> float | np.ndarray:
    """Python float for a scalar (0-d) input, float64 ndarray otherwise."""
    if np.ndim(like) == 0:
        return float(values)
    return np.asarray(values, dtype=np.float64)


def _zero_mass(gamma: float) -> float:
    """Mass of the atom at 0: ``max(0, 1 - 1/gamma)``."""
    return max(0.0, 1.0 - 1.0 / gamma)


def mp_edges(gamma: float, sigma2: float = 1.0) -> tuple[float, float]:
    """Support edges ``(lambda_-, lambda_+) = sigma2 (1 -+ sqrt(gamma))^2`` (floats)."""
    gamma, sigma2 = _check_params(gamma, sigma2)
    r = math.sqrt(gamma)
    return sigma2 * (1.0 - r) ** 2, sigma2 * (1.0 + r) ** 2


def mp_pdf(x: ArrayLike, gamma: float, sigma2: float = 1.0) -> float | np.ndarray:
    """Density of the continuous part, ``sqrt((b-x)(x-a)) / (2 pi gamma sigma2 x)``.

    It is zero outside the open interval ``(lambda_-, lambda_+)``. For ``gamma > 1`` the atom
    at 0 (mass ``1 - 1/gamma``) is NOT included, so the pdf integrates to ``1/gamma``; for
    ``gamma <= 1`` it integrates to 1. For ``gamma == 1`` it diverges like ``1/sqrt(x)`` at 0.
    """
    gamma, sigma2 = _check_params(gamma, sigma2)
    a, b = mp_edges(gamma, sigma2)
    xa = np.asarray(x, dtype=np.float64)
    inside = (xa > a) & (xa < b)
    xi = np.where(inside, xa, 0.5 * (a + b))  # keeps the formula finite off the support
    dens = np.sqrt((b - xi) * (xi - a)) / (2.0 * math.pi * gamma * sigma2 * xi)
    return _as_output(np.where(inside, dens, 0.0), x)


def _continuous_cdf_phi(phi: np.ndarray, gamma: float) -> np.ndarray:
    """CDF of the continuous part, renormalised to mass 1, at ``x = m - h cos(phi)``.

    With ``m = 1 + gamma``, ``h = 2 sqrt(gamma)`` (sigma2 = 1) the unnormalised CDF is
    ``(2/pi) * int_0^phi sin^2 / (m - h cos)``, which integrates to

        (1/pi) [ sin(phi)/sqrt(gamma) + (1 + gamma) phi / (2 gamma)
                 - |1 - gamma|/gamma * atan2((1 + sqrt g) sin(phi/2), |1 - sqrt g| cos(phi/2)) ],

    using ``int dphi / (m - h cos phi) = 2/|1-gamma| atan(sqrt((m+h)/(m-h)) tan(phi/2))``.
    Its value at ``phi = pi`` is ``min(1, 1/gamma)``, which is divided out.
    """
    r = math.sqrt(gamma)
    angle = np.arctan2((1.0 + r) * np.sin(0.5 * phi), abs(1.0 - r) * np.cos(0.5 * phi))
    raw = (
        np.sin(phi) / r + (1.0 + gamma) * phi / (2.0 * gamma) - abs(1.0 - gamma) / gamma * angle
    ) / math.pi
    return np.clip(raw * max(1.0, gamma), 0.0, 1.0)


def _phi_of_x(x: np.ndarray, gamma: float) -> np.ndarray:
    """``phi in [0, pi]`` with ``x = a + 2h sin^2(phi/2)`` (sigma2 = 1), accurate at both edges."""
    a, b = mp_edges(gamma)
    return 2.0 * np.arctan2(np.sqrt(np.clip(x - a, 0.0, None)), np.sqrt(np.clip(b - x, 0.0, None)))


def _x_of_phi(phi: np.ndarray, gamma: float) -> np.ndarray:
    """Inverse of :func:`_phi_of_x`: ``x = a + 4 sqrt(gamma) sin^2(phi/2)`` (sigma2 = 1)."""
    a, _ = mp_edges(gamma)
    return a + 4.0 * math.sqrt(gamma) * np.sin(0.5 * phi) ** 2


def mp_cdf(x: ArrayLike, gamma: float, sigma2: float = 1.0) -> float | np.ndarray:
    """CDF of the full law, including the atom ``1 - 1/gamma`` at 0 when ``gamma > 1``.

    Closed form (see :func:`_continuous_cdf_phi`), accurate to ~1e-14 absolute.
    """
    gamma, sigma2 = _check_params(gamma, sigma2)
    xs = np.asarray(x, dtype=np.float64) / sigma2
    atom = _zero_mass(gamma)
    cont = _continuous_cdf_phi(_phi_of_x(xs, gamma), gamma)
    _, b = mp_edges(gamma)
    out = np.where(xs < 0.0, 0.0, np.where(xs >= b, 1.0, atom + (1.0 - atom) * cont))
    return _as_output(out, x)


def _continuous_quantile_unit(q: np.ndarray, gamma: float) -> np.ndarray:
    """Quantile of the renormalised continuous part for sigma2 = 1 (vectorised bisection in phi)."""
    lo = np.zeros_like(q)
    hi = np.full_like(q, math.pi)
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        below = _continuous_cdf_phi(mid, gamma) < q
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    a, b = mp_edges(gamma)
    return np.where(q <= 0.0, a, np.where(q >= 1.0, b, _x_of_phi(0.5 * (lo + hi), gamma)))


def mp_continuous_quantile(p: ArrayLike, gamma: float, sigma2: float = 1.0) -> float | np.ndarray:
    """Quantile of the continuous part of the law renormalised to mass 1.

    This is the reference for the ``min(n, d)`` nonzero eigenvalues when ``n < d``. For
    ``gamma <= 1`` it equals :func:`mp_quantile`. Accurate to ~1e-12 relative.
    """
    gamma, sigma2 = _check_params(gamma, sigma2)
    q = _check_prob(p)
    return _as_output(sigma2 * _continuous_quantile_unit(q, gamma), p)


def mp_quantile(p: ArrayLike, gamma: float, sigma2: float = 1.0) -> float | np.ndarray:
    """Inverse of :func:`mp_cdf`; returns 0 for ``p <= 1 - 1/gamma`` when ``gamma > 1``."""
    gamma, sigma2 = _check_params(gamma, sigma2)
    q = _check_prob(p)
    atom = _zero_mass(gamma)
    q_cont = np.clip((q - atom) / (1.0 - atom), 0.0, 1.0)
    x = sigma2 * _continuous_quantile_unit(q_cont, gamma)
    if atom > 0.0:
        x = np.where(q <= atom, 0.0, x)
    return _as_output(x, p)


def mp_moment(j: int, gamma: float, sigma2: float = 1.0) -> float:
    """``j``-th moment of the full law (atom included), via the Narayana polynomial:

    ``E[x^j] = sigma2^j * sum_{r=0}^{j-1} gamma^r / (r+1) * C(j, r) * C(j-1, r)``, ``E[x^0] = 1``.
    So the mean is ``sigma2`` and the second moment ``sigma2^2 (1 + gamma)``.
    """
    gamma, sigma2 = _check_params(gamma, sigma2)
    if isinstance(j, bool) or not isinstance(j, (int, np.integer)) or j < 0:
        raise ValueError(f"moment order j must be a non-negative integer, got {j!r}")
    j = int(j)
    if j == 0:
        return 1.0
    total = sum(gamma**r * math.comb(j, r) * math.comb(j - 1, r) / (r + 1) for r in range(j))
    return float(sigma2**j * total)


def mp_median(gamma: float, sigma2: float = 1.0) -> float:
    """Median of the full law, ``mp_quantile(0.5, gamma, sigma2)`` (0 when ``gamma >= 2``)."""
    return mp_quantile(0.5, gamma, sigma2)
