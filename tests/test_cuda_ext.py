"""The C++ extension (csrc/, rmtkd.ops.cuda_ext): ``rmtkd::krylov_top`` and the CUDA ops.

CPU part: the extension is built once per session (module fixture; a CPU build, or the CUDA
build where torch has CUDA) and its randomized spike solver is compared with the Python solver
(rmtkd.ops.eigen.block_krylov_top) and with a float64 eigh, on fresh spiked covariances in
fp32 and fp64, odd d included; its threshold step with Python's fit_noise; bad inputs give
clear RuntimeErrors; opcheck on the solver op; dispatch errors without CUDA.

GPU part (``cuda_ext`` marks: a CUDA device plus nvcc and ninja): each CUDA op against a
float64 torch reference on fresh random inputs, odd and large shapes, fp32/fp16/bf16, outputs
poisoned with NaN before the call; the fp16/bf16 error is compared with the error of the same
reference computed from the low-precision values (the design's test contract); opcheck on
every op; the backends of CovarianceAccumulator / projected_linear / spikes; the CuPy round
trip.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import time

import numpy as np
import pytest
import torch

import rmtkd
from rmtkd.ops import cuda_ext
from rmtkd.ops.eigen import block_krylov_top
from rmtkd.spectral import bbp_threshold
from rmtkd.spectral.estimators import Spectrum, fit_noise
from rmtkd.spectral.fit import _threshold_fn, _threshold_unit
from rmtkd.spectral.synthetic import sample_covariance, spiked_samples

from kernel_env import FP32_TOL, U, cuda_ext as cuda_ext_marks, marked

HAS_CXX = shutil.which(os.environ.get("CXX", "c++")) is not None
HAS_CUPY = importlib.util.find_spec("cupy") is not None


@pytest.fixture(scope="module")
def ext():
    """The extension, built (or found in the cache) once per test session."""
    if not HAS_CXX:
        pytest.skip("no C++ compiler (c++ / $CXX) to build the extension")
    if not cuda_ext._has_ninja():
        pytest.skip("ninja is not installed (pip install ninja) to build the extension")
    t0 = time.perf_counter()
    path = cuda_ext.load_extension()
    print(f"\nrmtkd C++ extension ready in {time.perf_counter() - t0:.1f} s: {path}")
    return torch.ops.rmtkd


def _planted(d: int, n: int, k: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    thetas = bbp_threshold(d / n) * 6.0 * np.geomspace(4.0, 1.0, k) if k else []
    s = spiked_samples(d, n, thetas, seed=seed, dtype=torch.float64)
    return sample_covariance(s.x).to(dtype)


def _python_threshold_of(trace: float, d: int, n: int, margin="tw"):
    thr_of = _threshold_fn(margin, d, n)

    def threshold_of(vals: np.ndarray) -> float:
        spec = Spectrum(top=np.clip(vals, 0.0, None), trace=trace, d=d, n=n, full=False)
        return thr_of(fit_noise(spec, "moments", thr_of)[0])
    return threshold_of


def _sin_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    qa, qb = torch.linalg.qr(a.double())[0], torch.linalg.qr(b.double())[0]
    return float(torch.linalg.matrix_norm(qb - qa @ (qa.T @ qb), ord=2))


# --- CPU: the solver op ---------------------------------------------------------------------

CASES = [(3, 40, 0, "tw"), (129, 500, 3, "tw"), (129, 100, 4, 0.0), (423, 1500, 8, "tw"),
         (423, 300, 0, 0.1), (700, 350, 5, "tw:0.99"), (700, 2800, 20, "tw")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d,n,k,margin", CASES)
def test_krylov_op_matches_python_solver_and_eigh(ext, d, n, k, margin, dtype):
    seed = int(torch.randint(0, 2 ** 31 - 1, ()).item())  # fresh inputs every run
    c = _planted(d, n, k, seed, dtype)
    trace = float(c.diagonal().double().sum())
    py = block_krylov_top(c, _python_threshold_of(trace, d, n, margin))
    cc = cuda_ext.krylov_top(c, unit=_threshold_unit(margin, d, n), trace=trace, d_alive=d,
                             n=n)
    msg = f"seed={seed}"
    assert (cc.k, cc.basis_size, cc.matvecs, cc.converged) == (
        py.k, py.basis_size, py.matvecs, py.converged), msg
    assert cc.threshold == pytest.approx(py.threshold, rel=1e-12), msg
    assert cc.values.dtype == np.float64 and cc.values.shape == (cc.basis_size,)
    np.testing.assert_allclose(cc.values, py.values, rtol=1e-9,
                               atol=1e-12 * abs(py.values).max(), err_msg=msg)
    assert cc.vectors.shape == (d, cc.k) and cc.vectors.dtype == dtype
    assert cc.vectors.device == c.device
    if cc.k:
        assert _sin_angle(cc.vectors, py.vectors) < 1e-6, msg
        # against a float64 eigh of the same matrix
        ev, evec = torch.linalg.eigh(c.double())
        ev, evec = ev.flip(0)[: cc.k].numpy(), evec.flip(1)[:, : cc.k]
        if cc.converged:
            np.testing.assert_allclose(cc.values[: cc.k], ev, rtol=1e-4, err_msg=msg)
            assert _sin_angle(cc.vectors, evec) < 1e-3, msg


def test_krylov_op_through_spikes_matches_torch_backend_on_cpu(ext):
    """The op (CPU) fed exactly what spikes(backend='cuda') feeds it gives spikes' torch fit."""
    d, n = 423, 1200
    c = _planted(d, n, 6, seed=11, dtype=torch.float32)
    fit = rmtkd.spikes(c, n, solver="randomized")
    res = cuda_ext.krylov_top(c, unit=_threshold_unit("tw", d, n),
                              trace=float(c.diagonal().double().sum()), d_alive=d, n=n)
    assert fit.k == res.k == 6
    np.testing.assert_allclose(fit.eigenvalues, np.clip(res.values, 0, None), rtol=1e-9)


