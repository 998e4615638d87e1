"""CovarianceAccumulator against a float64 two-pass reference.

Error thresholds are relative Frobenius errors ||out - ref|| / ||ref||. The reference is
computed in float64 on the very same (already rounded) input values, so input precision
does not enter; only the accumulation dtype does:
- fp32 accumulation: 1e-5 (~84 fp32 epsilons; shifted sums of O(1) terms stay near 1e-6,
  worst seen 1.2e-6, while TF32 or an unshifted one-pass formula miss it by orders).
- fp64 accumulation: 1e-12 (worst seen 3e-16).
Input data are correlated rows whose means are large relative to their spread.
"""
from __future__ import annotations

import pytest
import torch

import rmtkd.ops.covariance as cov_mod
from rmtkd.ops.covariance import (CovarianceAccumulator, CovarianceStats, NonFiniteInputError,
                                  merge_moments)

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
DIMS = [1, 3, 129, 423]
NS = [2, 7, 1000]
IN_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
ACC_DTYPES = [torch.float32, torch.float64]


def _data(n: int, d: int, dtype: torch.dtype, seed: int, offset: float = 10.0,
          lead: tuple[int, ...] = ()) -> torch.Tensor:
    """Correlated rows with a non-zero mean: shape lead + (n, d) in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    mu = offset * (1 + torch.rand(d, generator=g, dtype=torch.float64))
    x = torch.randn(*lead, n, d, generator=g, dtype=torch.float64) @ a + mu
    return x.to(dtype)


def _ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 two-pass mean and covariance (divided by n) of the rows of ``x``."""
    x = x.reshape(-1, x.shape[-1]).double()
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / x.shape[0]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _check(stats: CovarianceStats, x: torch.Tensor, acc: torch.dtype) -> None:
    mu, cov = _ref(x)
    assert stats.n == x.reshape(-1, x.shape[-1]).shape[0]
    assert stats.cov.dtype == acc and stats.mean.dtype == acc
    assert stats.cov.shape == cov.shape and stats.mean.shape == mu.shape
    assert torch.equal(stats.cov, stats.cov.mT), "cov must be exactly symmetric"
    assert _rel(stats.cov, cov) < TOL[acc]
    assert _rel(stats.mean, mu) < TOL[acc]


@pytest.mark.parametrize("acc", ACC_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", IN_DTYPES, ids=str)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("d", DIMS)
def test_matches_float64_reference(d: int, n: int, dtype: torch.dtype, acc: torch.dtype) -> None:
    x = _data(n, d, dtype, seed=d * 1000 + n)
    acc_ = CovarianceAccumulator(d, acc_dtype=acc)
    assert acc_.update(x) is acc_
    _check(acc_.finalize(), x, acc)


@pytest.mark.parametrize("acc", ACC_DTYPES, ids=str)
def test_many_small_updates_match_one_pass(acc: torch.dtype) -> None:
    x = _data(1000, 129, torch.float32, seed=1)
    one = CovarianceAccumulator(129, acc_dtype=acc).update(x).finalize()
    many = CovarianceAccumulator(129, acc_dtype=acc)
    for chunk in x.split([1, 2, 3, 94, 300, 600]):
        many.update(chunk)
    many = many.finalize()
    _check(many, x, acc)
    assert _rel(many.cov, one.cov) < TOL[acc]


@pytest.mark.parametrize("acc", ACC_DTYPES, ids=str)
def test_merge_equals_one_pass(acc: torch.dtype) -> None:
    x = _data(1000, 129, torch.float32, seed=2, offset=1e3)
    one = CovarianceAccumulator(129, acc_dtype=acc).update(x).finalize()
    parts = [CovarianceAccumulator(129, acc_dtype=acc).update(c) for c in x.split([1, 499, 500])]
    before = parts[1].state_dict()
    merged = CovarianceAccumulator(129, acc_dtype=acc)
    for p in parts:
        assert merged.merge(p) is merged
    merged.merge(CovarianceAccumulator(129, acc_dtype=acc))  # empty: no-op
    out = merged.finalize()
    assert out.n == 1000
    _check(out, x, acc)
    assert _rel(out.cov, one.cov) < TOL[acc]
    after = parts[1].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in ("mean", "m2")), "merge changed other"


