"""Review fixes: (1) the randomized spike solver never falls back to eigh silently;
(2) the CLI prints one ``rmtkd: error:`` line only for the job's own input errors, and lets
any other exception (a library bug) propagate with its traceback."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import rmtkd
from rmtkd.cli import main
from rmtkd.spectral import bbp_threshold
from rmtkd.spectral.synthetic import sample_covariance, spiked_samples

# ------------------------------------------------------------------ (1) solver fallback

D, N, K = 1024, 4096, 40     # d >= RANDOMIZED_MIN_DIM: solver="auto" picks randomized


@pytest.fixture(scope="module")
def spiked_cov() -> torch.Tensor:
    thr = bbp_threshold(D / N, 1.0)
    thetas = thr * 6.0 * np.geomspace(4.0, 1.0, K)
    s = spiked_samples(D, N, thetas, 1.0, seed=0, dtype=torch.float64)
    return sample_covariance(s.x)


@pytest.fixture()
def tiny_basis(monkeypatch):
    """The real block Krylov solver with a basis limit below the spike count, so it cannot
    converge; records each result."""
    import rmtkd.ops.eigen as eigen

    real, results = eigen.block_krylov_top, []

    def limited(c, threshold_of, **kw):
        res = real(c, threshold_of, **{**kw, "max_basis": 24})
        results.append(res)
        return res

    monkeypatch.setattr(eigen, "block_krylov_top", limited)
    return results


def test_auto_solver_fallback_warns_and_matches_full(spiked_cov, tiny_basis):
    full = rmtkd.spikes(spiked_cov, N, estimator="moments", solver="full")
    assert full.k == K
    from rmtkd.spectral import SolverFallbackWarning

    assert issubclass(SolverFallbackWarning, RuntimeWarning)
    with pytest.warns(SolverFallbackWarning) as rec:
        fit = rmtkd.spikes(spiked_cov, N, estimator="moments", solver="auto")
    assert tiny_basis and not tiny_basis[-1].converged   # the randomized attempt did fail
    msg = str(rec[0].message)
    assert f"{D} x {D}" in msg and "did not converge" in msg and "solver='full'" in msg
    assert fit.solver == "full" and fit.full_spectrum and "fallback" in fit.info
    assert fit.k == full.k
    np.testing.assert_allclose(fit.spike_eigenvalues, full.spike_eigenvalues, rtol=1e-10)


def test_explicit_randomized_solver_raises_when_it_does_not_converge(spiked_cov, tiny_basis):
    from rmtkd.spectral import SolverConvergenceError

    assert issubclass(SolverConvergenceError, RuntimeError)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # and no fallback warning either
        with pytest.raises(SolverConvergenceError, match=r"solver='full'.*'auto'"):
            rmtkd.spikes(spiked_cov, N, estimator="moments", solver="randomized")
    assert tiny_basis and not tiny_basis[-1].converged


def test_error_classes_live_in_a_leaf_module():
    import rmtkd.errors as errors

    src = Path(errors.__file__).read_text()
    assert "from ." not in src and "import rmtkd" not in src and "from rmtkd" not in src
    assert issubclass(errors.InputError, ValueError)
    from rmtkd.cli import UsageError
    from rmtkd.job import JobError

    assert issubclass(UsageError, errors.InputError) and issubclass(JobError, errors.InputError)


# ------------------------------------------------------------------ (2) CLI errors


@pytest.fixture()
def job(tmp_path: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    torch.save(model, tmp_path / "m.pt")
    x = torch.randn(64, 6)
    torch.save({"train": (x, (x[:, 0] > 0).long())}, tmp_path / "d.pt")
    np.save(tmp_path / "x.npy", x.numpy())
    return tmp_path / "m.pt", tmp_path / "d.pt"


def _bug(*_a, **_k):
    raise ValueError("bug")


def test_a_library_value_error_propagates_from_compress(job, tmp_path, monkeypatch):
    model, data = job
    monkeypatch.setattr(sys.modules["rmtkd.engine"], "compress", _bug)
    with pytest.raises(ValueError, match="^bug$") as e:
        main(["compress", "--model", str(model), "--data", str(data), "--quiet",
              "--out", str(tmp_path / "out")])
    assert type(e.value) is ValueError


@pytest.mark.parametrize("where", ["analyze_model", "spikes"])
def test_a_library_value_error_propagates_from_analyze(job, tmp_path, monkeypatch, where):
    model, _ = job
    monkeypatch.setattr(sys.modules["rmtkd.analysis"], where, _bug)
    with pytest.raises(ValueError, match="^bug$") as e:
        main(["analyze", "--model", str(model), "--data", str(tmp_path / "x.npy"),
              "--quiet", "--out", str(tmp_path / "out")])
    assert type(e.value) is ValueError


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rmtkd: error: "), err
    return err[0]


@pytest.mark.parametrize("problem, needle", [
    ("missing-model", "does not exist"),
    ("config-value", "calib_fraction must be in (0, 1]"),
    ("config-rank-rule", "rank_rule"),
])
def test_input_errors_still_exit_2_with_one_line(job, tmp_path, capsys, problem, needle):
    model, data = job
    argv = ["compress", "--model", str(model), "--data", str(data), "--quiet",
            "--out", str(tmp_path / "out")]
    if problem == "missing-model":
        argv[2] = str(tmp_path / "nope.pt")
    elif problem == "config-value":
        (tmp_path / "job.toml").write_text("[compress]\ncalib_fraction = 2.0\n")
        argv += ["--config", str(tmp_path / "job.toml")]
    else:
        (tmp_path / "job.toml").write_text('[compress]\nrank_rule = "no-such-rule"\n')
        argv += ["--config", str(tmp_path / "job.toml")]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert needle in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()
