"""The CUDA kernels of csrc/ run on the CPU, through a host emulation, against torch.

No GPU is needed: tests/csrc_emu/cuda_to_host.py rewrites the unmodified csrc/*.cu into host
C++ (each CUDA block's 256 threads become host threads, __syncthreads a real barrier, WMMA
fp32 FMAs, shared memory poisoned statics; see tests/csrc_emu/include/), which g++ builds into
a shared library with a C shim (tests/csrc_emu/emu_shim.cpp) loaded here with ctypes. Every
test uses fresh seeded random inputs, outputs poisoned with NaN (y, the split workspace) or
sentinels (the lower triangle of c, which the kernel adds to: NaN + v would stay NaN), NaN
padding around every input (strided-row padding, masked-out rows, past the end) and sentinel
rows after every output, so indexing, bounds, barrier, mask, shift, split and rounding bugs
show up as NaN, as a changed sentinel or as error.

Comparisons (the design's test contract): relative error ||out - ref|| / ||ref|| against float64.
- fp32 and the documented low-precision contract (centred values / t rounded to the dtype,
  products exact in fp32): the fp32 accumulation level, FP32_TOL.
- fp16 / bf16 against the exact float64 result of the unrounded values: the kernel's error
  must stay within twice the error of the same torch reference computed in that dtype.
The emulation mocks the tensor cores with fp32 FMAs, so tensor-core rounding, timing and the
GPU memory model beyond barriers are not tested here (tests/test_cuda_ext.py, on a GPU).
"""
from __future__ import annotations

import ctypes
import importlib.util
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
EMU = Path(__file__).resolve().parent / "csrc_emu"
GXX = shutil.which("g++")
CXXFLAGS = ["-std=c++20", "-O2", "-fPIC", "-pthread", "-fno-strict-aliasing",
            "-Wall", "-Wextra", "-Wno-unknown-pragmas", f"-I{EMU / 'include'}", f"-I{CSRC}"]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
CUDA_SUCCESS, CUDA_INVALID_VALUE, CUDA_INVALID_CONFIGURATION = 0, 1, 9
# fp32 accumulation over <= ~1300 terms: random-walk error ~ sqrt(n) 2^-24 ~ 2e-6 (norm-wise).
FP32_TOL = 1e-5
# After every buffer: TILE_ROWS rows (a tile-edge bug lands there) + GUARD elements of NaN
# (inputs: a read shows up in the result) or sentinels (outputs: a write shows up).
TILE_ROWS, GUARD = 128, 64
LOWER = -7777.25  # lower triangle of c: never read or written by covariance_update
DEFAULT_SMS, DEFAULT_SMEM_OPTIN = 132, 227 * 1024  # an H100, as the launchers see it
FLUSH_ROWS = 512  # csrc/covariance.cu kFlushRows: split row ranges are multiples of it

