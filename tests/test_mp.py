"""Tests for the Marchenko–Pastur law in rmtkd.spectral.mp."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.integrate import quad
from threadpoolctl import threadpool_limits

from rmtkd.spectral.mp import (
    mp_cdf,
    mp_continuous_quantile,
    mp_edges,
    mp_median,
    mp_moment,
    mp_pdf,
    mp_quantile,
)

GAMMAS = [0.05, 0.2, 0.5, 1.0, 2.0, 5.0]


@pytest.fixture(autouse=True)
def _single_threaded_blas():
    """Small dense problems run faster, and without thread contention, on one BLAS thread."""
    with threadpool_limits(1):
        yield


def _integrate_pdf(gamma: float, power: int = 0, sigma2: float = 1.0, upper: float | None = None):
    a, b = mp_edges(gamma, sigma2)
    value, _ = quad(
        lambda x: x**power * mp_pdf(x, gamma, sigma2),
        a,
        b if upper is None else upper,
        limit=200,
        epsabs=1e-13,
        epsrel=1e-12,
    )
    return value


def _ks_distance(sample: np.ndarray, cdf) -> float:
    """sup_x |F_n(x) - F(x)|, exact also when F has atoms at sample points (the MP atom at 0)."""
    x = np.sort(sample)
    n = x.size
    right = np.searchsorted(x, x, side="right") / n
    left = np.searchsorted(x, x, side="left") / n
    f_right = cdf(x)
    f_left = cdf(np.nextafter(x, -np.inf))
    return float(max(np.max(np.abs(right - f_right)), np.max(np.abs(left - f_left))))


def _wishart_eigenvalues(n: int, d: int, sigma2: float, seed: int) -> np.ndarray:
    """All d eigenvalues of X^T X / n for X n x d iid N(0, sigma2); exact zeros when d > n."""
    x = np.random.default_rng(seed).normal(scale=math.sqrt(sigma2), size=(n, d))
    small = x @ x.T if d > n else x.T @ x  # same nonzero spectrum, no round-off "zeros"
    nonzero = np.linalg.eigvalsh(small / n)
    return np.concatenate([np.zeros(d - nonzero.size), nonzero])


@pytest.mark.parametrize("gamma", GAMMAS)
def test_pdf_mass(gamma: float) -> None:
    assert _integrate_pdf(gamma) == pytest.approx(min(1.0, 1.0 / gamma), abs=1e-8)


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("sigma2", [1.0, 2.5])
def test_moments_match_pdf_and_narayana(gamma: float, sigma2: float) -> None:
    assert mp_moment(0, gamma, sigma2) == 1.0
    assert mp_moment(1, gamma, sigma2) == pytest.approx(sigma2, rel=1e-14)
    assert mp_moment(2, gamma, sigma2) == pytest.approx(sigma2**2 * (1 + gamma), rel=1e-14)
    assert mp_moment(3, gamma, sigma2) == pytest.approx(
        sigma2**3 * (1 + 3 * gamma + gamma**2), rel=1e-14
    )
    for j in (1, 2, 3, 4):  # the atom at 0 adds nothing to moments j >= 1
        integral = _integrate_pdf(gamma, power=j, sigma2=sigma2)
        assert integral == pytest.approx(mp_moment(j, gamma, sigma2), rel=1e-8)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_edges(gamma: float) -> None:
    lo, hi = mp_edges(gamma, 3.0)
    assert lo == pytest.approx(3.0 * (1 - math.sqrt(gamma)) ** 2, abs=1e-15)
    assert hi == pytest.approx(3.0 * (1 + math.sqrt(gamma)) ** 2, rel=1e-15)
    assert mp_pdf(np.array([lo - 1e-9, hi + 1e-9, -1.0]), gamma, 3.0).tolist() == [0, 0, 0]


@pytest.mark.parametrize("gamma", GAMMAS)
def test_cdf_matches_integrated_pdf(gamma: float) -> None:
    a, b = mp_edges(gamma)
    atom = max(0.0, 1.0 - 1.0 / gamma)
    for x in np.linspace(a, b, 9)[1:-1]:
        expected = atom + _integrate_pdf(gamma, upper=x)
        assert mp_cdf(x, gamma) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_cdf_edges_and_monotone(gamma: float) -> None:
    a, b = mp_edges(gamma)
    assert mp_cdf(b, gamma) == 1.0
    assert mp_cdf(b + 1.0, gamma) == 1.0
    assert mp_cdf(-1e-12, gamma) == 0.0
    assert mp_cdf(a, gamma) == pytest.approx(max(0.0, 1.0 - 1.0 / gamma), abs=1e-14)
    values = mp_cdf(np.linspace(-0.5, b + 0.5, 2001), gamma)
    assert np.all(np.diff(values) >= 0.0)
    assert values.min() >= 0.0 and values.max() <= 1.0


@pytest.mark.parametrize("gamma", GAMMAS)
def test_quantile_inverts_cdf(gamma: float) -> None:
    a, b = mp_edges(gamma)
    x = np.linspace(a, b, 203)[1:-1]
    np.testing.assert_allclose(mp_quantile(mp_cdf(x, gamma), gamma), x, rtol=1e-9, atol=0)
    atom = max(0.0, 1.0 - 1.0 / gamma)
    p = np.linspace(atom, 1.0, 101)[1:-1]
    np.testing.assert_allclose(mp_cdf(mp_quantile(p, gamma), gamma), p, rtol=0, atol=1e-12)
    assert mp_quantile(1.0, gamma) == pytest.approx(b, rel=1e-15)


def test_quantile_tails_relative_accuracy() -> None:
    # gamma = 1: F(x) ~ (2/pi) sqrt(x) near 0, so tiny quantiles must keep relative precision
    p = np.array([1e-12, 1e-8, 1e-4])
    x = mp_quantile(p, 1.0)
    np.testing.assert_allclose(x, (math.pi * p / 2) ** 2, rtol=1e-3)
    np.testing.assert_allclose(mp_cdf(x, 1.0), p, rtol=1e-9)


@pytest.mark.parametrize("gamma", [2.0, 5.0])
def test_atom_mass(gamma: float) -> None:
    atom = 1.0 - 1.0 / gamma
    a, _ = mp_edges(gamma)
    assert mp_cdf(0.0, gamma) == pytest.approx(atom, abs=1e-15)
    assert mp_cdf(0.5 * a, gamma) == pytest.approx(atom, abs=1e-15)
    assert mp_pdf(0.0, gamma) == 0.0
    np.testing.assert_array_equal(mp_quantile(np.array([0.0, 0.5 * atom, atom]), gamma), 0.0)
    assert mp_quantile(atom + 1e-9, gamma) == pytest.approx(a, rel=1e-3)
    assert mp_median(gamma) == 0.0  # gamma >= 2: at least half the mass sits at 0


def test_median() -> None:
    assert mp_median(0.5) == mp_quantile(0.5, 0.5)
    assert mp_cdf(mp_median(0.5), 0.5) == pytest.approx(0.5, abs=1e-13)
    assert mp_median(1.5) > 0.0  # atom 1/3 < 1/2


@pytest.mark.parametrize("gamma", GAMMAS)
def test_continuous_quantile(gamma: float) -> None:
    p = np.linspace(0.0, 1.0, 51)
    q = mp_continuous_quantile(p, gamma)
    if gamma <= 1.0:
        np.testing.assert_array_equal(q, mp_quantile(p, gamma))
    else:
        atom = 1.0 - 1.0 / gamma
        np.testing.assert_allclose(mp_cdf(q, gamma), atom + p / gamma, atol=1e-12)
        assert q[0] == pytest.approx(mp_edges(gamma)[0], rel=1e-15)


@pytest.mark.parametrize("gamma", [0.2, 1.0, 2.0])
def test_sigma2_scaling(gamma: float) -> None:
    s2 = 2.5
    a, b = mp_edges(gamma)
    x = np.linspace(a, b, 31)[1:-1]
    np.testing.assert_allclose(mp_pdf(s2 * x, gamma, s2), mp_pdf(x, gamma) / s2, rtol=1e-13)
    np.testing.assert_allclose(mp_cdf(s2 * x, gamma, s2), mp_cdf(x, gamma), atol=1e-14)
    p = np.linspace(0.05, 0.95, 19)
    np.testing.assert_allclose(mp_quantile(p, gamma, s2), s2 * mp_quantile(p, gamma), rtol=1e-13)
    assert mp_moment(4, gamma, s2) == pytest.approx(s2**4 * mp_moment(4, gamma), rel=1e-14)


@pytest.mark.parametrize(
    ("n", "d", "sigma2", "seed"), [(2000, 400, 1.0, 0), (2000, 400, 3.0, 1), (400, 800, 1.0, 2)]
)
def test_wishart_ks_distance(n: int, d: int, sigma2: float, seed: int) -> None:
    gamma = d / n
    eig = _wishart_eigenvalues(n, d, sigma2, seed)
    assert _ks_distance(eig, lambda x: mp_cdf(x, gamma, sigma2)) < 0.03
    # power check: a 20% error in sigma2 is detected by the same statistic
    assert _ks_distance(eig, lambda x: mp_cdf(x, gamma, 1.2 * sigma2)) > 0.03
    if d > n:  # the nonzero eigenvalues follow the renormalised continuous part
        nonzero = np.sort(eig[d - n :])
        p = (np.arange(n) + 0.5) / n
        expected = mp_continuous_quantile(p, gamma, sigma2)
        assert np.max(np.abs(nonzero - expected)) < 0.05 * mp_edges(gamma, sigma2)[1]


def test_scalar_and_array_types() -> None:
    assert type(mp_pdf(1.0, 0.5)) is float
    assert type(mp_cdf(1.0, 0.5)) is float
    assert type(mp_quantile(0.3, 0.5)) is float
    assert type(mp_continuous_quantile(0.3, 2.0)) is float
    assert type(mp_moment(2, 0.5)) is float
    lo, hi = mp_edges(0.5)
    assert type(lo) is float and type(hi) is float
    for out in (mp_pdf([1.0, 2.0], 0.5), mp_cdf(np.ones((2, 3)), 0.5), mp_quantile([0.1], 0.5)):
        assert isinstance(out, np.ndarray) and out.dtype == np.float64
    assert mp_cdf(np.ones((2, 3)), 0.5).shape == (2, 3)


@pytest.mark.parametrize("gamma", [0.0, -1.0, math.nan, math.inf])
def test_bad_gamma(gamma: float) -> None:
    for fn in (mp_edges, mp_median):
        with pytest.raises(ValueError, match="gamma"):
            fn(gamma)
    for fn in (mp_pdf, mp_cdf, mp_quantile, mp_continuous_quantile):
        with pytest.raises(ValueError, match="gamma"):
            fn(0.5, gamma)
    with pytest.raises(ValueError, match="gamma"):
        mp_moment(2, gamma)


@pytest.mark.parametrize("sigma2", [0.0, -2.0, math.nan])
def test_bad_sigma2(sigma2: float) -> None:
    with pytest.raises(ValueError, match="sigma2"):
        mp_cdf(1.0, 0.5, sigma2)
    with pytest.raises(ValueError, match="sigma2"):
        mp_edges(0.5, sigma2)


@pytest.mark.parametrize("p", [-0.1, 1.1, math.nan, [0.5, 2.0]])
def test_bad_probability(p) -> None:
    for fn in (mp_quantile, mp_continuous_quantile):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            fn(p, 0.5)


@pytest.mark.parametrize("j", [-1, 1.5, True])
def test_bad_moment_order(j) -> None:
    with pytest.raises(ValueError, match="non-negative integer"):
        mp_moment(j, 0.5)
