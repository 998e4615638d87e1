"""Rank rules: how many directions k to keep at a site.

``CompressConfig(rank_rule=...)`` picks one of

- ``"mp"`` (the default, the paper's): ``k = fit.k``, the spikes above the Marchenko-Pastur
  threshold of :func:`rmtkd.spikes`;
- ``"energy:<f>"`` (0 < f <= 1): the smallest k whose top eigenvalues hold at least the
  fraction ``f`` of the trace (negative round-off eigenvalues count as 0);
- ``"uniform:<r>"`` (0 < r <= 1): ``k = max(1, round(r * d))`` at every site (Python's
  ``round``, halves to even), whatever the spectrum.

The two heuristics are baselines for the comparison at equal parameter count (issue 3).

``"energy"`` needs every eigenvalue. :func:`choose_k` takes them from ``eigenvalues=`` when
given, else from ``fit.eigenvalues`` when ``fit.full_spectrum`` is True, and otherwise raises
ValueError (a partial spectrum cannot give the trace fraction). :func:`rmtkd.compress`
always passes the full spectrum of the site covariance: for a rule other than "mp" it
diagonalises ``stats.cov`` with :func:`top_eigenvectors` (``torch.linalg.eigh`` in float64,
fine at the widths of MLP / CNN / BERT sites), which also gives the k directions the
reduction keeps (``spikes()`` only returns the MP spike directions).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

RULES = ("mp", "energy", "uniform")


def parse_rule(rule: Any) -> tuple[str, float | None]:
    """``"mp"`` -> ("mp", None); ``"energy:0.9"`` -> ("energy", 0.9); ``"uniform:0.25"`` ->
    ("uniform", 0.25). Raises ValueError for anything else (unknown name, missing or
    non-numeric parameter, parameter outside (0, 1], a parameter given to "mp")."""
    if not isinstance(rule, str):
        raise ValueError(f"rank_rule must be a string such as 'mp', 'energy:0.9' or "
                         f"'uniform:0.25', got {rule!r}")
    name, sep, arg = rule.strip().partition(":")
    name = name.strip().lower()
    if name not in RULES:
        raise ValueError(f"rank_rule {rule!r}: unknown rule {name!r}; expected 'mp', "
                         f"'energy:<f>' or 'uniform:<r>'")
    if name == "mp":
        if sep:
            raise ValueError(f"rank_rule {rule!r}: 'mp' takes no parameter")
        return "mp", None
    if not sep or not arg.strip():
        raise ValueError(f"rank_rule {rule!r}: {name!r} needs a parameter, e.g. "
                         f"'{name}:{0.9 if name == 'energy' else 0.25}'")
    try:
        value = float(arg)
    except ValueError:
        raise ValueError(f"rank_rule {rule!r}: parameter {arg!r} is not a number") from None
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f"rank_rule {rule!r}: parameter must be in (0, 1], got {value}")
    return name, value


def energy_k(eigenvalues: Any, fraction: float) -> int:
    """Smallest k whose k largest eigenvalues hold >= ``fraction`` of their sum (negative
    eigenvalues clipped to 0). 1 when the spectrum is all zero."""
    lam = np.clip(np.sort(np.asarray(_numpy(eigenvalues), dtype=np.float64))[::-1], 0, None)
    total = lam.sum()
    if lam.size == 0:
        raise ValueError("energy rule: empty spectrum")
    if total <= 0:
        return 1
    cum = np.cumsum(lam) / total
    # a relative tolerance so that f = 1 and exact ties are not lost to round-off
    k = int(np.searchsorted(cum, fraction - 1e-12, side="left")) + 1
    return max(1, min(k, lam.size))


def uniform_k(d: int, ratio: float) -> int:
    return max(1, min(d, round(ratio * d)))


def choose_k(rule: str, fit: Any, d: int, eigenvalues: Any = None) -> int:
    """k at a site of width ``d`` under ``rule`` (see the module docstring).

    Args:
        rule: "mp", "energy:<f>" or "uniform:<r>".
        fit: the site's :class:`rmtkd.SpectrumFit` (``k``; ``eigenvalues`` and
            ``full_spectrum`` for "energy" when ``eigenvalues`` is None).
        d: the site's width.
        eigenvalues: optional full spectrum (any order) for "energy".
    Raises:
        ValueError: a bad rule, or "energy" without a full spectrum.
    """
    name, value = parse_rule(rule)
    if name == "mp":
        return int(fit.k)
    if name == "uniform":
        return uniform_k(int(d), value)
    if eigenvalues is None:
        if fit is None or not getattr(fit, "full_spectrum", False):
            raise ValueError(f"rank_rule {rule!r} needs the full spectrum: the fit has only "
                             f"the top eigenvalues (full_spectrum=False); pass "
                             f"eigenvalues= (e.g. from top_eigenvectors(cov)) or fit with a "
                             f"dense solver")
        eigenvalues = fit.eigenvalues
    if len(_numpy(eigenvalues)) != d:
        raise ValueError(f"rank_rule {rule!r}: expected {d} eigenvalues, got "
                         f"{len(_numpy(eigenvalues))}")
    return energy_k(eigenvalues, value)


def top_eigenvectors(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All eigenvalues (descending, float64, CPU) and the matching eigenvectors (d x d
    columns, float64, CPU) of a symmetric covariance, by ``torch.linalg.eigh`` in float64."""
    c = torch.as_tensor(cov).detach().to(device="cpu", dtype=torch.float64)
    c = 0.5 * (c + c.T)
    vals, vecs = torch.linalg.eigh(c)
    return vals.flip(0), vecs.flip(1)


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