def test_merge_moments_function() -> None:
    """The pairwise update on its own: two halves give the moments of the whole."""
    x = _data(300, 5, torch.float64, seed=3)
    a, b = x[:100], x[100:]
    ma, mb = a.mean(0), b.mean(0)
    n, mean, m2 = merge_moments(100, ma.clone(), (a - ma).T @ (a - ma),
                                200, mb, (b - mb).T @ (b - mb))
    mu, cov = _ref(x)
    assert n == 300
    assert _rel(mean, mu) < 1e-14 and _rel(m2 / n, cov) < 1e-13


def test_large_mean_over_std_one_million_rows() -> None:
    """|mean|/std = 1e3, 1e6 rows streamed, fp32 accumulation: 1e-5 of the fp64 two-pass."""
    d, n = 32, 1_000_000
    g = torch.Generator().manual_seed(4)
    a = torch.randn(d, d, generator=g) / d ** 0.5
    mu = 1e3 * (1 + 0.1 * torch.rand(d, generator=g))
    x = torch.randn(n, d, generator=g) @ a + mu  # fp32 data, std ~ 1
    ref_mu, ref = _ref(x)
    acc = CovarianceAccumulator(d)
    for chunk in x.split(65536):
        acc.update(chunk)
    out = acc.finalize()
    assert out.n == n
    assert _rel(out.cov, ref) < 1e-5
    assert _rel(out.mean, ref_mu) < 1e-6
    # The same data defeat an unshifted fp32 one-pass formula, so the test has teeth.
    s = x.sum(0) / n
    naive = x.T @ x / n - torch.outer(s, s)
    assert _rel(naive, ref) > 1e-2
    # Chunks accumulated separately and merged agree with the single stream.
    parts = [CovarianceAccumulator(d).update(c) for c in x.split(250_000)]
    merged = parts[0]
    for p in parts[1:]:
        merged.merge(p)
    assert _rel(merged.finalize().cov, out.cov) < 1e-6


@pytest.mark.parametrize("acc", ACC_DTYPES, ids=str)
def test_mask_selects_rows(acc: torch.dtype) -> None:
    x = _data(50, 129, torch.bfloat16, seed=5, lead=(3,))  # [3, 50, 129]
    mask = torch.rand(3, 50, generator=torch.Generator().manual_seed(6)) < 0.6
    out = CovarianceAccumulator(129, acc_dtype=acc).update(x, mask).finalize()
    _check(out, x[mask], acc)


def test_all_masked_and_empty_updates_are_noops() -> None:
    x = _data(20, 3, torch.float32, seed=7, lead=(2,))
    acc = CovarianceAccumulator(3).update(x)
    state = acc.state_dict()
    acc.update(x + float("nan"), torch.zeros(2, 20, dtype=torch.bool))  # masked rows ignored
    acc.update(torch.empty(0, 3))
    assert acc.n == 40
    after = acc.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in ("mean", "m2"))


def test_single_row_and_noncontiguous_input() -> None:
    x = _data(9, 423, torch.float32, seed=8)
    acc = CovarianceAccumulator(423)
    acc.update(x[0])  # shape (d,): one row
    acc.update(x[1:].T.contiguous().T)  # column-major view
    _check(acc.finalize(), x, torch.float32)


def test_lower_triangle_of_state_is_never_read() -> None:
    """Only the upper triangle of M2 is authoritative: poison the rest before finalize."""
    x = _data(100, 129, torch.float32, seed=9)
    acc = CovarianceAccumulator(129).update(x[:40])
    lower = torch.ones(129, 129, dtype=torch.bool).tril(-1)
    acc._m2[lower] = float("nan")
    acc.update(x[40:])
    acc._m2[lower] = float("nan")
    _check(acc.finalize(), x, torch.float32)


