"""Spectrum fits: noise level, Marchenko-Pastur edges and the spikes above them.

``analyze(eigenvalues, n)`` fits a known spectrum; ``spikes(cov, n)`` starts from a covariance
matrix and, for large d, finds the spikes with the randomized block Krylov solver without
ever computing the full spectrum (the noise level then comes from the trace moments).
The randomized solver has two backends: ``torch`` (rmtkd/ops/eigen.py, a Python loop over torch
ops) and ``cuda`` (csrc/eigen.cpp: the same loop and threshold in one C++ call).
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import SolverConvergenceError, SolverFallbackWarning
from ..ops.dispatch import always_available, register_backend, resolve_backend
from .estimators import (DEFAULT_MARGIN, FULL_SPECTRUM_ESTIMATORS, Spectrum, fit_noise,
                         resolve_estimator)
from .mp import mp_cdf, mp_edges
from .tracy_widom import largest_eigenvalue_quantile

SOLVERS = ("auto", "full", "randomized")
# solver="auto" uses the randomized solver from this width on: below it a full eigh is as
# fast (measured in bench/bench_spikes_cpu.py, see BENCHMARKS.md).
RANDOMIZED_MIN_DIM = 1024


def _cuda_available(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    if dtype not in (torch.float32, torch.float64):
        return False, f"the C++ solver takes float32/float64 covariances, not {dtype}"
    from ..ops.cuda_ext import cuda_runnable

    return cuda_runnable(device)


register_backend("spikes", "torch", always_available)
# backend="cuda" runs the randomized solver's loop in C++ (csrc/eigen.cpp, rmtkd::krylov_top).
# No GPU has measured it yet (bench/bench_eigen.py has the column), so "auto" never picks it:
# it runs only when asked for by name.
register_backend("spikes", "cuda", _cuda_available, auto=False)


@dataclass
class SpectrumFit:
    """Result of a spectral fit of one covariance matrix (d x d from n samples).

    eigenvalues: float64, descending; all d of them when ``full_spectrum``, else the top ones
    the solver computed. eigenvectors: (d, k) spike directions, the array type of the input
    covariance (None when fitted from eigenvalues alone). d_eff: features with nonzero
    variance (degenerate ones are left out of the MP fit; gamma = d_eff / n).
    ks_distance: Kolmogorov-Smirnov distance between the bulk and the fitted MP law
    (NaN when the full spectrum was not computed).
    """

    d: int
    n: int
    gamma: float
    sigma2: float
    lambda_minus: float
    lambda_plus: float
    threshold: float
    k: int
    eigenvalues: np.ndarray
    eigenvectors: Any
    estimator: str
    solver: str
    margin: float | str
    ks_distance: float
    d_eff: int
    full_spectrum: bool
    info: dict = field(default_factory=dict)

    @property
    def spike_eigenvalues(self) -> np.ndarray:
        return self.eigenvalues[: self.k]

    def to_dict(self, include_vectors: bool = False) -> dict:
        """A JSON-able dict of every figure (eigenvectors only on request)."""
        out = {name: getattr(self, name) for name in (
            "d", "n", "gamma", "sigma2", "lambda_minus", "lambda_plus", "threshold", "k",
            "estimator", "solver", "margin", "ks_distance", "d_eff", "full_spectrum")}
        out["ks_distance"] = None if math.isnan(self.ks_distance) else self.ks_distance
        out["eigenvalues"] = self.eigenvalues.tolist()
        out["info"] = dict(self.info)
        if include_vectors and self.eigenvectors is not None:
            out["eigenvectors"] = np.asarray(_to_numpy(self.eigenvectors)).tolist()
        return out

    def __repr__(self) -> str:
        return (f"SpectrumFit(d={self.d}, n={self.n}, gamma={self.gamma:.3g}, "
                f"sigma2={self.sigma2:.4g}, lambda_plus={self.lambda_plus:.4g}, k={self.k}, "
                f"estimator={self.estimator!r}, solver={self.solver!r})")


def _to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _threshold_unit(margin: float | str, d: int, n: int) -> float:
    """The detection threshold at sigma2 = 1: lambda_+ scaled by (1 + margin), or a
    Tracy-Widom quantile of the largest null eigenvalue for margin='tw' / 'tw:p' (p defaults
    to 0.95), never below lambda_+. The threshold is linear in sigma2."""
    lp = mp_edges(d / n, 1.0)[1]
    if isinstance(margin, str):
        name, _, level = margin.partition(":")
        if name != "tw":
            raise ValueError(f"margin must be a float >= 0, 'tw' or 'tw:<p>', got {margin!r}")
        p = float(level) if level else 0.95
        return max(largest_eigenvalue_quantile(p, d, n, 1.0), lp)
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    return lp * (1.0 + float(margin))


def _threshold_fn(margin: float | str, d: int, n: int):
    """sigma2 -> detection threshold, ``sigma2 * _threshold_unit(margin, d, n)``."""
    unit = _threshold_unit(margin, d, n)
    return lambda s2: s2 * unit


def _check_n(n: int, d: int) -> int:
    if isinstance(n, bool) or int(n) != n:
        raise TypeError(f"n must be an integer sample count, got {n!r}")
    n = int(n)
    if n < 2:
        raise ValueError(f"need at least 2 samples to fit a spectrum, got n={n}")
    return n


def _degenerate_eigs(vals: np.ndarray, d: int, n: int, eps: float) -> int:
    """How many zero eigenvalues are degenerate directions rather than MP's atom.

    Zero means below the rounding level of an eigensolver in precision ``eps``
    (4 sqrt(d) eps lambda_max). A centred covariance from n samples has rank <= n - 1, so up to
    d - (n - 1) zeros belong to the MP atom (gamma > 1); further zeros come from duplicated
    or collinear features.
    """
    scale = max(float(vals.max(initial=0.0)), np.finfo(float).tiny)
    zeros = int(np.count_nonzero(vals <= 4.0 * np.sqrt(d) * eps * scale))
    return max(0, zeros - max(0, d - (n - 1)))


def _ks_distance(spec: Spectrum, k: int, sigma2: float) -> float:
    """KS distance between the bulk's continuous part (all eigenvalues below the k spikes,
    MP's atom at 0 left out when n < d) and the continuous MP law it should follow."""
    cont, gamma, scale = spec.bulk(k)
    x = np.sort(cont)
    if x.size == 0:
        return float("nan")
    atom = max(0.0, 1.0 - 1.0 / gamma)
    f = (mp_cdf(x, gamma, sigma2 * scale) - atom) / (1.0 - atom)
    m = x.size
    return float(max(np.max(np.arange(1, m + 1) / m - f), np.max(f - np.arange(m) / m)))


