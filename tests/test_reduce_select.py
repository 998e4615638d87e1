"""Width mode through a nonlinearity by unit selection (rmtkd.reduce.maths.select_units /
width_maps), and the conv sample count of the spectral fit."""
from __future__ import annotations

import copy
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rmtkd.capture.sites import Site, fit_samples, make_site
from rmtkd.distill.trainer import lr_schedule
from rmtkd.reduce import Reduction, reduce_site
from rmtkd.reduce.maths import select_units, width_maps


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _low_rank_acts(n: int, d: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g, dtype=torch.float64) @ torch.randn(
        k, d, generator=g, dtype=torch.float64) + torch.randn(d, generator=g,
                                                            dtype=torch.float64)


def test_select_units_reconstructs_rank_k_activations_exactly():
    d, k = 30, 6
    X = _low_rank_acts(400, d, k, 0)
    C = torch.cov(X.T, correction=0)
    U = torch.linalg.eigh(C).eigenvectors[:, -k:]
    S, R = select_units(C, U, ridge=0.0)
    assert S.shape == (k,) and len(set(S.tolist())) == k and bool((S[1:] > S[:-1]).all())
    assert torch.equal(R[S], torch.eye(k, dtype=torch.float64))
    mean = X.mean(0)
    rebuilt = mean + (X[:, S] - mean[S]) @ R.T
    assert rel(rebuilt, X) < 1e-9


def test_select_units_picks_the_units_that_carry_the_subspace():
    """Units outside span(U)'s support are never picked."""
    d, k = 12, 3
    U = torch.zeros(d, k, dtype=torch.float64)
    U[[2, 5, 9], [0, 1, 2]] = 1.0
    S, _ = select_units(torch.eye(d, dtype=torch.float64), U)
    assert S.tolist() == [2, 5, 9]


def test_width_select_through_relu_is_exact_for_rank_k_post_activations():
    """relu(fc1 x) of rank k (duplicated units): selecting k units and rebuilding the rest
    linearly is exact, where rotating through the ReLU is not."""
    torch.manual_seed(1)
    d_in, k, reps, d_out = 7, 5, 4, 3
    base = nn.Linear(d_in, k)
    fc1 = nn.Linear(d_in, k * reps)
    with torch.no_grad():   # unit j copies base unit j % k, scaled by a positive factor
        scale = torch.rand(k * reps) + 0.5
        fc1.weight.copy_(base.weight.repeat(reps, 1) * scale[:, None])
        fc1.bias.copy_(base.bias.repeat(reps) * scale)
    model = nn.Sequential(OrderedDict(fc1=fc1, act=nn.ReLU(), fc2=nn.Linear(k * reps, d_out)))
    model = model.double().eval()
    x = torch.randn(600, d_in, dtype=torch.float64)
    ref = model(x)
    h = torch.relu(model.fc1(x))
    C, mean = torch.cov(h.T, correction=0), h.mean(0)
    U = torch.linalg.eigh(C).eigenvectors[:, -k:]
    S, R = select_units(C, U, ridge=0.0)
    d = k * reps
    rotated = Reduction("fc2:input", "fc2", "width", d, k, U, mean)
    selected = Reduction("fc2:input", "fc2", "width", d, k, U, mean, S, R)
    assert width_maps(selected, nonlinear=True)[3] == "select"
    assert width_maps(selected, nonlinear=False)[3] == "rotate"     # auto: linear chain
    assert width_maps(Reduction("fc2:input", "fc2", "width", d, k, U, mean, S, R,
                                "select"), nonlinear=False)[3] == "select"
    rot_model = copy.deepcopy(model)
    assert reduce_site(rot_model, rotated).applied
    res = reduce_site(model, selected)
    assert res.applied and "d=20 -> k=5" in res.reason
    assert model.fc1.out_features == k and model.fc2.in_features == k
    assert rel(model(x), ref) < 1e-6   # C[S, S] is ill-conditioned: ~1e-8 here
    assert rel(rot_model(x), ref) > 1e-2


def test_reduction_checks_units():
    U = torch.linalg.qr(torch.randn(8, 3, dtype=torch.float64)).Q
    R = torch.zeros(8, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="go together"):
        Reduction("s", "m", "width", 8, 3, U, units=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="distinct"):
        Reduction("s", "m", "width", 8, 3, U, None, torch.tensor([0, 0, 2]), R)
    with pytest.raises(ValueError, match="surgery"):
        Reduction("s", "m", "width", 8, 3, U, surgery="twist")


def test_from_fit_selects_only_in_width_mode():
    site = SimpleNamespace(name="fc2:input", module_name="fc2", dim=10, where="input")
    X = _low_rank_acts(200, 10, 3, 2)
    stats = SimpleNamespace(mean=X.mean(0), cov=torch.cov(X.T, correction=0))
    fit = SimpleNamespace(k=3, eigenvectors=torch.linalg.eigh(stats.cov).eigenvectors[:, -3:])
    assert Reduction.from_fit(site, fit, stats, "width").units is not None
    assert Reduction.from_fit(site, fit, stats, "width", "rotate").units is None
    assert Reduction.from_fit(site, fit, stats, "project").units is None
    assert Reduction.from_fit(site, fit, stats, "width").to_dict()["surgery"] == "auto"


def test_fit_samples_counts_images_for_conv_sites():
    conv = make_site("c", nn.Conv2d(4, 8, 3))
    lin = make_site("l", nn.Linear(4, 8))
    assert fit_samples(conv, rows=40_000, samples=200) == 200
    assert fit_samples(conv, rows=40_000, samples=200, conv_samples="positions") == 40_000
    assert fit_samples(lin, rows=40_000, samples=200) == 40_000
    with pytest.raises(ValueError, match="conv_samples"):
        fit_samples(conv, 10, 2, conv_samples="pixels")
    emb = Site("e:output", "e", "embedding", 8, "output")
    assert fit_samples(emb, rows=40_000, samples=200, distinct=37) == 37
    assert fit_samples(emb, rows=30, samples=2, distinct=37) == 30
    with pytest.raises(ValueError, match="distinct"):
        fit_samples(emb, rows=40_000, samples=200)


def test_lr_schedule_ramps_then_decays_to_zero():
    f = lr_schedule(4, 24)
    assert [round(f(s), 3) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(14) == pytest.approx(0.5) and f(24) == 0.0
    assert all(f(s) >= f(s + 1) for s in range(4, 30))
    assert lr_schedule(0, None)(100) == 1.0