def test_workspace_reuse_and_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stale workspace rows must not leak into a smaller batch; multi-chunk batches are exact."""
    monkeypatch.setattr(cov_mod, "_MIN_CHUNK_ROWS", 64)
    monkeypatch.setattr(cov_mod, "_CHUNK_ELEMS", 64 * 130)
    x = _data(700, 129, torch.float16, seed=10)
    acc = CovarianceAccumulator(129).update(x[:500])  # 500 rows: 8 balanced chunks of <= 63
    assert acc._workspace is not None and acc._workspace.shape[0] == 63
    acc._workspace[:, :129] = float("nan")
    acc.update(x[500:530])  # 30 rows: a prefix of the poisoned workspace
    acc.update(x[530:])
    _check(acc.finalize(), x, torch.float32)


@pytest.mark.parametrize("acc", ACC_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_gram_paths_agree(dtype: torch.dtype, acc: torch.dtype) -> None:
    """The plain-torch path (used off CPU) and every CPU product match float64."""
    x = _data(257, 300, dtype, seed=11).reshape(257, 300)
    shift = x.double().mean(0).to(acc) + 0.5
    xs = x.double() - shift.double()
    g_ref, s_ref = xs.T @ xs, xs.sum(0)
    ws = torch.full((100, 301), float("nan"), dtype=acc)  # 3 chunks, poisoned
    ws[:, 300] = 1
    outs = [cov_mod._shifted_gram_matmul(x, shift)]
    outs += [cov_mod._shifted_gram_cpu(x, shift, ws, method)
             for method in ("gemm", "blocks", "syrk")]
    for g, s in outs:
        assert g.dtype == s.dtype == acc and g.shape == (300, 300) and s.shape == (300,)
        assert _rel(g.triu(), g_ref.triu()) < TOL[acc] and _rel(s, s_ref) < TOL[acc]


@pytest.mark.parametrize("method", ["blocks", "syrk"])
@pytest.mark.parametrize("d", [3, 129, 423])
def test_upper_triangle_products_end_to_end(monkeypatch: pytest.MonkeyPatch, d: int,
                                            method: str) -> None:
    """Force a large-product method (normally only for big d) through whole updates."""
    monkeypatch.setattr(cov_mod, "_cpu_method", lambda rows, dim: method)
    monkeypatch.setattr(cov_mod, "_BLOCK_COLS", 64)  # several blocks even at d = 129
    x = _data(1000, d, torch.bfloat16, seed=14, offset=1e3)
    for acc in ACC_DTYPES:
        a = CovarianceAccumulator(d, acc_dtype=acc)
        for chunk in x.split([1, 99, 900]):
            a.update(chunk)
        _check(a.finalize(), x, acc)


def test_cpu_method_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cov_mod._cpu_method(16384, 256) == "gemm"
    assert cov_mod._cpu_method(1024, 1024) == "gemm"
    monkeypatch.setattr(cov_mod, "_scipy_openblas", lambda: None)
    assert cov_mod._cpu_method(16384, 1024) == "blocks"


def test_openblas_pool_restarts_after_release() -> None:
    """Releasing OpenBLAS's workers after a syrk call leaves later calls correct."""
    openblas = cov_mod._scipy_openblas()
    if openblas is None:
        pytest.skip("scipy's OpenBLAS (or threadpoolctl) not found: syrk is not used")
    x = _data(4096, 300, torch.float32, seed=15).reshape(4096, 300)
    ws = torch.empty(4096, 301)
    ws[:, 300] = 1
    shift = x.mean(0)
    first = cov_mod._shifted_gram_cpu(x, shift, ws, "syrk")[0].clone()
    openblas.shutdown()  # idempotent
    again = cov_mod._shifted_gram_cpu(x, shift, ws, "syrk")[0]
    assert _rel(again, first) < 1e-6


def test_matmul_precision_is_restored() -> None:
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with cov_mod.ieee_fp32_matmul():
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(prev)


def test_state_dict_round_trip_is_exact() -> None:
    x = _data(300, 129, torch.float32, seed=12)
    a = CovarianceAccumulator(129).update(x[:200])
    state = a.state_dict()
    assert set(state) == {"dim", "n", "mean", "m2"}
    assert isinstance(state["n"], int) and isinstance(state["dim"], int)
    b = CovarianceAccumulator(129)
    b.load_state_dict(state)
    state["m2"].fill_(0)  # b holds copies
    assert b.n == 200
    a.update(x[200:])
    b.update(x[200:])
    fa, fb = a.finalize(), b.finalize()
    assert torch.equal(fa.cov, fb.cov) and torch.equal(fa.mean, fb.mean) and fa.n == fb.n