@pytest.mark.parametrize("d,n", [(129, 500), (423, 300), (700, 2800), (50, 49)])
@pytest.mark.parametrize("margin", ["tw", 0.0, 0.25])
def test_cpp_threshold_equals_python_fit_noise(ext, d, n, margin):
    """The C++ port of fit_noise('moments') on full spectra and on truncated ones."""
    seed = int(torch.randint(0, 2 ** 31 - 1, ()).item())
    c = _planted(d, n, 7, seed, torch.float64)
    vals = torch.linalg.eigvalsh(c).flip(0).clamp_min(0).numpy()
    trace = float(vals.sum())
    unit = _threshold_unit(margin, d, n)
    thr_of = _threshold_fn(margin, d, n)
    for top in (vals, vals[:20], vals[:3]):
        spec = Spectrum(top=top, trace=trace, d=d, n=n, full=False)
        sigma2, k = fit_noise(spec, "moments", thr_of)
        s2c, kc = ext._fit_noise_moments(torch.from_numpy(top.copy()), trace, d, n, unit)
        assert kc == k, f"seed={seed}"
        assert s2c == pytest.approx(sigma2, rel=1e-12), f"seed={seed}"
        assert s2c * unit == pytest.approx(thr_of(sigma2), rel=1e-12)


def test_krylov_op_bad_inputs_are_clear_errors(ext):
    c = torch.eye(8)
    good = dict(unit=4.0, trace=8.0, d_alive=8, n=100)
    with pytest.raises(RuntimeError, match=r"expected c to be a square \(d, d\) matrix"):
        ext.krylov_top(torch.ones(4, 5), *good.values())
    with pytest.raises(RuntimeError, match="expected c to be a square"):
        ext.krylov_top(torch.ones(4), *good.values())
    with pytest.raises(RuntimeError, match="expected c to be float32 or float64, got Int"):
        ext.krylov_top(torch.ones(4, 4, dtype=torch.int32), *good.values())
    with pytest.raises(RuntimeError, match=r"expected unit \(threshold / sigma\^2\) > 0"):
        ext.krylov_top(c, 0.0, 8.0, 8, 100)
    with pytest.raises(RuntimeError, match="expected n \\(samples\\) >= 1"):
        ext.krylov_top(c, 4.0, 8.0, 8, 0)
    with pytest.raises(RuntimeError, match="expected block >= 1"):
        ext.krylov_top(c, 4.0, 8.0, 8, 100, 0.5, 0)
    with pytest.raises(RuntimeError, match="1-D float64 CPU tensor"):
        ext._fit_noise_moments(torch.ones(3), 3.0, 3, 10, 2.0)


