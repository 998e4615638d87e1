"""Rank rules (rmtkd.rank_rules) and CompressConfig(rank_rule=...) in compress."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from rmtkd import CompressConfig, compress
from rmtkd.rank_rules import choose_k, energy_k, parse_rule, top_eigenvectors

# spectrum with trace 100: cumulative fractions 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0, 1.0
SPECTRUM = np.array([50.0, 30.0, 10.0, 5.0, 3.0, 1.0, 1.0, 0.0])


def _fit(k=2, eigenvalues=SPECTRUM, full=True):
    return SimpleNamespace(k=k, eigenvalues=np.asarray(eigenvalues), full_spectrum=full)


def test_choose_k_mp():
    assert choose_k("mp", _fit(k=3), 8) == 3
    assert choose_k("mp", _fit(k=0), 8) == 0


@pytest.mark.parametrize("f, k", [(0.5, 1), (0.6, 2), (0.8, 2), (0.85, 3), (0.9, 3),
                                  (0.91, 4), (0.99, 6), (1.0, 7)])
def test_choose_k_energy(f, k):
    assert choose_k(f"energy:{f}", _fit(), 8) == k
    # order of the given eigenvalues does not matter
    assert choose_k(f"energy:{f}", None, 8, eigenvalues=SPECTRUM[::-1].copy()) == k


def test_energy_edge_cases():
    assert energy_k(np.zeros(5), 0.9) == 1
    assert energy_k(np.array([1.0, -1e-12, 0.0]), 1.0) == 1   # negative round-off clipped
    with pytest.raises(ValueError, match="full spectrum"):
        choose_k("energy:0.9", _fit(eigenvalues=SPECTRUM[:3], full=False), 8)
    with pytest.raises(ValueError, match="expected 8 eigenvalues"):
        choose_k("energy:0.9", None, 8, eigenvalues=SPECTRUM[:3])


@pytest.mark.parametrize("r, d, k", [(0.25, 256, 64), (0.25, 10, 2), (0.01, 10, 1),
                                     (1.0, 7, 7), (0.5, 3, 2)])
def test_choose_k_uniform(r, d, k):
    assert choose_k(f"uniform:{r}", None, d) == k == max(1, round(r * d))


@pytest.mark.parametrize("bad", ["", "foo", "mp:0.5", "energy", "energy:", "energy:x",
                                 "energy:0", "energy:1.5", "uniform:-0.1", "uniform:nan",
                                 "uniform", None, 0.9])
def test_bad_rules(bad):
    with pytest.raises(ValueError):
        parse_rule(bad)
    with pytest.raises(ValueError):
        choose_k(bad, _fit(), 8)
    with pytest.raises(ValueError):
        CompressConfig(rank_rule=bad).validate()


def test_parse_rule():
    assert parse_rule("mp") == ("mp", None)
    assert parse_rule("energy:0.9") == ("energy", 0.9)
    assert parse_rule(" Uniform:0.25 ") == ("uniform", 0.25)


def test_top_eigenvectors():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(200, 12, generator=g, dtype=torch.float64)
    cov = (A.T @ A / 200).float()
    vals, vecs = top_eigenvectors(cov)
    assert vals.dtype == vecs.dtype == torch.float64
    assert bool((vals[:-1] >= vals[1:]).all())
    torch.testing.assert_close(vecs @ torch.diag(vals) @ vecs.T, cov.double(),
                               atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- compress


@pytest.fixture(scope="module")
def small_mlp():
    """A small trained MLP 16-40-40-4 on synthetic low-rank data (train, eval batches)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 3, generator=g) @ torch.randn(3, 16, generator=g) \
        + 0.1 * torch.randn(512, 16, generator=g)
    y = (X[:, :4].argmax(1))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                          nn.Linear(40, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    batches = list(zip(X.split(64), y.split(64)))
    return model.eval(), batches


def _compress(model, batches, rule, **kw):
    cfg = CompressConfig(rank_rule=rule, progress=False, epsilon=100.0, distill_epochs=1,
                         warmup_steps=2, calib_fraction=0.5, **kw)
    return compress(model, batches, eval_data=batches, config=cfg)


def test_compress_uniform_rule(small_mlp):
    model, batches = small_mlp
    res = _compress(model, batches, "uniform:0.25")
    applied = [r for r in res.history if r.status == "applied"]
    assert applied, [r.reason for r in res.history]
    for r in res.history:
        assert r.rank_rule == "uniform:0.25"
        assert r.k == round(0.25 * r.d) == 10
    for red in res.plan:
        assert red.k == 10 and tuple(red.basis.shape) == (red.d, 10)
    widths = [m.out_features for m in res.model if isinstance(m, nn.Linear)]
    assert widths == [10, 10, 4]
    assert res.to_dict()["config"]["rank_rule"] == "uniform:0.25"
    assert "rank rule uniform:0.25" in res.summary()
    assert res.history[0].to_dict()["rank_rule"] == "uniform:0.25"


def test_compress_energy_rule(small_mlp):
    model, batches = small_mlp
    res = _compress(model, batches, "energy:0.9")
    assert res.history
    for r in res.history:
        assert r.rank_rule == "energy:0.9"
        assert r.mp_k == res.fits[r.site].k
        # the full spectrum the fit saw (the first step's covariance is the original model's)
        lam = np.clip(np.sort(res.fits[r.site].eigenvalues)[::-1], 0, None) \
            if res.fits[r.site].full_spectrum else None
        if lam is not None and len(lam) == r.d:
            frac = np.cumsum(lam) / lam.sum()
            assert frac[r.k - 1] >= 0.9 - 1e-9
            assert r.k == 1 or frac[r.k - 2] < 0.9


def test_compress_energy_rule_matches_covariance(small_mlp, monkeypatch):
    """k at each site is the smallest k holding >= 90% of the site covariance's trace."""
    import importlib

    C = importlib.import_module("rmtkd.engine.step")

    seen = []
    real = C.top_eigenvectors

    def spy(cov):
        vals, vecs = real(cov)
        seen.append(vals.clone())
        return vals, vecs

    monkeypatch.setattr(C, "top_eigenvectors", spy)
    model, batches = small_mlp
    res = _compress(model, batches, "energy:0.9")
    assert len(seen) == len(res.history) >= 2
    for vals, r in zip(seen, res.history):
        frac = np.cumsum(vals.clamp(min=0).numpy()) / vals.clamp(min=0).sum().item()
        assert frac[r.k - 1] >= 0.9 and (r.k == 1 or frac[r.k - 2] < 0.9)
        if r.status == "applied":
            assert r.k < r.d


def test_compress_default_rule_is_mp(small_mlp):
    model, batches = small_mlp
    res = _compress(model, batches, "mp")
    assert res.config.rank_rule == "mp"
    for r in res.history:
        assert r.rank_rule == "mp" and r.k == r.mp_k == res.fits[r.site].k
