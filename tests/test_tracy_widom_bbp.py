"""Tests for rmtkd.spectral.tracy_widom (TW1, Johnstone's largest-eigenvalue law) and
rmtkd.spectral.bbp (spiked covariance model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.linalg import eigh
from threadpoolctl import threadpool_limits

from rmtkd.spectral.bbp import bbp_threshold, spike_eigenvalue, spike_overlap, spike_strength
from rmtkd.spectral.mp import mp_edges
from rmtkd.spectral.tracy_widom import largest_eigenvalue_quantile, tw1_cdf, tw1_quantile


@pytest.fixture(autouse=True)
def _single_threaded_blas():
    """Small dense problems run faster, and without thread contention, on one BLAS thread."""
    with threadpool_limits(1):
        yield


# ---------------------------------------------------------------- Tracy-Widom (beta = 1)


@pytest.mark.parametrize(("p", "expected"), [(0.90, 0.4501), (0.95, 0.9793), (0.99, 2.0234)])
def test_tw1_published_quantiles(p: float, expected: float) -> None:
    assert tw1_quantile(p) == pytest.approx(expected, abs=1e-3)
    assert tw1_cdf(tw1_quantile(p)) == pytest.approx(p, abs=1e-12)


def test_tw1_mean_and_variance() -> None:
    """E[S] = int_0^inf (1 - F) - int_{-inf}^0 F; published (Bornemann 2010): mean
    -1.2065335745820, variance 1.607781034581."""
    nodes, weights = np.polynomial.legendre.leggauss(60)
    s_neg, s_pos = 6.0 * (nodes - 1.0), 6.0 * (nodes + 1.0)  # [-12, 0] and [0, 12]
    w = 6.0 * weights
    f_neg, tail_pos = tw1_cdf(s_neg), 1.0 - tw1_cdf(s_pos)
    mean = np.sum(w * tail_pos) - np.sum(w * f_neg)
    second = 2.0 * np.sum(w * s_pos * tail_pos) - 2.0 * np.sum(w * s_neg * f_neg)
    assert mean == pytest.approx(-1.2065335745820, abs=1e-9)
    assert second - mean**2 == pytest.approx(1.607781034581, abs=1e-9)


def test_tw1_cdf_monotone_and_bounded() -> None:
    s = np.linspace(-10.0, 8.0, 181)
    f = tw1_cdf(s)
    assert f.shape == s.shape and f.dtype == np.float64
    assert np.all((f >= 0.0) & (f <= 1.0))
    assert np.all(np.diff(f) >= 0.0)
    assert f[0] < 1e-20 and 1.0 - f[-1] < 1e-8
    assert tw1_cdf(-50.0) == 0.0 and tw1_cdf(50.0) == 1.0


def test_tw1_quantile_types_and_limits() -> None:
    assert type(tw1_quantile(0.5)) is float and type(tw1_cdf(0.0)) is float
    q = tw1_quantile(np.array([0.1, 0.5, 0.9]))
    assert isinstance(q, np.ndarray) and np.all(np.diff(q) > 0)
    assert tw1_quantile(0.0) == -math.inf and tw1_quantile(1.0) == math.inf
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError):
            tw1_quantile(bad)


def _top_eigenvalues(d: int, n: int, sigma2: float, draws: int, seed: int) -> np.ndarray:
    """Largest eigenvalue of X^T X / n for ``draws`` independent X (n x d, iid N(0, sigma2))."""
    x = np.random.default_rng(seed).normal(scale=math.sqrt(sigma2), size=(draws, n, d))
    xt = x.transpose(0, 2, 1)
    gram = x @ xt if d > n else xt @ x  # same nonzero spectrum, smaller matrix
    return np.linalg.eigvalsh(gram / n)[:, -1]


@pytest.mark.parametrize(("d", "n", "sigma2"), [(40, 160, 1.0), (160, 40, 2.0)])
def test_largest_eigenvalue_quantile_vs_simulation(d: int, n: int, sigma2: float) -> None:
    draws = 1000
    top = _top_eigenvalues(d, n, sigma2, draws, seed=d + n)
    for p in (0.1, 0.5, 0.9, 0.95):
        q = largest_eigenvalue_quantile(p, d, n, sigma2)
        hit_rate = np.mean(top <= q)  # ~ Binomial(draws, p) / draws if the law is right
        assert abs(hit_rate - p) < 4.0 * math.sqrt(p * (1 - p) / draws) + 0.01
    # the TW margin sits above the bulk edge for p = 0.95 and the centring is ~ lambda_+
    assert largest_eigenvalue_quantile(0.95, d, n, sigma2) > mp_edges(d / n, sigma2)[1]


def test_largest_eigenvalue_quantile_formula() -> None:
    d, n, p = 40, 160, 0.9
    rn, rd = math.sqrt(n - 0.5), math.sqrt(d - 0.5)
    expected = ((rn + rd) ** 2 + (rn + rd) * (1 / rn + 1 / rd) ** (1 / 3) * tw1_quantile(p)) / n
    assert largest_eigenvalue_quantile(p, d, n) == pytest.approx(expected, rel=1e-14)
    assert largest_eigenvalue_quantile(p, d, n, 3.0) == pytest.approx(3.0 * expected, rel=1e-14)
    # symmetric in (d, n) on the X^T X scale: l1 / d for d x n equals l1 / n for n x d
    swapped = largest_eigenvalue_quantile(p, n, d) * d / n
    assert largest_eigenvalue_quantile(p, d, n) == pytest.approx(swapped, rel=1e-14)
    q = largest_eigenvalue_quantile(np.array([0.5, 0.9]), d, n)
    assert isinstance(q, np.ndarray) and q[1] == pytest.approx(expected, rel=1e-14)
    for bad in ((0.9, 0, 10), (0.9, 10, 2.5), (0.9, 10, 10, -1.0), (1.2, 10, 10)):
        with pytest.raises(ValueError):
            largest_eigenvalue_quantile(*bad)


# ---------------------------------------------------------------- BBP


def _spiked_top(d: int, n: int, theta: float, draws: int, seed: int) -> tuple[float, float]:
    """Mean top eigenvalue of X^T X / n and mean squared overlap of its eigenvector with e_1,
    population covariance I + theta e_1 e_1^T."""
    rng = np.random.default_rng(seed)
    tops, overlaps = [], []
    for _ in range(draws):
        x = rng.normal(size=(n, d))
        x[:, 0] *= math.sqrt(1.0 + theta)
        w, v = eigh(x.T @ x / n, subset_by_index=[d - 1, d - 1])  # top eigenpair only
        tops.append(w[0])
        overlaps.append(v[0, 0] ** 2)
    return float(np.mean(tops)), float(np.mean(overlaps))


def test_bbp_threshold_and_edge_continuity() -> None:
    assert bbp_threshold(0.25, 2.0) == pytest.approx(1.0, rel=1e-15)
    gamma, sigma2 = 0.3, 1.7
    thr = bbp_threshold(gamma, sigma2)
    lam_plus = mp_edges(gamma, sigma2)[1]
    assert spike_eigenvalue(thr * (1 + 1e-9), gamma, sigma2) == pytest.approx(lam_plus, rel=1e-8)
    assert spike_eigenvalue(thr, gamma, sigma2) == lam_plus
    assert spike_overlap(thr * (1 + 1e-9), gamma, sigma2) == pytest.approx(0.0, abs=1e-8)


def test_spike_above_threshold_vs_simulation() -> None:
    d, n = 400, 2000
    gamma = d / n
    theta = 3.0 * bbp_threshold(gamma)
    top, overlap = _spiked_top(d, n, theta, draws=8, seed=0)
    assert top == pytest.approx(spike_eigenvalue(theta, gamma), rel=0.03)
    assert overlap == pytest.approx(spike_overlap(theta, gamma), abs=0.05)
    assert top > 1.1 * mp_edges(gamma)[1]  # really separated from the bulk


def test_spike_below_threshold_sticks_to_edge() -> None:
    d, n = 400, 2000
    gamma = d / n
    theta = 0.5 * bbp_threshold(gamma)
    lam_plus = mp_edges(gamma)[1]
    assert spike_eigenvalue(theta, gamma) == lam_plus
    assert spike_overlap(theta, gamma) == 0.0
    top, overlap = _spiked_top(d, n, theta, draws=8, seed=1)
    assert top == pytest.approx(lam_plus, rel=0.03)
    assert overlap < 0.05  # vs ~0.77 for the supercritical spike above


@pytest.mark.parametrize(("gamma", "sigma2"), [(0.2, 1.0), (0.5, 2.5), (3.0, 0.7)])
def test_spike_strength_inverts_spike_eigenvalue(gamma: float, sigma2: float) -> None:
    theta = bbp_threshold(gamma, sigma2) * np.array([1.01, 1.5, 3.0, 10.0, 100.0])
    lam = spike_eigenvalue(theta, gamma, sigma2)
    assert np.all(lam > mp_edges(gamma, sigma2)[1])
    np.testing.assert_allclose(spike_strength(lam, gamma, sigma2), theta, rtol=1e-10)
    lam_plus = mp_edges(gamma, sigma2)[1]
    below = spike_strength(np.array([0.5 * lam_plus, lam_plus]), gamma, sigma2)
    assert np.all(np.isnan(below))


def test_bbp_overlap_formula_and_types() -> None:
    gamma, sigma2, theta = 0.5, 2.0, 4.0
    expected = (1 - gamma * sigma2**2 / theta**2) / (1 + gamma * sigma2 / theta)
    assert spike_overlap(theta, gamma, sigma2) == pytest.approx(expected, rel=1e-15)
    assert type(spike_overlap(theta, gamma, sigma2)) is float
    assert type(spike_strength(10.0, gamma, sigma2)) is float
    out = spike_eigenvalue([0.1, 5.0], gamma, sigma2)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    assert math.isnan(spike_eigenvalue(math.nan, gamma))
    with pytest.raises(ValueError, match="gamma"):
        bbp_threshold(-1.0)
    with pytest.raises(ValueError, match="sigma2"):
        spike_strength(3.0, 0.5, 0.0)