def test_load_state_dict_rejects_mismatch() -> None:
    state = CovarianceAccumulator(3).update(torch.randn(5, 3)).state_dict()
    with pytest.raises(ValueError, match="dim=3"):
        CovarianceAccumulator(4).load_state_dict(state)
    with pytest.raises(ValueError, match="acc_dtype"):
        CovarianceAccumulator(3, acc_dtype=torch.float64).load_state_dict(state)
    with pytest.raises(ValueError, match="missing keys"):
        CovarianceAccumulator(3).load_state_dict({"n": 5})


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.complex64], ids=str)
def test_rejects_non_float_input(dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match="floating"):
        CovarianceAccumulator(3).update(torch.ones(4, 3, dtype=dtype))


def test_rejects_wrong_last_dim() -> None:
    acc = CovarianceAccumulator(8)
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\].*\(2, 5, 7\)"):
        acc.update(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="8"):
        acc.update(torch.tensor(1.0))
    with pytest.raises(TypeError, match="torch.Tensor"):
        acc.update([[1.0] * 8])


def test_rejects_bad_mask() -> None:
    acc = CovarianceAccumulator(3)
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(10,\)"):
        acc.update(x, torch.ones(10, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        acc.update(x, torch.ones(2, 5))
    assert acc.n == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 3e38])
def test_non_finite_batch_raises_and_leaves_state(bad: float) -> None:
    acc = CovarianceAccumulator(4).update(torch.randn(10, 4))
    state = acc.state_dict()
    x = torch.randn(6, 4)
    x[3, 2] = bad
    with pytest.raises(NonFiniteInputError, match="non-finite values in batch"):
        acc.update(x)
    assert issubclass(NonFiniteInputError, ValueError)
    assert acc.n == 10 and torch.equal(acc.state_dict()["m2"], state["m2"])
    with pytest.raises(NonFiniteInputError):
        CovarianceAccumulator(4).update(x)  # first batch: shift is its own (NaN/Inf) mean


def test_finalize_needs_two_rows() -> None:
    acc = CovarianceAccumulator(3)
    with pytest.raises(ValueError, match="need at least 2 rows"):
        acc.finalize()
    acc.update(torch.randn(3))
    with pytest.raises(ValueError, match="need at least 2 rows"):
        acc.finalize()


def test_merge_rejects_mismatch() -> None:
    with pytest.raises(ValueError, match="dim=4"):
        CovarianceAccumulator(3).merge(CovarianceAccumulator(4))
    with pytest.raises(ValueError, match="acc_dtype"):
        CovarianceAccumulator(3).merge(CovarianceAccumulator(3, acc_dtype=torch.float64))
    with pytest.raises(TypeError):
        CovarianceAccumulator(3).merge(object())


def test_constructor_checks_and_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in (0, -1):
        with pytest.raises(ValueError, match="dim must be >= 1"):
            CovarianceAccumulator(bad)
    with pytest.raises(TypeError, match="acc_dtype"):
        CovarianceAccumulator(3, acc_dtype=torch.float16)
    assert CovarianceAccumulator(3).backend == "torch"
    assert CovarianceAccumulator(3, backend="torch").backend == "torch"
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run covariance on cpu"):
        CovarianceAccumulator(3, backend="cuda", device="cpu")
    # Triton on CPU tensors only runs in its interpreter; otherwise a clear error.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        CovarianceAccumulator(3, backend="triton", device="cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        CovarianceAccumulator(3, backend="fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_matches_reference_even_with_tf32_enabled(dtype: torch.dtype) -> None:
    d = 423
    x = _data(4096, d, dtype, seed=13, offset=1e3, lead=(2,)).cuda()
    mask = torch.rand(2, 4096, device="cuda") < 0.9
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 would break the 1e-5 threshold
    try:
        acc = CovarianceAccumulator(d)  # device adopted from the first batch
        for xs, ms in zip(x.split(1000, dim=1), mask.split(1000, dim=1)):
            acc.update(xs, ms)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(prev)
    out = acc.finalize()
    assert out.cov.device.type == "cuda" and acc.device.type == "cuda"
    _check(out, x[mask].cpu(), torch.float32)
    cpu = CovarianceAccumulator(d)
    state = {k: v.cpu() if torch.is_tensor(v) else v for k, v in acc.state_dict().items()}
    cpu.load_state_dict(state)
    assert _rel(cpu.finalize().cov, out.cov) < 1e-6  # CUDA divides by n via a reciprocal