def test_cuda_ops_check_arguments_on_any_device(ext):
    """Shape/dtype mistakes get the same clear message on every device; CPU tensors with good
    arguments are told that the op needs CUDA."""
    x = torch.randn(5, 4)
    c, s = torch.zeros(4, 4), torch.zeros(4)
    with pytest.raises(RuntimeError, match=r"expected c of shape \(4, 4\)"):
        ext.covariance_update(x, None, None, torch.zeros(3, 3), s)
    with pytest.raises(RuntimeError, match="expected x float32, float16 or bfloat16, got Double"):
        ext.covariance_update(x.double(), None, None, c, s)
    with pytest.raises(RuntimeError, match=r"expected x of shape \(n, d\)"):
        ext.covariance_update(x[0], None, None, c, s)
    with pytest.raises(RuntimeError, match=r"expected mask of shape \(5\)"):
        ext.covariance_update(x, None, torch.ones(4, dtype=torch.bool), c, s)
    with pytest.raises(RuntimeError, match="expected mask bool or uint8"):
        ext.covariance_update(x, None, torch.ones(5), c, s)
    with pytest.raises(RuntimeError, match=r"expected shift float32 of shape \(4\)"):
        ext.covariance_update(x, torch.zeros(3), None, c, s)
    with pytest.raises(RuntimeError, match="unit column stride"):
        ext.covariance_update(torch.randn(4, 5).T, None, None, c, s)
    with pytest.raises(RuntimeError, match="runs on CUDA tensors only"):
        ext.covariance_update(x, torch.zeros(4), torch.ones(5, dtype=torch.bool), c, s)
    V, W = torch.randn(4, 2), torch.randn(3, 2)
    with pytest.raises(RuntimeError, match="expected W with 2 columns"):
        ext.projected_linear(x, V, torch.randn(3, 5), None)
    with pytest.raises(RuntimeError, match=r"expected x of shape \(\.\.\., 4\)"):
        ext.projected_linear(torch.randn(5, 3), V, W, None)
    with pytest.raises(RuntimeError, match="of one dtype"):
        ext.projected_linear(x, V.half(), W, None)
    with pytest.raises(RuntimeError, match=r"expected bias of shape \(3\)"):
        ext.projected_linear(x, V, W, torch.zeros(2))
    with pytest.raises(RuntimeError, match="runs on CUDA tensors only"):
        ext.projected_linear(x, V, W, torch.zeros(3))


def test_opcheck_krylov_op_cpu(ext):
    d, n = 129, 400
    c = _planted(d, n, 3, seed=5, dtype=torch.float64)
    args = (c, _threshold_unit("tw", d, n), float(c.diagonal().sum()), d, n)
    torch.library.opcheck(torch.ops.rmtkd.krylov_top.default, args)


def test_krylov_op_under_torch_compile(ext):
    """The fake implementation lets torch.compile trace the op (data-dependent output sizes)."""
    import torch._dynamo

    d, n = 129, 400
    c = _planted(d, n, 3, seed=8, dtype=torch.float64)
    args = (_threshold_unit("tw", d, n), float(c.diagonal().sum()), d, n)

    def f(c):
        vals, vecs, info = torch.ops.rmtkd.krylov_top(c, *args)
        return vecs * 2, info

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        got = torch.compile(f, backend="aot_eager", fullgraph=True)(c)
    want = f(c)
    assert got[0].shape == (d, 3)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_build_errors_are_clear(ext, tmp_path, monkeypatch):
    """Missing ninja / no CUDA in torch / a compiler error: ExtensionBuildError saying why
    (and, for a compiler error, where the log is). Nothing heavy is compiled."""
    monkeypatch.setattr(cuda_ext, "_has_ninja", lambda: False)
    with pytest.raises(cuda_ext.ExtensionBuildError, match="pip install ninja"):
        cuda_ext._build(False, False)
    monkeypatch.undo()
    if torch.version.cuda is None:
        with pytest.raises(cuda_ext.ExtensionBuildError, match="built without CUDA"):
            cuda_ext._build(True, False)
    broken = tmp_path / "csrc"
    broken.mkdir()
    for name in cuda_ext._CPP_SOURCES:
        (broken / name).write_text('#error "deliberately broken"\n')
    monkeypatch.setattr(cuda_ext, "csrc_dir", lambda: broken)
    monkeypatch.setenv("RMTKD_CACHE", str(tmp_path / "cache"))
    with pytest.raises(cuda_ext.ExtensionBuildError, match="build_error.log") as info:
        cuda_ext._build(False, False)
    log = str(info.value).split("compiler output is in ", 1)[1].split(" ", 1)[0]
    assert "deliberately broken" in open(log).read()


