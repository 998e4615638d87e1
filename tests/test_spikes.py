"""Spike detection on planted models with known answers (BBP), full vs randomized solver."""
import numpy as np
import pytest
import torch

import rmtkd
from rmtkd.spectral import bbp_threshold, mp_edges, spike_eigenvalue
from rmtkd.spectral.estimators import ESTIMATORS
from rmtkd.spectral.synthetic import sample_covariance, spiked_samples


def planted(d, n, k, *, strength=6.0, spread=4.0, sigma2=1.0, noise="gaussian", seed=0,
            dtype=torch.float64):
    """k spikes between strength and strength*spread times the BBP threshold."""
    thr = bbp_threshold(d / n, sigma2)
    thetas = thr * strength * np.geomspace(spread, 1.0, k) if k else []
    s = spiked_samples(d, n, thetas, sigma2, noise=noise, seed=seed, dtype=torch.float64)
    return s, sample_covariance(s.x).to(dtype)


def sin_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal-angle sine between the column spaces of a and b: ||(I - P_a) Q_b||_2
    (computed in float64 after re-orthonormalising, so fp32 rounding of the norms does not
    masquerade as an angle)."""
    qa, qb = torch.linalg.qr(a.double())[0], torch.linalg.qr(b.double())[0]
    return float(torch.linalg.matrix_norm(qb - qa @ (qa.T @ qb), ord=2))


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("d,n", [(200, 4000), (300, 600), (800, 400)])
def test_exact_spike_count_full(estimator, d, n):
    s, c = planted(d, n, 5, seed=2)
    # With the Tracy-Widom margin the null's largest eigenvalue stays below the threshold.
    fit = rmtkd.spikes(c, n, estimator=estimator, margin="tw:0.95", solver="full")
    assert fit.k == 5
    assert fit.sigma2 == pytest.approx(1.0, rel=0.05)
    assert fit.full_spectrum and fit.eigenvalues.size == d
    assert fit.eigenvectors.shape == (d, 5)


def test_spikes_below_bbp_are_not_detected():
    d, n = 400, 1600
    thr = bbp_threshold(d / n)
    thetas = [8 * thr, 5 * thr, 0.3 * thr, 0.2 * thr]
    s = spiked_samples(d, n, thetas, seed=3, dtype=torch.float64)
    fit = rmtkd.spikes(sample_covariance(s.x), n, solver="full")
    assert fit.k == 2


def test_spike_eigenvalues_follow_bbp_prediction():
    d, n = 400, 4000
    s, c = planted(d, n, 3, strength=10)
    fit = rmtkd.spikes(c, n, solver="full")
    pred = spike_eigenvalue(s.thetas, d / n, 1.0)
    np.testing.assert_allclose(fit.spike_eigenvalues, pred, rtol=0.06)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [0, 3, 24])
def test_randomized_matches_full(dtype, k):
    d, n = 600, 2400
    s, c = planted(d, n, k, seed=k)
    full = rmtkd.spikes(c.double(), n, estimator="moments", solver="full")
    rand = rmtkd.spikes(c.to(dtype), n, estimator="moments", solver="randomized")
    assert rand.solver == "randomized" and not rand.full_spectrum
    assert rand.k == full.k == k
    assert rand.sigma2 == pytest.approx(full.sigma2, rel=1e-4)
    # Also within 2% of the full-spectrum quantile estimators (the criterion).
    for est in ("median", "quantile-match"):
        other = rmtkd.spikes(c.double(), n, estimator=est, solver="full")
        assert other.k == k
        assert rand.sigma2 == pytest.approx(other.sigma2, rel=0.02)
    if k:
        np.testing.assert_allclose(rand.spike_eigenvalues, full.spike_eigenvalues, rtol=1e-4)
        assert sin_angle(rand.eigenvectors, full.eigenvectors) < 1e-3
        assert rand.eigenvectors.dtype == dtype


@pytest.mark.parametrize("gamma", [0.05, 0.2, 0.5, 1.0, 2.0])
def test_randomized_grid_agrees_with_full(gamma):
    d = 300
    n = int(d / gamma)
    s, c = planted(d, n, 6, seed=11)
    full = rmtkd.spikes(c, n, estimator="moments", solver="full")
    rand = rmtkd.spikes(c, n, estimator="moments", solver="randomized")
    assert rand.k == full.k == 6
    assert rand.sigma2 == pytest.approx(full.sigma2, rel=0.02)


def test_numpy_in_numpy_out_and_analyze():
    d, n = 150, 3000
    s, c = planted(d, n, 4)
    fit = rmtkd.spikes(c.numpy(), n, solver="full")
    assert isinstance(fit.eigenvectors, np.ndarray) and fit.eigenvectors.shape == (d, 4)
    again = rmtkd.analyze(np.linalg.eigvalsh(c.numpy()), n)
    assert again.k == 4 and again.sigma2 == pytest.approx(fit.sigma2, rel=1e-9)
    assert again.eigenvectors is None
    d_ = fit.to_dict()
    assert d_["k"] == 4 and len(d_["eigenvalues"]) == d


def test_fit_quality_and_edges():
    d, n = 300, 3000
    s, c = planted(d, n, 0)
    fit = rmtkd.spikes(c, n, solver="full")
    assert fit.k == 0
    assert fit.ks_distance < 0.05
    lm, lp = mp_edges(d / n, fit.sigma2)
    assert (fit.lambda_minus, fit.lambda_plus) == pytest.approx((lm, lp))
    # A white-noise covariance from heavy-tailed data is still mostly bulk.
    s, c = planted(d, n, 0, noise="student-t")
    assert rmtkd.spikes(c, n, solver="full").k <= 1


def test_tracy_widom_margin_raises_threshold():
    d, n = 300, 3000
    s, c = planted(d, n, 3)
    plain = rmtkd.spikes(c, n, solver="full")
    tw = rmtkd.spikes(c, n, margin="tw:0.99", solver="full")
    rel = rmtkd.spikes(c, n, margin=0.5, solver="full")
    assert tw.threshold > plain.threshold and tw.k == 3
    assert rel.threshold == pytest.approx(1.5 * rel.lambda_plus)


def test_dead_units_and_rank_deficiency():
    d, n = 120, 1000
    s, c = planted(d, n, 3)
    dead = torch.zeros(d + 10, d + 10, dtype=c.dtype)
    perm = torch.randperm(d + 10, generator=torch.Generator().manual_seed(0))[:d]
    dead[perm[:, None], perm[None, :]] = c
    fit = rmtkd.spikes(dead, n, solver="full")
    assert fit.k == 3 and fit.d == d + 10 and fit.d_eff == d
    dead_rows = ~np.isin(np.arange(d + 10), perm.numpy())
    assert bool((fit.eigenvectors[torch.from_numpy(dead_rows)] == 0).all())
    # Duplicated features add zero eigenvalues that are not MP's atom.
    x = torch.cat([s.x, s.x[:, :20]], 1)
    fit = rmtkd.spikes(sample_covariance(x), n, solver="full")
    assert fit.d_eff == d and fit.sigma2 == pytest.approx(1.0, rel=0.1)
    # n < d: gamma > 1, the zero eigenvalues are the MP atom.
    s, c = planted(300, 100, 2, strength=8)
    fit = rmtkd.spikes(c, 100, solver="full")
    assert fit.gamma == pytest.approx(3.0) and fit.k == 2


def test_bad_inputs():
    c = torch.eye(5)
    with pytest.raises(ValueError, match="at least 2 samples"):
        rmtkd.spikes(c, 1)
    with pytest.raises(ValueError, match="square"):
        rmtkd.spikes(torch.ones(3, 4), 10)
    with pytest.raises(ValueError, match="NaN"):
        rmtkd.spikes(torch.full((3, 3), float("nan")), 10)
    with pytest.raises(ValueError, match="estimator"):
        rmtkd.spikes(c, 10, estimator="nope")
    with pytest.raises(ValueError, match="full spectrum"):
        rmtkd.spikes(c, 10, estimator="median", solver="randomized")
    with pytest.raises(ValueError, match="solver"):
        rmtkd.spikes(c, 10, solver="lanczos")
    with pytest.raises(ValueError, match="margin"):
        rmtkd.spikes(c, 10, margin="bogus")
    with pytest.raises(ValueError, match="nonzero variance"):
        rmtkd.spikes(torch.zeros(4, 4), 10)
    with pytest.raises(TypeError):
        rmtkd.spikes(torch.eye(3, dtype=torch.int64), 10)


def test_randomized_solver_on_a_rank_deficient_matrix():
    # n < d: rank n - 1, so the Krylov space is exhausted before the basis limit.
    d, n = 400, 60
    s, c = planted(d, n, 3, strength=10)
    full = rmtkd.spikes(c, n, solver="full")
    rand = rmtkd.spikes(c.float(), n, solver="randomized")
    assert rand.k == full.k == 3
    assert rand.sigma2 == pytest.approx(full.sigma2, rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("k", [0, 8, 64])
def test_randomized_on_cuda_matches_cpu_full(k):
    d, n = 1536, 6144
    s, c = planted(d, n, k, seed=5)
    full = rmtkd.spikes(c, n, solver="full")
    gpu = rmtkd.spikes(c.float().cuda(), n, solver="randomized")
    assert gpu.solver == "randomized" and gpu.eigenvectors.is_cuda
    assert gpu.k == full.k == k
    assert gpu.sigma2 == pytest.approx(full.sigma2, rel=1e-4)
    if k:
        np.testing.assert_allclose(gpu.spike_eigenvalues, full.spike_eigenvalues, rtol=1e-4)
        assert sin_angle(gpu.eigenvectors.cpu(), full.eigenvectors) < 1e-3
