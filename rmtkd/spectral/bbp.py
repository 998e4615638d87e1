"""BBP phase transition for the spiked covariance model.

Population covariance ``sigma2 I_d + sum_i theta_i u_i u_i^T``, sample covariance ``X^T X / n``
with ``d / n -> gamma``. A spike ``theta`` separates from the Marchenko–Pastur bulk iff
``theta > sigma2 sqrt(gamma)`` (Baik, Ben Arous & Péché, Ann. Probab. 33 (2005) 1643; Baik &
Silverstein, J. Multivariate Anal. 97 (2006) 1382); the eigenvector overlap is from Paul,
Statist. Sinica 17 (2007) 1617 and Benaych-Georges & Nadakuditi, Adv. Math. 227 (2011) 494.

Functions of ``theta`` / ``lam`` accept scalars (-> Python float) or arrays (-> float64 ndarray).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from rmtkd.spectral.mp import _as_output, _check_params, mp_edges

__all__ = ["bbp_threshold", "spike_eigenvalue", "spike_strength", "spike_overlap"]


def bbp_threshold(gamma: float, sigma2: float = 1.0) -> float:
    """Detection threshold ``sigma2 sqrt(gamma)``: a spike is visible iff ``theta`` exceeds it."""
    gamma, sigma2 = _check_params(gamma, sigma2)
    return sigma2 * math.sqrt(gamma)


def spike_eigenvalue(theta: ArrayLike, gamma: float, sigma2: float = 1.0) -> float | np.ndarray:
    """Limit of the sample eigenvalue produced by a spike ``theta``.

    ``(sigma2 + theta)(1 + gamma sigma2 / theta)`` above :func:`bbp_threshold`, else
    ``lambda_+ = sigma2 (1 + sqrt(gamma))^2`` (the eigenvalue sticks to the bulk edge).
    """
    gamma, sigma2 = _check_params(gamma, sigma2)
    t = np.asarray(theta, dtype=np.float64)
    above = t > bbp_threshold(gamma, sigma2)
    safe = np.where(above, t, 1.0)
    lam = (sigma2 + safe) * (1.0 + gamma * sigma2 / safe)
    out = np.where(above, lam, mp_edges(gamma, sigma2)[1])
    return _as_output(np.where(np.isnan(t), np.nan, out), theta)


def spike_strength(lam: ArrayLike, gamma: float, sigma2: float = 1.0) -> float | np.ndarray:
    """Inverse of :func:`spike_eigenvalue`: the spike ``theta`` behind a sample eigenvalue ``lam``.

    Larger root of ``theta^2 + theta (sigma2 (1 + gamma) - lam) + gamma sigma2^2 = 0``, i.e.
    ``theta = (c + sqrt(c^2 - 4 gamma sigma2^2)) / 2`` with ``c = lam - sigma2 (1 + gamma)``.
    Returns NaN (no exception) where ``lam <= lambda_+``: such eigenvalues are consistent with
    pure noise and carry no recoverable spike.
    """
    gamma, sigma2 = _check_params(gamma, sigma2)
    lv = np.asarray(lam, dtype=np.float64)
    lam_plus = mp_edges(gamma, sigma2)[1]
    above = lv > lam_plus
    c = np.where(above, lv, 2.0 * lam_plus) - sigma2 * (1.0 + gamma)
    theta = 0.5 * (c + np.sqrt(np.clip(c * c - 4.0 * gamma * sigma2**2, 0.0, None)))
    return _as_output(np.where(above, theta, np.nan), lam)


def spike_overlap(theta: ArrayLike, gamma: float, sigma2: float = 1.0) -> float | np.ndarray:
    """Limit of the squared cosine between the sample and population spike eigenvectors.

    ``(1 - gamma sigma2^2 / theta^2) / (1 + gamma sigma2 / theta)`` above :func:`bbp_threshold`,
    0 at or below it.
    """
    gamma, sigma2 = _check_params(gamma, sigma2)
    t = np.asarray(theta, dtype=np.float64)
    above = t > bbp_threshold(gamma, sigma2)
    safe = np.where(above, t, 1.0)
    overlap = (1.0 - gamma * sigma2**2 / safe**2) / (1.0 + gamma * sigma2 / safe)
    out = np.where(above, overlap, 0.0)
    return _as_output(np.where(np.isnan(t), np.nan, out), theta)