def test_spikes_cuda_backend_on_cpu_is_a_dispatch_error(monkeypatch):
    c = _planted(64, 256, 2, seed=1, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run spikes on cpu.*CUDA "
                                           r"tensors"):
        rmtkd.spikes(c, 256, backend="cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run covariance"):
        rmtkd.CovarianceAccumulator(4, backend="cuda", device="cpu")
    from rmtkd.ops.projected_linear import projected_linear
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run projected_linear"):
        projected_linear(torch.randn(2, 4), torch.randn(4, 2), torch.randn(3, 2), backend="cuda")
    # the process-wide variable applies to spikes too; 'triton' (no solver kernel) does not
    fit = rmtkd.spikes(c, 256)
    monkeypatch.setenv("RMTKD_BACKEND", "triton")
    assert rmtkd.spikes(c, 256).k == fit.k == 2
    monkeypatch.setenv("RMTKD_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run spikes"):
        rmtkd.spikes(c, 256)


# --- GPU: the CUDA ops ----------------------------------------------------------------------

CUDA = torch.device("cuda")
COV_SHAPES = [(3, 3), (129, 129), (423, 423), (4096, 129), (423, 1000), (4096, 1024)]


def _poison_allocator(nbytes: int) -> None:
    """Leave NaN in the caching allocator's free blocks, so that an output the op allocates
    and does not fully write shows up as NaN."""
    junk = torch.full((nbytes // 4 + 1024,), float("nan"), device=CUDA)
    del junk


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-300))


@marked(cuda_ext_marks)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,d", COV_SHAPES)
@pytest.mark.parametrize("shifted,masked", [(False, False), (True, False), (True, True)])
def test_gpu_covariance_update(ext, n, d, dtype, shifted, masked):
    g = torch.Generator(device=CUDA).manual_seed(int(torch.randint(0, 2 ** 31 - 1, ())))
    mu = 100.0 * torch.rand(d, device=CUDA, generator=g, dtype=torch.float64)
    x = (torch.randn(n, d, device=CUDA, generator=g, dtype=torch.float64) + mu).to(dtype)
    shift = (mu + 0.3 * torch.randn(d, device=CUDA, generator=g,
                                    dtype=torch.float64)).float() if shifted else None
    mask = (torch.rand(n, device=CUDA, generator=g) < 0.7) if masked else None
    c0 = torch.randn(d, d, device=CUDA, generator=g)
    s0 = torch.randn(d, device=CUDA, generator=g)
    lower = torch.tril(torch.ones(d, d, dtype=torch.bool, device=CUDA), -1)
    c = c0.masked_fill(lower, float("nan"))         # lower triangle poisoned: must stay so
    s = s0.clone()
    ext.covariance_update(x, shift, mask, c, s)
    torch.cuda.synchronize()
    rows = x if mask is None else x[mask]
    sh = torch.zeros(d, device=CUDA, dtype=torch.float64) if shift is None else shift.double()
    exact = rows.double() - sh
    ref_g, ref_s = exact.T @ exact, exact.sum(0)
    iu = torch.triu_indices(d, d, device=CUDA)
    up = (c.double() - c0.double())[iu[0], iu[1]]
    assert bool(c[lower].isnan().all()), "the lower triangle was written"
    assert bool(torch.isfinite(up).all())
    err_g = _rel(up, ref_g[iu[0], iu[1]])
    err_s = _rel(s.double() - s0.double(), ref_s) if rows.shape[0] else 0.0
    if dtype == torch.float32:
        assert err_g < FP32_TOL and err_s < FP32_TOL
    else:
        # the same product from the centred values rounded to the input dtype (what the
        # kernel multiplies), and the kernel may not be worse than twice its error
        lp = ((rows.float() - sh.float()).to(dtype)).double()
        err_lp_g = _rel((lp.T @ lp)[iu[0], iu[1]], ref_g[iu[0], iu[1]])
        assert err_g <= 2 * err_lp_g + 1e-5 and err_g < 4 * U[dtype]
        assert err_s <= 2 * _rel(lp.sum(0), ref_s) + 1e-5


