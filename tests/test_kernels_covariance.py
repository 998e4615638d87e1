"""Triton streaming-covariance kernel (rmtkd.kernels.covariance) and the "triton" backend of
CovarianceAccumulator, against float64 references.

Small tests are marked ``interpreter``: without CUDA they run under TRITON_INTERPRET=1 on
CPU tensors (tests/conftest.py sets it), with CUDA they run the compiled kernel on the GPU.
Large shapes and bf16 are ``gpu`` tests. Every output and workspace is poisoned (NaN) before
each call, so an element the kernel should write but does not shows up.

Errors are relative Frobenius errors ``||out - ref|| / ||ref||`` over the upper triangle of
the Gram matrix (the lower one is unspecified) and over the column sums. Tolerances:
- fp32 input: 1e-5 against the exact float64 reference (ieee fp32 products, fp32
  accumulation; seen ~1e-7). TF32 would give ~1e-3 and fail.
- fp16/bf16 input: the kernel rounds the centred values ``x - shift`` (computed in fp32) back
  to the input dtype before the tensor-core product. Two checks:
  (a) against ``ref_lp``, the float64 product of exactly those rounded values (emulated in
      torch): 1e-5 small / 2e-5 at n = 65536 (only fp32 accumulation differs; the kernel
      flushes the tensor cores' round-towards-zero accumulator every 512 rows, without which
      an H100 gave 2-3e-4 here);
  (b) against the exact float64 reference: at most 2x the error of ``ref_lp`` plus 1e-5
      (the flash-attention style check: the kernel may not be worse than the same product
      computed from rounded values), and below 4u (u = 2^-11 fp16, 2^-8 bf16), the bound for
      products of two values each rounded with relative error <= u.
Data have |mean| = 1e3 with std ~1 (the kernel's centring must keep accuracy), and the
shift is a perturbed mean (not exactly the mean, so the column sums are not ~0).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from rmtkd.ops.covariance import CovarianceAccumulator, NonFiniteInputError

from kernel_env import DEVICE, FP32_TOL, HAS_TRITON, U, gpu, interpreter, marked

NS = [1, 7, 130]
DS = [3, 33, 96]
SMALL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda"
                                                 else [])


@pytest.fixture
def kc(monkeypatch: pytest.MonkeyPatch):
    """The kernel module, with every output / workspace allocation poisoned with NaN."""
    from rmtkd.kernels import covariance as kc

    def poisoned(*shape, dtype=None, device=None):
        return torch.full(*shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kc, "_empty", poisoned)
    return kc


def _data(n: int, d: int, dtype: torch.dtype, seed: int, mean: float = 1e3,
          device: torch.device = DEVICE) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated rows ``(n, d)`` with |mean| ~ ``mean``, std ~1, and a float32 shift near
    (not at) the mean."""
    g = torch.Generator(device=device).manual_seed(seed)
    kw = dict(generator=g, dtype=torch.float64, device=device)
    a = torch.eye(d, dtype=torch.float64, device=device) + torch.randn(d, d, **kw) / (2 * d ** 0.5)
    mu = mean * (1 + torch.rand(d, **kw))
    x = (torch.randn(n, d, **kw) @ a + mu).to(dtype)
    shift = mu + 0.5 * torch.randn(d, **kw)
    return x, shift.float()


def _refs(x: torch.Tensor, shift: torch.Tensor, keep: torch.Tensor | None):
    """Float64 references ``(G, s)``: exact, and from the centred values rounded the way the
    kernel rounds them (fp32 subtraction, then the input dtype); equal for fp32 input."""
    rows = x if keep is None else x[keep.bool()]
    exact = rows.double() - shift.double()
    lp = (rows.float() - shift).to(x.dtype).double() if x.dtype in U else exact
    return (exact.T @ exact, exact.sum(0)), (lp.T @ lp, lp.sum(0))


