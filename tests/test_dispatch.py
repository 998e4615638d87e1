"""Backend selection: explicit, per process, and clear errors (never a silent fallback)."""
import pytest
import torch

import rmtkd
from rmtkd.ops import resolve_backend


def test_auto_resolves_to_an_available_backend():
    assert resolve_backend("covariance", "auto", "cpu") == "torch"
    assert rmtkd.CovarianceAccumulator(4).backend == "torch"


def test_unimplemented_backend_is_a_clear_error():
    with pytest.raises(RuntimeError, match="not implemented for spikes"):
        resolve_backend("spikes", "triton", "cpu")
    # implemented but not runnable here (CPU tensors): says why
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run covariance on cpu"):
        rmtkd.CovarianceAccumulator(4, backend="cuda", device="cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("covariance", "numpy", "cpu")


def test_environment_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv("RMTKD_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="'cuda'"):
        rmtkd.CovarianceAccumulator(4)           # default "auto" defers to RMTKD_BACKEND
    assert resolve_backend("covariance", "torch", "cpu") == "torch"  # explicit wins
    monkeypatch.setenv("RMTKD_BACKEND", "torch")
    assert rmtkd.CovarianceAccumulator(4, device=torch.device("cpu")).backend == "torch"
