"""Top eigenpairs of a symmetric PSD matrix above a moving threshold (torch backend).

``block_krylov_top`` grows a block Krylov basis K = [Q0, C Q0, C^2 Q0, ...] (orthonormalised
twice by classical Gram-Schmidt, then within the block by QR) and runs Rayleigh-Ritz on it.
After each Rayleigh-Ritz it asks ``threshold_of(ritz_values)`` where the detection threshold
lies (the threshold itself depends on which eigenvalues are spikes, e.g. through the noise
estimate), and stops once every Ritz pair above the threshold has converged and the first
Ritz value below it is known to be below it. It never forms the full spectrum: each step
costs one product C @ (d x b) plus O(d m b) for the orthogonalisation, m being the basis
size. Any device: the only host synchronisations are the convergence checks.
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


def _orthonormalise(f: torch.Tensor, q: torch.Tensor | None, gen: torch.Generator,
                    h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormalise the block f against q (CGS2) and within itself (QR): f' = Z R.

    h: q^T f if the caller has it already (saves one product). Returns (Z, R) with
    (I - q q^T) f = Z R. Columns that vanish (the Krylov space is exhausted, e.g. a
    rank-deficient C) are replaced by fresh random directions so the basis keeps growing.
    On the CPU that is a branch; on a GPU the replacement is computed every time and
    selected with ``where``, so the loop never waits for the device.
    """
    if q is not None and q.shape[1]:
        f = f - q @ (q.T @ f if h is None else h)
        f = f - q @ (q.T @ f)
    z, r = torch.linalg.qr(f)
    diag = r.diagonal().abs()
    bad = diag <= 1e-5 * diag.max().clamp_min(torch.finfo(f.dtype).tiny)
    if f.is_cuda or bool(bad.any()):
        fresh = torch.randn(f.shape, generator=gen, dtype=f.dtype, device=gen.device)
        basis = z if q is None else torch.cat([q, z], 1)
        for _ in range(2):
            fresh = fresh - basis @ (basis.T @ fresh)
        fresh = torch.linalg.qr(fresh)[0]
        z = torch.where(bad, fresh, z)
    return z, r


def block_krylov_top(
    c: torch.Tensor,
    threshold_of: Callable[[np.ndarray], float],
    *,
    block: int = 16,
    tol: float = 1e-4,
    max_basis: int | None = None,
    seed: int = 0,
) -> KrylovResult:
    """Eigenpairs of the symmetric matrix ``c`` (d x d, fp32/fp64) above a threshold.

    threshold_of: maps the current Ritz values (descending, float64) to the threshold.
    block: columns added per step. tol: a Ritz pair (t, y) has converged when
    ||C y - t y|| <= tol * t (or, in fp32, when it reaches the rounding floor of C).
    max_basis: stop growing there (default min(d, max(8 * block, d // 2))); the caller then
    falls back to a full eigendecomposition (``converged`` is False).

    Rayleigh-Ritz runs once the basis has grown by max(block, m / 8) columns since the last
    one (its eigh costs O(m^3)). Residuals come free from the Krylov relation
    C Q = Q T + F E^T, F = (I - Q Q^T) C Q_last = Z R: for a Ritz vector Q y the residual
    norm is ||R y_last||, y_last being y's rows of the newest block.
    """
    d = c.shape[0]
    dtype, dev = c.dtype, c.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    max_basis = min(d, max_basis if max_basis is not None else max(8 * block, d // 2))
    b = min(block, d)
    floor = 30.0 * torch.finfo(dtype).eps * float(torch.linalg.matrix_norm(c, ord="fro"))

    zl = _orthonormalise(torch.randn(d, b, generator=gen, dtype=dtype, device=dev), None,
                         gen)[0]
    q = zl
    t = torch.zeros(0, 0, dtype=torch.float64, device=dev)
    matvecs, last_rr = 0, 0
    while True:
        m = q.shape[1]
        wl = c @ zl                       # C times the newest block
        matvecs += zl.shape[1]
        h = q.T @ wl                      # its Rayleigh-quotient columns
        t = torch.cat([torch.cat([t, h[: m - zl.shape[1]].T.double()], 0), h.double()], 1)
        znext, r = _orthonormalise(wl, q, gen, h)
        if last_rr == 0 or m - last_rr >= max(b, m // 8) or m + b > max_basis:
            last_rr = m
            # The small projected problem is solved on the host in fp64: the convergence
            # check needs its values there anyway, and small eigh calls on a GPU are slow.
            theta, y = torch.linalg.eigh(0.5 * (t + t.T).cpu())
            theta, y = theta.flip(0), y.flip(1)
            vals = theta.numpy()
            thr = float(threshold_of(vals))
            k = int(np.count_nonzero(vals > thr))
            if k < m:
                res = torch.linalg.vector_norm(r.double().cpu() @ y[m - zl.shape[1]:, : k + 1],
                                               dim=0).numpy()
                ok = res <= np.maximum(tol * np.abs(vals[: k + 1]), floor)
                # The first value below the threshold must be known to be below it:
                # converged, or nearly (to sqrt(tol): it sits in the dense bulk, where Ritz
                # values converge slowly) with its residual interval (an eigenvalue lies
                # within res of it) below thr. A large residual says nothing: early Ritz
                # values mix many eigenvectors.
                below = bool(ok[k]) or (res[k] <= np.sqrt(tol) * abs(vals[k])
                                        and vals[k] + res[k] < thr)
                if bool(ok[:k].all()) and below:
                    return KrylovResult(vals, q @ y[:, :k].to(dev, dtype), k, thr, m, matvecs,
                                        True)
            if m + b > max_basis:
                return KrylovResult(vals, q @ y[:, :k].to(dev, dtype), k, thr, m, matvecs,
                                    False)
        q = torch.cat([q, znext], 1)
        zl = znext
