"""Spiked covariance models with known answers, for tests and benchmarks.

Samples x = z + sum_i sqrt(theta_i) g_i u_i with z iid noise of variance sigma2 (Gaussian or
Student-t rescaled to variance sigma2), g_i ~ N(0, 1) and orthonormal u_i: the population
covariance is sigma2 I + sum_i theta_i u_i u_i^T, so a spike is detectable iff
theta_i > sigma2 sqrt(d / n) (BBP).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class SpikedSample:
    x: torch.Tensor        # (n, d) samples
    directions: torch.Tensor  # (d, k) orthonormal population spike directions
    thetas: np.ndarray     # (k,) spike strengths, descending
    sigma2: float


def spiked_samples(d: int, n: int, thetas, sigma2: float = 1.0, *, noise: str = "gaussian",
                   dof: float = 5.0, seed: int = 0, dtype=torch.float32) -> SpikedSample:
    """Draw n samples of the spiked model in d dimensions (see module docstring).

    noise: 'gaussian' or 'student-t' (``dof`` degrees of freedom, dof > 2).
    """
    gen = torch.Generator().manual_seed(seed)
    thetas = np.sort(np.asarray(thetas, dtype=np.float64).ravel())[::-1].copy()
    k = thetas.size
    if noise == "gaussian":
        z = torch.randn(n, d, generator=gen, dtype=torch.float64)
    elif noise == "student-t":
        if dof <= 2:
            raise ValueError(f"Student-t noise needs dof > 2 for a finite variance, got {dof}")
        g = torch.randn(n, d, generator=gen, dtype=torch.float64)
        w = _chi2(n, d, dof, gen)
        z = g / torch.sqrt(w / dof) / np.sqrt(dof / (dof - 2.0))
    else:
        raise ValueError(f"noise must be 'gaussian' or 'student-t', got {noise!r}")
    x = z * np.sqrt(sigma2)
    u = torch.linalg.qr(torch.randn(d, max(k, 1), generator=gen, dtype=torch.float64))[0][:, :k]
    if k:
        g = torch.randn(n, k, generator=gen, dtype=torch.float64)
        x = x + (g * torch.from_numpy(np.sqrt(thetas))) @ u.T
    return SpikedSample(x.to(dtype), u.to(dtype), thetas, float(sigma2))


def _chi2(n: int, d: int, dof: float, gen: torch.Generator) -> torch.Tensor:
    """Chi-square(dof) draws from a seeded generator (Gamma(dof/2, 2) via torch._standard_gamma)."""
    alpha = torch.full((n, d), dof / 2.0, dtype=torch.float64)
    return 2.0 * torch._standard_gamma(alpha, generator=gen)


def sample_covariance(x: torch.Tensor) -> torch.Tensor:
    """Centred sample covariance X^T X / n in the dtype of x (a float64 two-pass reference
    when x is float64)."""
    xc = x - x.mean(0, keepdim=True)
    return xc.T @ xc / x.shape[0]