def _make_fit(spec: Spectrum, d: int, estimator: str, margin, tau: float, solver: str,
              vectors: Any, info: dict) -> SpectrumFit:
    thr_of = _threshold_fn(margin, spec.d, spec.n)
    sigma2, k = fit_noise(spec, estimator, thr_of, tau=tau)
    lm, lp = mp_edges(spec.gamma, sigma2)
    ks = _ks_distance(spec, k, sigma2) if spec.full else float("nan")
    return SpectrumFit(
        d=d, n=spec.n, gamma=spec.gamma, sigma2=float(sigma2), lambda_minus=float(lm),
        lambda_plus=float(lp), threshold=float(thr_of(sigma2)), k=int(k),
        eigenvalues=spec.top, eigenvectors=vectors, estimator=estimator, solver=solver,
        margin=margin, ks_distance=ks, d_eff=spec.d, full_spectrum=spec.full, info=info)


def analyze(eigenvalues: Any, n: int, *, estimator: str = "auto",
            margin: float | str = DEFAULT_MARGIN, tau: float = 0.5) -> SpectrumFit:
    """Fit the MP bulk and count the spikes of a full spectrum.

    eigenvalues: all d eigenvalues of a sample covariance (any order; array or tensor).
    n: number of samples behind it. margin: 0 (the paper's lambda_+), a relative margin
    (threshold = lambda_+ (1 + margin)), or 'tw' / 'tw:p' (the default, p = 0.95): the
    Tracy-Widom p-quantile of the largest eigenvalue of pure noise.
    tau: starting quantile of the 'paper' estimator.
    """
    raw = _to_numpy(eigenvalues)
    eps = float(np.finfo(raw.dtype if raw.dtype == np.float32 else np.float64).eps)
    vals = np.sort(raw.astype(np.float64).ravel())[::-1].copy()
    d = vals.size
    n = _check_n(n, d)
    if d < 2:
        raise ValueError(f"need at least 2 eigenvalues, got {d}")
    if not np.isfinite(vals).all():
        raise ValueError("eigenvalues contain NaN or Inf")
    vals = np.clip(vals, 0.0, None)   # a PSD matrix: negative values are rounding noise
    drop = _degenerate_eigs(vals, d, n, eps)
    kept = vals[: d - drop]
    estimator = resolve_estimator(estimator)
    spec = Spectrum(top=kept, trace=float(kept.sum()), d=d - drop, n=n, full=True)
    return _make_fit(spec, d, estimator, margin, tau, "full", None, {"degenerate": drop})


