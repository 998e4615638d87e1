"""Top eigenpairs of a symmetric PSD matrix above a moving threshold (torch backend).

``block_krylov_top`` grows a block Krylov basis K = [Q0, C Q0, C^2 Q0, ...] (orthonormalised
twice by classical Gram-Schmidt, then within the block by QR) and runs Rayleigh-Ritz on it.
After each Rayleigh-Ritz it asks ``threshold_of(ritz_values)`` where the detection threshold
lies (the threshold itself depends on which eigenvalues are spikes, e.g. through the noise
estimate), and stops once every Ritz pair above the threshold has converged, the first
Ritz value below it is known to be below it, and the count has stayed the same for one more
block. It never forms the full spectrum: each step costs one
product C @ (d x b) plus O(d m b) for the orthogonalisation, m being the basis size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


@dataclass
class KrylovResult:
    values: np.ndarray        # (m,) Ritz values, descending, float64
    vectors: torch.Tensor     # (d, k) Ritz vectors of the values above the threshold
    k: int                    # number of values above the final threshold
    threshold: float
    basis_size: int           # m, the final Krylov basis dimension
    matvecs: int              # columns multiplied by C in total
    converged: bool


def _orthonormalise(z: torch.Tensor, q: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """Orthonormalise the block z against q (CGS2) and within itself (QR).

    Columns that vanish (the Krylov space is exhausted, or rank deficiency) are replaced by
    fresh random directions so the basis keeps growing.
    """
    for _ in range(2):
        if q is not None and q.shape[1]:
            z = z - q @ (q.T @ z)
    norms0 = z.norm(dim=0)
    qz, r = torch.linalg.qr(z)
    diag = r.diagonal().abs()
    bad = diag <= 1e-5 * norms0.max().clamp_min(torch.finfo(z.dtype).tiny)
    if bool(bad.any()):
        fresh = torch.randn(z.shape[0], int(bad.sum()), generator=gen, dtype=z.dtype,
                            device="cpu").to(z.device)
        qz = qz.clone()
        qz[:, bad] = _orthonormalise(fresh, q if q is None else torch.cat([q, qz[:, ~bad]], 1), gen)
    return qz


def block_krylov_top(
    c: torch.Tensor,
    threshold_of: Callable[[np.ndarray], float],
    *,
    block: int = 16,
    tol: float = 1e-5,
    max_basis: int | None = None,
    seed: int = 0,
) -> KrylovResult:
    """Eigenpairs of the symmetric matrix ``c`` (d x d, fp32/fp64) above a threshold.

    threshold_of: maps the current Ritz values (descending, float64) to the threshold.
    block: columns added per step. tol: a Ritz pair (t, y) has converged when
    ||C y - t y|| <= tol * t (or, in fp32, when it reaches the rounding floor of C).
    max_basis: stop growing there (default min(d, max(8 * block, d // 2))); the caller then
    falls back to a full eigendecomposition (``converged`` is False).
    """
    d = c.shape[0]
    dtype, dev = c.dtype, c.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    max_basis = min(d, max_basis if max_basis is not None else max(8 * block, d // 2))
    b = min(block, d)
    floor = 30.0 * torch.finfo(dtype).eps * float(torch.linalg.matrix_norm(c, ord="fro"))

    z = torch.randn(d, b, generator=gen, dtype=dtype, device="cpu").to(dev)
    q = _orthonormalise(z, None, gen)
    w = c @ q
    t = (q.T @ w).double()
    matvecs, prev_k = b, -1
    result = None
    while True:
        m = q.shape[1]
        theta, y = torch.linalg.eigh(0.5 * (t + t.T))
        theta, y = theta.flip(0), y.flip(1)
        vals = theta.cpu().numpy()
        thr = float(threshold_of(vals))
        k = int(np.count_nonzero(vals > thr))
        if k < m:
            # Residuals of the pairs above the threshold and of the first one below it.
            j = k + 1
            yj = y[:, :j].to(dtype)
            r = w @ yj - (q @ yj) * theta[:j].to(dtype)
            res = r.norm(dim=0).double().cpu().numpy()
            ok = res <= np.maximum(tol * np.abs(vals[:j]), floor)
            # The first value below the threshold must be known to be below it: converged, or
            # nearly (to sqrt(tol): it sits in the dense bulk, where Ritz values converge
            # slowly) with its residual interval (an eigenvalue lies within res of it) below
            # thr. A large residual says nothing: early Ritz values mix many eigenvectors.
            below = bool(ok[k]) or (res[k] <= np.sqrt(tol) * abs(vals[k])
                                    and vals[k] + res[k] < thr)
            done = bool(ok[:k].all()) and below and k == prev_k
            result = KrylovResult(vals, (q @ y[:, :k].to(dtype)), k, thr, m, matvecs, done)
            if done:
                return result
            prev_k = k if bool(ok[:k].all()) else -1
        if m + b > max_basis:
            if result is None:
                result = KrylovResult(vals, q @ y[:, :k].to(dtype), k, thr, m, matvecs, False)
            result.converged = False
            return result
        # Grow the basis by one block: the C-image of the newest block.
        znew = _orthonormalise(w[:, -b:], q, gen)
        wnew = c @ znew
        matvecs += b
        # Rayleigh quotient matrix, extended by the new rows/columns only.
        t_new = (torch.cat([q, znew], 1).T @ wnew).double()
        t = torch.cat([torch.cat([t, t_new[:m].T], 0), t_new], 1)
        q = torch.cat([q, znew], 1)
        w = torch.cat([w, wnew], 1)