PL_SHAPES = [(1, 3, 3, 1), (3, 129, 129, 16), (129, 423, 129, 129), (423, 129, 423, 256),
             (4096, 1024, 1024, 64), (4096, 4096, 4096, 256)]


@marked(cuda_ext_marks)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,d_in,d_out,k", PL_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_gpu_projected_linear(ext, m, d_in, d_out, k, dtype, bias):
    g = torch.Generator(device=CUDA).manual_seed(int(torch.randint(0, 2 ** 31 - 1, ())))
    f64 = dict(device=CUDA, generator=g, dtype=torch.float64)
    x = torch.randn(m, d_in, **f64).to(dtype)
    V = (torch.randn(d_in, k, **f64) / d_in ** 0.5).to(dtype)
    W = (torch.randn(d_out, k, **f64) / k ** 0.5).to(dtype)
    b = torch.randn(d_out, **f64).to(dtype) if bias else None
    _poison_allocator(m * d_out * 4)
    y = ext.projected_linear(x, V, W, b)
    assert y.shape == (m, d_out) and y.dtype == dtype
    ref = (x.double() @ V.double()) @ W.double().T + (b.double() if bias else 0)
    assert bool(torch.isfinite(y).all()), "unwritten (poisoned) output elements"
    err = _rel(y, ref)
    if dtype == torch.float32:
        assert err < FP32_TOL
    else:  # against two torch matmuls in the same dtype
        err_lp = _rel(torch.nn.functional.linear(x @ V, W, b), ref)
        assert err <= 2 * err_lp + 1e-5


@marked(cuda_ext_marks)
def test_gpu_projected_linear_leading_dims_rank_limit_and_empty(ext):
    x = torch.randn(2, 3, 64, device=CUDA)
    V, W = torch.randn(64, 8, device=CUDA), torch.randn(32, 8, device=CUDA)
    y = ext.projected_linear(x, V, W, None)
    assert y.shape == (2, 3, 32)
    torch.testing.assert_close(y, (x @ V) @ W.T, rtol=1e-5, atol=1e-5)
    assert ext.projected_linear(x[:0], V, W, None).shape == (0, 3, 32)
    with pytest.raises(RuntimeError, match="exceeds the fused kernel's maximum 256"):
        ext.projected_linear(x, torch.randn(64, 300, device=CUDA),
                             torch.randn(32, 300, device=CUDA), None)


@marked(cuda_ext_marks)
def test_gpu_opcheck_each_op(ext):
    x = torch.randn(129, 33, device=CUDA)
    c, s = torch.zeros(33, 33, device=CUDA), torch.zeros(33, device=CUDA)
    torch.library.opcheck(torch.ops.rmtkd.covariance_update.default,
                          (x, torch.zeros(33, device=CUDA),
                           torch.ones(129, dtype=torch.bool, device=CUDA), c, s))
    V = torch.randn(33, 8, device=CUDA, requires_grad=True)
    W = torch.randn(17, 8, device=CUDA, requires_grad=True)
    torch.library.opcheck(torch.ops.rmtkd.projected_linear.default,
                          (x.requires_grad_(), V, W, torch.randn(17, device=CUDA)))
    # traced with the fake implementations (aot_eager: no code generation needed)
    f = torch.compile(lambda a, b, w: torch.ops.rmtkd.projected_linear(a, b, w, None) * 2,
                      backend="aot_eager", fullgraph=True)
    xd, Vd, Wd = x.detach(), V.detach(), W.detach()
    torch.testing.assert_close(f(xd, Vd, Wd), 2 * ext.projected_linear(xd, Vd, Wd, None))
    cc = _planted(129, 400, 3, seed=2, dtype=torch.float32).to(CUDA)
    torch.library.opcheck(torch.ops.rmtkd.krylov_top.default,
                          (cc, _threshold_unit("tw", 129, 400), float(cc.diagonal().sum()),
                           129, 400))


@marked(cuda_ext_marks)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d,n,k", [(129, 500, 3), (423, 1500, 8), (2048, 8192, 16)])
def test_gpu_spikes_cuda_backend_matches_torch_backend(ext, d, n, k, dtype):
    c = _planted(d, n, k, seed=int(torch.randint(0, 2 ** 31 - 1, ())), dtype=dtype).to(CUDA)
    ref = rmtkd.spikes(c, n, solver="randomized", backend="torch")
    fit = rmtkd.spikes(c, n, backend="cuda")
    assert fit.solver == ref.solver and fit.k == ref.k == k
    np.testing.assert_allclose(fit.spike_eigenvalues, ref.spike_eigenvalues, rtol=1e-5)
    assert fit.eigenvectors.device.type == "cuda"
    assert _sin_angle(fit.eigenvectors, ref.eigenvectors) < 1e-3