def _spikes_backend(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """resolve_backend for spikes; a process-wide RMTKD_BACKEND naming a backend that spikes
    does not implement (triton: the solver has no Triton kernel) leaves it on auto."""
    req = (backend or "auto").strip().lower()
    if req == "auto" and os.environ.get("RMTKD_BACKEND", "auto").strip().lower() == "triton":
        req = "torch"
    return resolve_backend("spikes", req, device, dtype)


def spikes(cov: Any, n: int, *, estimator: str = "auto",
           margin: float | str = DEFAULT_MARGIN, solver: str = "auto", tau: float = 0.5,
           seed: int = 0, backend: str | None = "auto") -> SpectrumFit:
    """Spikes of a sample covariance above the Marchenko-Pastur bulk, with their eigenvectors.

    cov: (d, d) symmetric covariance, torch tensor (fp32/fp64, any device), NumPy array or
    CuPy array. n: samples behind it. solver: 'full' (eigh), 'randomized' (block Krylov, needs
    the 'moments' estimator, never the full spectrum) or 'auto' (randomized for d >=
    RANDOMIZED_MIN_DIM when the estimator allows, else full). backend: the randomized
    solver's: 'auto' (RMTKD_BACKEND if set, else torch), 'torch' (Python loop) or 'cuda' (the
    loop in C++, CUDA tensors; by name it implies the randomized solver, through RMTKD_BACKEND
    it serves the solves that run randomized). Returns a SpectrumFit whose
    eigenvectors (d, k) have the type of ``cov``.

    When the randomized solver does not converge within its basis limit (more spikes than
    the basis holds): with solver='auto' the fit falls back to a full eigendecomposition and
    warns (:class:`~rmtkd.errors.SolverFallbackWarning`; the fit's ``solver`` is 'full' and
    ``info['fallback']`` says why); with solver='randomized' it raises
    :class:`~rmtkd.errors.SolverConvergenceError`.
    """
    from ..ops.eigen import block_krylov_top

    is_numpy = not isinstance(cov, torch.Tensor)
    dlpack = is_numpy and not isinstance(cov, np.ndarray) and hasattr(cov, "__dlpack__")
    if dlpack:  # CuPy (or another DLPack array): zero-copy, results in the caller's type
        c, is_numpy = torch.from_dlpack(cov).detach(), False
    else:
        c = torch.as_tensor(np.asarray(cov)) if is_numpy else cov.detach()
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"cov must be a square (d, d) matrix, got shape {tuple(c.shape)}")
    if not c.is_floating_point():
        raise TypeError(f"cov must be a float matrix, got {c.dtype}")
    if c.dtype not in (torch.float32, torch.float64):
        c = c.float()
    d = c.shape[0]
    n = _check_n(n, d)
    if d < 2:
        raise ValueError(f"need a covariance of at least 2 x 2, got {d} x {d}")
    if not bool(torch.isfinite(c).all()):
        raise ValueError("cov contains NaN or Inf")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    # solver="auto" (or backend="cuda" by name) may resolve to "randomized" below; only a
    # caller who asked for it may get an error instead of the fallback to eigh.
    explicit_randomized = solver == "randomized"
    estimator = resolve_estimator(estimator)
    be = _spikes_backend(backend, c.device, c.dtype)
    if be == "cuda" and (backend or "auto").strip().lower() == "cuda":
        if solver == "full" or estimator in FULL_SPECTRUM_ESTIMATORS:
            raise ValueError(f"backend='cuda' runs the randomized solver (estimator 'moments'), "
                             f"got solver={solver!r}, estimator={estimator!r}; use "
                             f"backend='torch' for a full eigendecomposition")
        solver = "randomized"  # asked for by name: the C++ loop at any d
    if solver == "randomized" and estimator in FULL_SPECTRUM_ESTIMATORS:
        raise ValueError(f"solver='randomized' never computes the full spectrum, which "
                         f"estimator {estimator!r} needs; use estimator='moments' or "
                         f"solver='full'")
    if solver == "auto":
        solver = ("randomized" if d >= RANDOMIZED_MIN_DIM
                  and estimator not in FULL_SPECTRUM_ESTIMATORS else "full")

    # Features with (numerically) zero variance are dead units: out of the MP fit.
    diag = c.diagonal().double()
    alive = diag > 1e-12 * float(diag.max().clamp_min(1e-300))
    idx = alive.nonzero().squeeze(1)
    ca = c if bool(alive.all()) else c.index_select(0, idx).index_select(1, idx)
    da = ca.shape[0]
    info: dict = {"dead_features": d - da}

    def embed(vecs: torch.Tensor) -> Any:
        if da < d:
            full = vecs.new_zeros(d, vecs.shape[1])
            full[idx] = vecs
            vecs = full
        if dlpack:
            from ..ops.cuda_ext import like_caller

            return like_caller(vecs, cov)
        return vecs.cpu().numpy() if is_numpy else vecs

    if da < 2:
        raise ValueError(f"the covariance has {da} feature(s) with nonzero variance; "
                         f"at least 2 are needed")

    if solver == "randomized":
        trace = float(diag[alive].sum())
        thr_of = _threshold_fn(margin, da, n)

        def threshold_of(vals: np.ndarray) -> float:
            spec = Spectrum(top=np.clip(vals, 0.0, None), trace=trace, d=da, n=n, full=False)
            return thr_of(fit_noise(spec, estimator, thr_of, tau=tau)[0])

        if be == "cuda":  # the same loop and threshold in one C++ call
            from ..ops.covariance import ieee_fp32_matmul
            from ..ops.cuda_ext import krylov_top

            with ieee_fp32_matmul():  # no TF32 in the products with C
                res = krylov_top(ca, unit=_threshold_unit(margin, da, n), trace=trace,
                                 d_alive=da, n=n, tau=tau, seed=seed)
        else:
            res = block_krylov_top(ca, threshold_of, seed=seed)
        info.update(basis_size=res.basis_size, matvecs=res.matvecs)
        if res.converged:
            top = np.clip(res.values, 0.0, None)
            spec = Spectrum(top=top, trace=trace, d=da, n=n, full=False)
            fit = _make_fit(spec, d, estimator, margin, tau, "randomized", None, info)
            fit.eigenvectors = embed(res.vectors[:, : fit.k])
            return fit
        why = (f"the randomized (block Krylov) solver did not converge on the {d} x {d} "
               f"covariance ({da} features with nonzero variance, n = {n}) within its basis "
               f"limit: {res.basis_size} vectors, {res.matvecs} products; the spectrum "
               f"probably has more spikes above the threshold than that basis can resolve")
        if explicit_randomized:
            raise SolverConvergenceError(
                f"{why}. Use solver='full' (an exact eigendecomposition, O(d^3) time and a "
                f"d x d eigenvector matrix) or solver='auto' (tries the randomized solver "
                f"and falls back to the full one with a warning)")
        warnings.warn(
            f"{why}; fell back to a full eigendecomposition (torch.linalg.eigh: exact, but "
            f"O(d^3) time and a d x d eigenvector matrix). Pass solver='full' for this site "
            f"to skip the randomized attempt", SolverFallbackWarning, stacklevel=2)
        info["fallback"] = "randomized solver did not converge within its basis limit"
    vals, vecs = torch.linalg.eigh(ca)
    vals, vecs = vals.flip(0), vecs.flip(1)
    top = np.clip(vals.double().cpu().numpy(), 0.0, None)
    drop = _degenerate_eigs(top, da, n, torch.finfo(ca.dtype).eps)
    info["degenerate"] = drop
    spec = Spectrum(top=top[: da - drop], trace=float(top[: da - drop].sum()), d=da - drop,
                    n=n, full=True)
    fit = _make_fit(spec, d, estimator, margin, tau, "full", None, info)
    fit.eigenvectors = embed(vecs[:, : fit.k])
    return fit