def _rel_upper(out: torch.Tensor, ref: torch.Tensor) -> float:
    iu = torch.triu_indices(*ref.shape, device=ref.device)
    o, r = out.double()[iu[0], iu[1]], ref.double()[iu[0], iu[1]]
    return ((o - r).norm() / r.norm().clamp_min(1e-300)).item()


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def _check(kc, x, shift, keep=None, lp_tol=FP32_TOL, **kw) -> tuple[float, float]:
    """Run the kernel and check it against both references; return (G err, s err) vs exact."""
    g, s, m = kc.shifted_gram(x, shift, keep, **kw)
    assert g.shape == (x.shape[1],) * 2 and s.shape == (x.shape[1],)
    assert g.dtype == torch.float32 and s.dtype == torch.float32
    assert m == (x.shape[0] if keep is None else int(keep.bool().sum()))
    iu = torch.triu_indices(*g.shape, device=g.device)
    assert torch.isfinite(g[iu[0], iu[1]]).all(), "upper triangle not (fully) written"
    assert torch.isfinite(s).all(), "column sums not (fully) written"
    (g_ex, s_ex), (g_lp, s_lp) = _refs(x, shift, keep)
    if m == 0:
        assert torch.equal(g[iu[0], iu[1]], torch.zeros_like(g[iu[0], iu[1]]))
        assert torch.equal(s, torch.zeros_like(s))
        return 0.0, 0.0
    eg, es = _rel_upper(g, g_ex), _rel(s, s_ex)
    if x.dtype == torch.float32:
        assert eg < FP32_TOL and es < FP32_TOL, (eg, es)
    else:
        elg, els = _rel_upper(g, g_lp), _rel(s, s_lp)
        assert elg < lp_tol and els < lp_tol, (elg, els)
        # not worse than the same product from rounded values, and within the 4u bound
        eg_lp, es_lp = _rel_upper(g_lp, g_ex), _rel(s_lp, s_ex)
        assert eg <= 2 * eg_lp + 1e-5 and es <= 2 * es_lp + 1e-5, (eg, eg_lp, es, es_lp)
        assert eg < 4 * U[x.dtype] and es < 4 * U[x.dtype], (eg, es)
    return eg, es


def _mask(kind: str, n: int, device=DEVICE) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "all_false":
        return torch.zeros(n, dtype=torch.bool, device=device)
    return (torch.arange(n, device=device) % 3) != 1  # partial: keeps row 0, drops row 1...


# ---------------------------------------------------------------------------------- kernel
@marked(interpreter)
@pytest.mark.parametrize("mask", ["none", "partial", "all_false"])
@pytest.mark.parametrize("dtype", SMALL_DTYPES, ids=str)
@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("n", NS)
def test_shifted_gram_matches_float64(kc, n: int, d: int, dtype: torch.dtype, mask: str) -> None:
    x, shift = _data(n, d, dtype, seed=100 * n + d)
    _check(kc, x, shift, _mask(mask, n))


@marked(interpreter)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_split_k_equals_one_split(kc, dtype: torch.dtype) -> None:
    x, shift = _data(300, 33, dtype, seed=7)
    keep = _mask("partial", 300)
    g1, s1, m1 = kc.shifted_gram(x, shift, keep, split_k=1)
    iu = torch.triu_indices(33, 33, device=x.device)
    for k in (2, 3, 5):
        gk, sk, mk = kc.shifted_gram(x, shift, keep, split_k=k)
        assert mk == m1
        assert torch.isfinite(gk[iu[0], iu[1]]).all() and torch.isfinite(sk).all()
        # the same rounded values, summed in another fp32 order
        assert _rel_upper(gk, g1) < 1e-6 and _rel(sk, s1) < 1e-6
    _check(kc, x, shift, keep, split_k=3)


@marked(interpreter)
@pytest.mark.parametrize("d", [96, 100])
def test_many_tiles_cover_the_upper_triangle(kc, d: int) -> None:
    """16-wide tiles: 21 (d = 96) or 28 (d = 100, tail tile) upper pairs, and 16-row steps;
    the poisoned output shows any tile the program-id -> (i, j) map misses."""
    x, shift = _data(70, d, torch.float32, seed=d)
    _check(kc, x, shift, _mask("partial", 70), block_d=16, block_k=16, split_k=2)