@marked(cuda_ext_marks)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16,
                                   torch.float64])
def test_gpu_accumulator_cuda_backend_matches_torch(ext, dtype):
    g = torch.Generator(device=CUDA).manual_seed(3)
    d = 129
    batches = [(1e3 + torch.randn(4, 50, d, device=CUDA, generator=g)).to(dtype)
               for _ in range(3)]
    masks = [torch.rand(4, 50, device=CUDA, generator=g) < 0.8 for _ in range(3)]
    acc = rmtkd.CovarianceAccumulator(d, backend="cuda")
    ref = rmtkd.CovarianceAccumulator(d, backend="torch", acc_dtype=torch.float64,
                                      device=CUDA)
    for xb, mb in zip(batches, masks):
        acc.update(xb, mb)
        ref.update(xb.double(), mb)
    assert acc.backend == "cuda"
    a, r = acc.finalize(), ref.finalize()
    assert a.n == r.n
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 4 * U[dtype]
    assert _rel(a.cov, r.cov) < tol
    torch.testing.assert_close(a.mean.double(), r.mean, rtol=1e-6, atol=1e-6)


@marked(cuda_ext_marks)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_projected_linear_cuda_backend_forward_backward(ext, dtype):
    from rmtkd.ops.projected_linear import projected_linear

    g = torch.Generator(device=CUDA).manual_seed(4)
    mk = lambda *s: torch.randn(*s, device=CUDA, generator=g).to(dtype).requires_grad_()  # noqa: E731
    x, V, W, b = mk(3, 7, 129), mk(129, 16), mk(65, 16), mk(65)
    gy = torch.randn(3, 7, 65, device=CUDA, generator=g).to(dtype)
    y = projected_linear(x, V, W, b, backend="cuda")
    grads = torch.autograd.grad(y, (x, V, W, b), gy)
    xs = [t.detach().double().requires_grad_() for t in (x, V, W, b)]
    y_ref = torch.nn.functional.linear(xs[0] @ xs[1], xs[2], xs[3])
    ref = torch.autograd.grad(y_ref, xs, gy.double())
    tol = FP32_TOL if dtype == torch.float32 else 4 * U[dtype]
    assert _rel(y, y_ref.detach()) < tol
    for got, want in zip(grads, ref):
        assert got.dtype == dtype and _rel(got, want) < tol


@marked(cuda_ext_marks)
@pytest.mark.skipif(not HAS_CUPY, reason="CuPy is not installed (pip install 'rmtkd[cuda]')")
def test_gpu_cupy_round_trip(ext):
    import cupy

    x = cupy.random.standard_normal((65, 33), dtype=cupy.float32)
    V = cupy.random.standard_normal((33, 8), dtype=cupy.float32)
    W = cupy.random.standard_normal((17, 8), dtype=cupy.float32)
    y = cuda_ext.projected_linear(x, V, W)
    assert isinstance(y, cupy.ndarray) and y.shape == (65, 17)
    cupy.testing.assert_allclose(y, (x @ V) @ W.T, rtol=1e-4, atol=1e-4)
    c = cupy.zeros((33, 33), dtype=cupy.float32)
    s = cupy.zeros(33, dtype=cupy.float32)
    cuda_ext.covariance_update(x, None, None, c, s)   # in place, zero-copy
    cupy.testing.assert_allclose(cupy.triu(c), cupy.triu(x.T @ x), rtol=1e-4, atol=1e-3)
    cupy.testing.assert_allclose(s, x.sum(0), rtol=1e-4, atol=1e-4)
    cov = cupy.asarray(_planted(129, 500, 3, seed=7, dtype=torch.float32).numpy())
    fit = rmtkd.spikes(cov, 500, backend="cuda")
    assert isinstance(fit.eigenvectors, cupy.ndarray) and fit.k == 3
    res = cuda_ext.krylov_top(cov, unit=_threshold_unit("tw", 129, 500),
                              trace=float(cupy.trace(cov)), d_alive=129, n=500)
    assert isinstance(res.vectors, cupy.ndarray) and res.k == 3