P, I64, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def _load_translator():
    spec = importlib.util.spec_from_file_location("cuda_to_host", EMU / "cuda_to_host.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """Translate csrc/*.cu, build the emulation library once (2 compiles in parallel)."""
    if GXX is None:
        pytest.skip("g++ is not on the PATH: the host emulation of csrc/*.cu needs a C++20 g++")
    out = tmp_path_factory.mktemp("csrc_emu")
    translator = _load_translator()
    units = []
    for name in ("covariance", "projected_linear"):
        translator.translate(CSRC / f"{name}.cu", out / f"{name}.cpp")
        units.append(out / f"{name}.cpp")
    units.append(EMU / "emu_shim.cpp")

    def compile_(src: Path) -> tuple[Path, subprocess.CompletedProcess]:
        obj = out / (src.stem + ".o")
        return obj, subprocess.run([GXX, *CXXFLAGS, "-c", str(src), "-o", str(obj)],
                                   capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(compile_, units))
    lib_path = out / "librmtkd_emu.so"
    results.append((lib_path, subprocess.run(
        [GXX, "-shared", "-pthread", *(str(o) for o, _ in results), "-o", str(lib_path)],
        capture_output=True, text=True, timeout=300)))
    for _, res in results:
        if res.returncode != 0:
            pytest.fail(f"building the csrc emulation failed:\n{' '.join(res.args)}\n"
                        f"{res.stdout}{res.stderr}", pytrace=False)
    lib = ctypes.CDLL(str(lib_path))
    lib.emu_covariance_update.argtypes = [P, INT, I64, I64, I64, P, P, P, P, P]
    lib.emu_covariance_update_split.argtypes = [P, INT, I64, I64, I64, P, P, P, P, INT, P, I64, P]
    lib.emu_covariance_split_workspace_floats.argtypes = [I64, INT]
    lib.emu_covariance_split_workspace_floats.restype = I64
    lib.emu_projected_linear_forward.argtypes = [P, P, P, P, P, INT, I64, I64, I64, I64, P]
    lib.emu_set_device.argtypes = [INT, INT]
    lib.emu_blocks_run.restype = ctypes.c_long
    lib.emu_last_fault.restype = ctypes.c_char_p
    lib.emu_set_device(DEFAULT_SMS, DEFAULT_SMEM_OPTIN)
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    """Host address of a CPU tensor (fp16/bf16 tensors hold their raw 16-bit patterns)."""
    if t is None:
        return None
    return (t.view(torch.int16) if t.element_size() == 2 else t).data_ptr()


def _check_rc(lib, rc: int, expected: int = CUDA_SUCCESS) -> None:
    fault = lib.emu_last_fault().decode()
    assert rc == expected, f"launcher returned {rc}, expected {expected}; fault: {fault!r}"


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


# ------------------------------------------------------------------------------ covariance
class CovCase:
    """Random inputs of one covariance_update call, NaN wherever the kernel must not read.

    x: rows of `ldx` elements in a flat buffer (at element offset `misalign`), columns
    [d, ldx) and the guard after the last row NaN; masked-out rows entirely NaN;
    mask values any nonzero byte for kept rows. c: upper triangle random (the kernel adds to
    it), lower triangle LOWER (must stay bit-identical: not NaN, since NaN + v is still NaN
    and would hide a stray `+=`), sentinels after; colsum likewise.
    """

    def __init__(self, dt, n, d, ldx, shift, mask, misalign=0, colsum=True, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.dt, self.n, self.d, self.ldx = dt, n, d, ldx
        mean = 3.0 * torch.randn(d, generator=g)
        scale = 0.5 + torch.rand(d, generator=g)
        vals = (mean + scale * torch.randn(n, d, generator=g)).to(dt)
        self.keep = torch.ones(n, dtype=torch.bool)
        self.mask = None
        if mask:
            self.keep = torch.rand(n, generator=g) > 0.3
            self.mask = (self.keep.to(torch.uint8) * torch.randint(1, 256, (n,), generator=g,
                                                                   dtype=torch.uint8))
        rows = torch.full((n, ldx), float("nan"), dtype=dt)
        rows[:, :d] = vals
        rows[~self.keep] = float("nan")
        buf = torch.full((misalign + (n + TILE_ROWS) * ldx + GUARD,), float("nan"), dtype=dt)
        buf[misalign:misalign + n * ldx] = rows.reshape(-1)
        self.buf, self.misalign = buf, misalign
        self.vals = vals
        self.shift = (mean + 0.1 * torch.randn(d, generator=g)).float() if shift else None
        upper = torch.ones(d, d, dtype=torch.bool).triu()
        self.c = torch.full((d * d + TILE_ROWS * d + GUARD,), LOWER)
        self.c[:d * d].view(d, d)[upper] = (torch.randn(d, d, generator=g) * max(n, 1))[upper]
        self.c[d * d:] = 1234.5
        self.c0 = self.c[:d * d].view(d, d).clone()
        self.colsum = None
        if colsum:
            self.colsum = torch.cat([torch.randn(d, generator=g) * n ** 0.5,
                                     torch.full((TILE_ROWS + GUARD,), 1234.5)])
            self.cs0 = self.colsum[:d].clone()

    def x_ptr(self, row0: int = 0) -> int:
        return _ptr(self.buf[self.misalign + row0 * self.ldx:])

    def centred(self, rounded: bool) -> torch.Tensor:
        """Kept rows minus shift in float64: rounded to the dtype like the kernel (fp32
        subtraction, then round to nearest), or the exact unrounded difference."""
        x = self.vals[self.keep]
        if rounded:
            sh = self.shift if self.shift is not None else torch.zeros(self.d)
            return (x.float() - sh).to(self.dt).double()
        sh = self.shift.double() if self.shift is not None else 0.0
        return x.double() - sh

    def problems(self, ref_c: torch.Tensor, ref_cs: torch.Tensor | None, tol: float) -> list[str]:
        """What is wrong with the outputs (empty list when correct)."""
        d, out = self.d, []
        c = self.c[:d * d].view(d, d)
        upper = torch.ones(d, d, dtype=torch.bool).triu()
        if not (c[~upper] == LOWER).all():
            out.append(f"lower triangle written ({int((c[~upper] != LOWER).sum())} elements)")
        if not torch.isfinite(c[upper]).all():
            bad = int((~torch.isfinite(c[upper])).sum())
            out.append(f"non-finite upper-triangle values ({bad})")
        if not (self.c[d * d:] == 1234.5).all():
            out.append("c written past its end")
        err = _rel(c[upper], ref_c[upper])
        if not err < tol:
            out.append(f"C relative error {err:.3g} >= {tol:.3g}")
        if self.colsum is not None:
            cs = self.colsum[:d]
            if not torch.isfinite(cs).all():
                out.append("non-finite colsum")
            if not (self.colsum[d:] == 1234.5).all():
                out.append("colsum written past its end")
            err = _rel(cs, ref_cs)
            if not err < tol:
                out.append(f"colsum relative error {err:.3g} >= {tol:.3g}")
        return out

    def reference(self, rounded: bool, lowp: bool = False):
        """c0 + Xc^T Xc (upper triangle) and cs0 + colsum(Xc), float64. lowp: the product
        and sums computed by torch in the input dtype (on the rounded centred values)."""
        if lowp:
            xc = self.centred(rounded=True).to(self.dt)
            g, s = (xc.T @ xc).double(), xc.sum(0).double()
        else:
            xc = self.centred(rounded)
            g, s = xc.T @ xc, xc.sum(0)
        ref_c = (self.c0.double() + g).triu()
        ref_cs = self.cs0.double() + s if self.colsum is not None else None
        return ref_c, ref_cs

    def assert_correct(self) -> None:
        ref_c, ref_cs = self.reference(rounded=True)
        bad = self.problems(ref_c, ref_cs, FP32_TOL)
        assert not bad, f"{self}: " + "; ".join(bad)
        if self.dt == torch.float32:
            return
        # The added sums vs their exact (unrounded) value: within twice the error of the
        # same torch computation in the input dtype.
        d = self.d
        upper = torch.ones(d, d, dtype=torch.bool).triu()
        exact_c, exact_cs = self.reference(rounded=False)
        lp_c, lp_cs = self.reference(rounded=True, lowp=True)
        added = self.c[:d * d].view(d, d).double() - self.c0.double()
        exact = exact_c - self.c0.double()
        lp = lp_c - self.c0.double()
        err, err_lp = _rel(added[upper], exact[upper]), _rel(lp[upper], exact[upper])
        assert err <= 2 * err_lp + FP32_TOL, f"{self}: C error {err:.3g}, torch's {err_lp:.3g}"
        if self.colsum is not None:
            added = self.colsum[:d].double() - self.cs0.double()
            exact = exact_cs - self.cs0.double()
            err, err_lp = _rel(added, exact), _rel(lp_cs - self.cs0.double(), exact)
            assert err <= 2 * err_lp + FP32_TOL, f"{self}: colsum error {err:.3g} vs {err_lp:.3g}"

    def __repr__(self) -> str:
        return (f"CovCase({self.dt}, n={self.n}, d={self.d}, ldx={self.ldx}, "
                f"shift={self.shift is not None}, mask={self.mask is not None}, "
                f"misalign={self.misalign})")


def _cov_call(lib, case: CovCase, ldx: int | None = None) -> int:
    return lib.emu_covariance_update(case.x_ptr(), DT_CODE[case.dt], case.n, case.d,
                                     ldx if ldx is not None else case.ldx, _ptr(case.shift),
                                     _ptr(case.mask), _ptr(case.c), _ptr(case.colsum), None)


# (n, d, ldx, shift, mask, misalign): odd and round shapes, BT = 64 and 128 tiles, vector
# loads (aligned rows) and scalar ones (odd ldx, misaligned base), strided rows.
COV_SHAPES = [
    (1, 1, 1, False, False, 0),
    (37, 3, 5, True, True, 0),
    (70, 64, 64, True, False, 0),
    (50, 64, 72, False, True, 2),  # rows 16-byte multiples, base not: no vector loads
    (45, 65, 67, True, True, 1),
    (600, 129, 136, True, True, 0),
    (300, 130, 130, False, False, 0),
    (90, 300, 301, True, True, 0),  # 3 x 3 tiles: off-diagonal pairs in every position
]


@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("shape", COV_SHAPES,
                         ids=lambda s: "n{}-d{}-ldx{}-sh{:d}-m{:d}-mis{}".format(*s))
def test_covariance_update(emu, dt, shape):
    n, d, ldx, shift, mask, misalign = shape
    case = CovCase(dt, n, d, ldx, shift, mask, misalign, seed=1000 * n + d + DT_CODE[dt])
    _check_rc(emu, _cov_call(emu, case))
    case.assert_correct()


def test_covariance_without_colsum(emu):
    case = CovCase(torch.bfloat16, 130, 70, 72, True, True, colsum=False, seed=7)
    _check_rc(emu, _cov_call(emu, case))
    case.assert_correct()


def test_covariance_detects_wrong_ldx(emu):
    """Sanity check of this harness: a wrong row stride must fail the comparison."""
    case = CovCase(torch.float32, 45, 65, 67, True, False, seed=3)
    case.buf = torch.nan_to_num(case.buf, nan=1.0)  # finite padding: only the values tell
    _check_rc(emu, _cov_call(emu, case, ldx=66))
    bad = case.problems(*case.reference(rounded=True), FP32_TOL)
    assert any("C relative error" in b for b in bad), bad


@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("n,d,splits,colsum", [(1300, 20, 3, True), (1100, 130, 4, False)])
def test_covariance_split(emu, dt, n, d, splits, colsum):
    """Split path: correct, and bit-equal to the unsplit kernel run on each row range, the
    partials added in split order 0, 1, ... in fp32 (the documented fixed-order reduction)."""
    case = CovCase(dt, n, d, d + 3, True, True, colsum=colsum, seed=n + d + DT_CODE[dt])
    need = emu.emu_covariance_split_workspace_floats(d, splits)
    assert need == splits * (d * d + d)
    # row ranges: ceil(n / splits) rounded up to whole FLUSH_ROWS; no empty ranges
    rows = -(-(-(-n // splits)) // FLUSH_ROWS) * FLUSH_ROWS
    used = -(-n // rows)
    ws = torch.full((need + GUARD,), float("nan"))  # fully overwritten where used
    args = (DT_CODE[dt], n, d, case.ldx, _ptr(case.shift), _ptr(case.mask), _ptr(case.c),
            _ptr(case.colsum))
    short = used * (d * d + d) - 1  # one float short of what the used splits write
    split = emu.emu_covariance_update_split
    _check_rc(emu, split(case.x_ptr(), *args, splits, _ptr(ws), short, None), CUDA_INVALID_VALUE)
    _check_rc(emu, split(case.x_ptr(), *args, splits, _ptr(ws), need, None))
    assert torch.isnan(ws[used * (d * d + d):]).all(), "workspace written past the used splits"
    case.assert_correct()

    # the same sum, re-formed from unsplit partial runs over the split's row ranges
    total_c = torch.zeros(d, d)
    total_cs = torch.zeros(d)
    for r0 in range(0, n, rows):
        nr = min(rows, n - r0)
        part_c = torch.zeros(d * d)
        part_cs = torch.zeros(d)
        mask = case.mask[r0:] if case.mask is not None else None
        _check_rc(emu, emu.emu_covariance_update(case.x_ptr(r0), DT_CODE[dt], nr, d, case.ldx,
                                                 _ptr(case.shift), _ptr(mask), _ptr(part_c),
                                                 _ptr(part_cs), None))
        total_c += part_c.view(d, d)  # fp32, in split order
        total_cs += part_cs
    upper = torch.ones(d, d, dtype=torch.bool).triu()
    expect = case.c0 + total_c
    assert torch.equal(case.c[:d * d].view(d, d)[upper], expect[upper]), "not the fixed order"
    if colsum:
        assert torch.equal(case.colsum[:d], case.cs0 + total_cs)


def test_covariance_argument_errors(emu):
    case = CovCase(torch.float32, 10, 4, 4, False, False, seed=1)
    before = case.c.clone()
    cov, c = emu.emu_covariance_update, _ptr(case.c)
    _check_rc(emu, _cov_call(emu, case, ldx=3), CUDA_INVALID_VALUE)  # ldx < d
    _check_rc(emu, cov(None, 0, 10, 4, 4, None, None, c, None, None), CUDA_INVALID_VALUE)
    _check_rc(emu, cov(case.x_ptr(), 3, 10, 4, 4, None, None, c, None, None),
              CUDA_INVALID_VALUE)  # unknown dtype
    _check_rc(emu, cov(None, 0, 0, 4, 4, None, None, None, None, None))  # n == 0: no-op
    assert torch.equal(case.c, before)


# ------------------------------------------------------------------------ projected linear
def _pl_inputs(dt, m, inp, out, k, bias, misalign, seed):
    g = torch.Generator().manual_seed(seed)

    def buf(rows, cols, scale, offset=0):
        vals = (torch.randn(rows, cols, generator=g) * scale).to(dt)
        b = torch.full((offset + (rows + TILE_ROWS) * cols + GUARD,), float("nan"), dtype=dt)
        b[offset:offset + rows * cols] = vals.reshape(-1)
        return vals, b[offset:]

    x, xb = buf(m, inp, 1.0, misalign)
    v, vb = buf(inp, k, max(inp, 1) ** -0.5)
    w, wb = buf(out, k, max(k, 1) ** -0.5)
    b, bb = buf(1, out, 1.0)
    return (x, v, w, b.reshape(-1) if bias else None), (xb, vb, wb, bb if bias else None)


def _pl_run(lib, dt, m, inp, out, k, bias, misalign=0, seed=0):
    (x, v, w, b), (xb, vb, wb, bb) = _pl_inputs(dt, m, inp, out, k, bias, misalign, seed)
    y = torch.full((m * out + TILE_ROWS * out + GUARD,), float("nan"), dtype=dt)
    y[m * out:] = 7.0
    rc = lib.emu_projected_linear_forward(_ptr(xb), _ptr(vb), _ptr(wb), _ptr(bb), _ptr(y),
                                          DT_CODE[dt], m, inp, out, k, None)
    return rc, (x, v, w, b), y


# (m, in, out, k, bias, misalign, sm_count): k in every rank bucket (32/64/128/256); the SM
# count sets the column groups: 1 group doing all tiles, several with 1 or 2 tiles each.
PL_SHAPES = [
    (3, 5, 7, 1, True, 0, DEFAULT_SMS),
    (37, 33, 129, 17, True, 1, DEFAULT_SMS),
    (130, 48, 200, 64, False, 0, 4),
    (70, 100, 65, 100, True, 0, 1),
    (66, 40, 70, 256, True, 2, DEFAULT_SMS),  # in % 8 == 0 but x misaligned
]


@pytest.fixture
def device(emu):
    """Set the emulated device's SM count / shared-memory opt-in; restored afterwards."""
    yield emu.emu_set_device
    emu.emu_set_device(DEFAULT_SMS, DEFAULT_SMEM_OPTIN)


@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("shape", PL_SHAPES,
                         ids=lambda s: "m{}-in{}-out{}-k{}-b{:d}-mis{}-sm{}".format(*s))
def test_projected_linear(emu, device, dt, shape):
    m, inp, out, k, bias, misalign, sms = shape
    device(sms, DEFAULT_SMEM_OPTIN)
    rc, (x, v, w, b), y = _pl_run(emu, dt, m, inp, out, k, bias, misalign,
                                  seed=1000 * m + k + DT_CODE[dt])
    _check_rc(emu, rc)
    assert (y[m * out:] == 7.0).all(), "y written past its end"
    y = y[:m * out].view(m, out)
    assert torch.isfinite(y).all(), f"{int((~torch.isfinite(y)).sum())} elements of y not written"
    bias64 = b.double() if b is not None else 0.0
    exact = (x.double() @ v.double()) @ w.double().T + bias64
    if dt == torch.float32:
        err = _rel(y, exact)
        assert err < FP32_TOL, f"fp32 relative error {err:.3g}"
        return
    # contract: t rounded to the dtype between the products, y rounded once at the end:
    # at most the dtype's unit roundoff (2^-11 fp16, 2^-8 bf16) from the float64 result.
    unit = torch.finfo(dt).eps / 2
    contract = (x.double() @ v.double()).to(dt).double() @ w.double().T + bias64
    err_c = _rel(y, contract)
    assert err_c <= unit, f"error {err_c:.3g} vs rounded-t reference > unit roundoff {unit:.3g}"
    # the design's contract: within twice the error of torch's own two-GEMM computation in
    # this dtype
    lowp = (x @ v) @ w.T + (b if b is not None else 0)
    err, err_lp = _rel(y, exact), _rel(lowp, exact)
    assert err <= 2 * err_lp + FP32_TOL, f"error {err:.3g} vs torch {dt} {err_lp:.3g}"


@pytest.mark.parametrize("dt", DTYPES, ids=str)
def test_projected_linear_empty_rank_gives_bias(emu, dt):
    for inp, k in ((9, 0), (0, 5)):
        rc, (x, v, w, b), y = _pl_run(emu, dt, 5, inp, 11, k, True)
        _check_rc(emu, rc)
        assert torch.equal(y[:55].view(5, 11), b.expand(5, 11)), (inp, k)


def test_projected_linear_argument_errors(emu, device):
    rc, _, y = _pl_run(emu, torch.float32, 4, 8, 6, 257, True)
    _check_rc(emu, rc, CUDA_INVALID_VALUE)  # k > kProjectedLinearMaxRank
    assert torch.isnan(y[:24]).all(), "y written despite the error"
    pl = emu.emu_projected_linear_forward
    _check_rc(emu, pl(None, None, None, None, None, 0, -1, 8, 6, 5, None), CUDA_INVALID_VALUE)
    # fp32 at k > 128 needs ~92 KiB of shared memory: refused on a device with 64 KiB
    device(DEFAULT_SMS, 64 * 1024)
    rc, _, y = _pl_run(emu, torch.float32, 4, 8, 6, 200, True)
    _check_rc(emu, rc, CUDA_INVALID_CONFIGURATION)
    assert torch.isnan(y[:24]).all(), "y written despite the error"
    rc, _, y = _pl_run(emu, torch.float16, 4, 8, 6, 100, True)  # fits: runs
    _check_rc(emu, rc)