@marked(interpreter)
def test_strided_inputs(kc) -> None:
    base, shift_full = _data(150, 70, torch.float32, seed=3)
    cases = {
        "column_stride_2": (base[:, ::2], shift_full[::2].contiguous()),
        "row_stride_3": (base[::3], shift_full),
        "transposed_storage": (base.T.contiguous().T, shift_full),  # column-major
    }
    for name, (x, shift) in cases.items():
        assert not x.is_contiguous(), name
        keep = _mask("partial", 2 * x.shape[0])[::2]  # a strided mask too
        _check(kc, x, shift, keep)
        _check(kc, x.half(), shift, keep)


@marked(interpreter)
def test_uint8_mask_and_masked_nan_rows(kc) -> None:
    x, shift = _data(40, 33, torch.float32, seed=5)
    keep = _mask("partial", 40)
    x_nan = x.clone()
    x_nan[~keep] = float("nan")  # padding rows may hold anything: they must not be read in
    g_ref, s_ref, _ = kc.shifted_gram(x, shift, keep)
    for m in (keep, keep.to(torch.uint8)):
        g, s, rows = kc.shifted_gram(x_nan, shift, m)
        assert rows == int(keep.sum())
        iu = torch.triu_indices(33, 33, device=x.device)
        assert torch.equal(g[iu[0], iu[1]], g_ref[iu[0], iu[1]]) and torch.equal(s, s_ref)


@marked(interpreter)
@pytest.mark.parametrize("dtype", SMALL_DTYPES[1:], ids=str)
def test_representable_shift_makes_low_precision_exact(kc, dtype: torch.dtype) -> None:
    """A shift representable in the input dtype near a large mean: every x - shift is exact
    (Sterbenz), so fp16/bf16 reach the fp32 tolerance against the exact reference."""
    x, shift = _data(130, 33, dtype, seed=12)
    shift = shift.to(dtype).float()
    (g_ex, s_ex), _ = _refs(x, shift, None)
    g, s, _ = kc.shifted_gram(x, shift)  # detects the exact shift: subtracts in fp16/bf16
    assert _rel_upper(g, g_ex) < FP32_TOL and _rel(s, s_ex) < FP32_TOL
    g32, s32, _ = kc.shifted_gram(x, shift, shift_exact=False)  # fp32 subtraction path
    assert _rel_upper(g32, g) < 1e-6 and _rel(s32, s) < 1e-6


@marked(interpreter)
def test_centring_keeps_accuracy_at_large_mean(kc) -> None:
    """|mean| / std = 1e4 in fp32: an unshifted Gram would lose ~all digits (eps * 1e8)."""
    x, shift = _data(130, 33, torch.float32, seed=11, mean=1e4)
    eg, es = _check(kc, x, shift)
    assert eg < FP32_TOL


@marked(interpreter)
def test_rejects_bad_arguments(kc) -> None:
    x, shift = _data(8, 5, torch.float32, seed=0)
    with pytest.raises(TypeError, match="float64"):
        kc.shifted_gram(x.double(), shift)
    with pytest.raises(ValueError, match="shift"):
        kc.shifted_gram(x, shift.double())
    with pytest.raises(ValueError, match="mask"):
        kc.shifted_gram(x, shift, torch.ones(7, dtype=torch.bool, device=x.device))
    with pytest.raises(ValueError, match="block_d"):
        kc.shifted_gram(x, shift, block_d=8)


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_every_dot_is_fp32_out_and_fp32_dots_are_ieee() -> None:
    """The interpreter multiplies in numpy whatever input_precision says, so a TF32 dot would
    pass the numeric tests on CPU (the GPU tests would catch it): check the source too."""
    import ast
    import inspect

    from rmtkd.kernels import covariance as kc

    tree = ast.parse(inspect.getsource(kc))
    dots = [c for c in ast.walk(tree) if isinstance(c, ast.Call)
            and isinstance(c.func, ast.Attribute) and c.func.attr == "dot"]
    assert dots
    precisions = []
    for call in dots:
        kw = {k.arg: k.value for k in call.keywords}
        assert ast.unparse(kw.get("out_dtype", ast.Constant(None))) == "tl.float32"
        if "input_precision" in kw:
            precisions.append(ast.literal_eval(kw["input_precision"]))
    assert precisions and set(precisions) == {"ieee"}
    assert "allow_tf32" not in inspect.getsource(kc)


# ----------------------------------------------------------------------------- accumulator
def _cov_ref(x: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    rows = x.reshape(-1, x.shape[-1]).double()
    if keep is not None:
        rows = rows[keep.reshape(-1)]
    mu = rows.mean(0)
    xc = rows - mu
    return mu, xc.T @ xc / rows.shape[0]


@marked(interpreter)
@pytest.mark.parametrize("dtype", SMALL_DTYPES, ids=str)
def test_accumulator_triton_matches_torch_backend(dtype: torch.dtype) -> None:
    d = 33
    x, _ = _data(4 * 50, d, dtype, seed=21)
    x = x.reshape(4, 50, d)
    keep = torch.rand(4, 50, generator=torch.Generator().manual_seed(2)).to(DEVICE) > 0.25
    keep[0, 0] = True
    keep[1] = False  # an all-masked batch is a no-op
    tri = CovarianceAccumulator(d, backend="triton")
    ref = CovarianceAccumulator(d, backend="torch", device=DEVICE)
    assert tri.backend == "triton" and ref.backend == "torch"
    for b in range(4):
        # batches of different sizes; one strided batch
        xb = x[b] if b != 2 else x[b].T.contiguous().T
        tri.update(xb, keep[b])
        ref.update(xb, keep[b])
    tri.update(x[3, :7])  # no mask
    ref.update(x[3, :7])
    assert tri.n == ref.n == int(keep.sum()) + 7
    st, sr = tri.finalize(), ref.finalize()
    assert torch.equal(st.cov, st.cov.mT), "cov must be exactly symmetric"
    mu, cov = _cov_ref(torch.cat([x.reshape(-1, d), x[3, :7]]),
                       torch.cat([keep.reshape(-1), torch.ones(7, dtype=torch.bool,
                                                                device=DEVICE)]))
    # fp16/bf16 too: the accumulator's shifts make the kernel's rounding exact
    assert _rel(st.cov, cov) < FP32_TOL and _rel(st.mean, mu) < FP32_TOL
    assert _rel(st.cov, sr.cov) < FP32_TOL
    assert _rel(sr.cov, cov) < FP32_TOL


@marked(interpreter)
@pytest.mark.parametrize("dtype", SMALL_DTYPES[1:], ids=str)
def test_accumulator_low_precision_small_and_mixed_means(dtype: torch.dtype) -> None:
    """Columns with |mean| < 8 std are shifted by 0 (x - 0 = x, exact), the others by their
    mean rounded to the dtype (exact by Sterbenz); both regimes reach fp32 accuracy, where a
    shift rounded after the subtraction would miss it by ~u."""
    d = 40
    x, _ = _data(300, d, torch.float64, seed=31, mean=0.0)
    x[:, ::3] += 50.0 * (1 + torch.arange(0, d, 3, device=DEVICE, dtype=torch.float64) / d)
    x[:, 1::3] += 3.0  # |mean| ~ 3 std
    x = x.to(dtype)
    acc = CovarianceAccumulator(d, backend="triton")
    for xb in x.split([100, 1, 199]):
        acc.update(xb)
    mu, cov = _cov_ref(x, None)
    st = acc.finalize()
    assert _rel(st.cov, cov) < FP32_TOL and _rel(st.mean, mu) < FP32_TOL


@marked(interpreter)
def test_accumulator_triton_float64_input_and_large_mean() -> None:
    x, _ = _data(130, 20, torch.float64, seed=4, mean=1e5)
    tri = CovarianceAccumulator(20, backend="triton").update(x[:60]).update(x[60:])
    mu, cov = _cov_ref(x, None)
    st = tri.finalize()
    assert _rel(st.cov, cov) < FP32_TOL and _rel(st.mean, mu) < FP32_TOL


@marked(interpreter)
def test_accumulator_triton_non_finite_batch() -> None:
    x, _ = _data(20, 9, torch.float32, seed=8)
    acc = CovarianceAccumulator(9, backend="triton").update(x)
    before = acc.state_dict()
    bad = x.clone()
    bad[3, 4] = float("inf")
    with pytest.raises(NonFiniteInputError):
        acc.update(bad)
    after = acc.state_dict()
    assert acc.n == 20 and torch.equal(before["m2"], after["m2"])
    keep = torch.ones(20, dtype=torch.bool, device=DEVICE)
    keep[3] = False
    acc.update(bad, keep)  # the bad row is masked out: accepted
    assert acc.n == 39


@marked(interpreter)
def test_auto_runs_triton_for_16_bit_batches_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where auto resolves to Triton (CUDA), fp32 batches take the torch path (measured faster
    there) and fp16/bf16 batches the kernel; backend="triton" by name runs every dtype."""
    calls = []
    orig = CovarianceAccumulator._shifted_gram_triton

    def spy(self, x2d, keep, m):
        calls.append(x2d.dtype)
        return orig(self, x2d, keep, m)

    monkeypatch.setattr(CovarianceAccumulator, "_shifted_gram_triton", spy)
    x, _ = _data(50, 6, torch.float32, seed=1)
    auto = CovarianceAccumulator(6, device=DEVICE)
    auto.backend = "triton"  # what auto resolves to on CUDA
    auto.update(x).update(x.half())
    assert calls == [torch.float16]
    calls.clear()
    CovarianceAccumulator(6, backend="triton", device=DEVICE).update(x).update(x.half())
    assert calls == [torch.float32, torch.float16]


def test_backend_selection_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert CovarianceAccumulator(4).backend == "torch"  # auto never picks Triton on CPU
    with pytest.raises(RuntimeError, match="float32 only"):
        CovarianceAccumulator(4, acc_dtype=torch.float64, backend="triton", device="cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        CovarianceAccumulator(4, backend="triton", device="cpu")


def test_import_rmtkd_does_not_import_triton() -> None:
    code = ("import sys, torch, rmtkd\n"
            "acc = rmtkd.CovarianceAccumulator(4, backend='auto')\n"
            "assert 'triton' not in sys.modules, 'import rmtkd imported triton'\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# --------------------------------------------------------------------------------- GPU only
@marked(gpu)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [1024, 4096])
def test_large_shapes_on_gpu(kc, d: int, dtype: torch.dtype) -> None:
    n = 65536
    x, shift = _data(n, d, dtype, seed=d, device=torch.device("cuda"))
    keep = torch.rand(n, device="cuda") > 0.1
    _check(kc, x, shift, keep, lp_tol=2e-5)
    if d == 1024:  # split-K engages here (few tiles, many rows)
        assert kc.choose_split(n, d, 128, x.device) > 1
        _check(kc, x, shift, None, lp_tol=2e-5, split_k=1)  # 65536 rows in one program
    if dtype != torch.float32:  # representable shift: the input-dtype subtraction path
        _check(kc, x, shift.to(dtype).float(), keep, lp_tol=2e-5)


@marked(gpu)
def test_auto_picks_triton_on_cuda_and_matches_torch() -> None:
    d = 512
    x, _ = _data(3 * 4096, d, torch.bfloat16, seed=9, device=torch.device("cuda"))
    auto = CovarianceAccumulator(d)
    ref = CovarianceAccumulator(d, backend="torch")
    for xb in x.split(4096):
        auto.update(xb)
        ref.update(xb)
    assert auto.backend == "triton" and ref.backend == "torch"
    mu, cov = _cov_ref(x, None)
    assert _rel(auto.finalize().cov, cov) < 4 * U[torch.bfloat16]
    assert _rel(ref.finalize().cov, cov) < FP32_TOL
