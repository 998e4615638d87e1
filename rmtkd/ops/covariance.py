"""Streaming covariance of activations: ``CovarianceAccumulator``.

The running state is ``(n, mean, M2)`` with ``M2`` the centred sum of outer products, so the
result stays accurate when ``|mean| >> std`` (activations with a large offset). Each batch is
shifted by the running mean (the first batch by its own mean) before its Gram matrix is
formed, and batches, chunks and (later) ranks are combined with the pairwise update of
Chan, Golub & LeVeque, ``merge_moments``.

The mean is carried in float64 whatever ``acc_dtype`` (a ``d``-vector, so free): with
``|mean|/std = 1e3`` an fp32 mean is off by up to ~6e-5 std, and in a balanced merge that
error is multiplied by ``n_a n_b / n ~ n / 4``, which alone would exceed 1e-5 relative error.

Only the upper triangle of ``M2`` is authoritative; the lower triangle holds whatever the
elementwise updates left there and is rebuilt by symmetry in ``finalize`` / ``state_dict``.

Backends: ``torch`` (the reference). On CPU the shifted batch is written into a workspace
whose last column is ones, so one product ``W^T W`` yields both the Gram matrix and the
column sums; for large products only its upper triangle is formed (scipy's BLAS ``?syrk`` on
few-core machines, torch GEMMs on column blocks otherwise, see ``_cpu_method``), for small
ones it is a single torch GEMM. On other devices it uses plain torch matmuls. fp32 products
always run in full precision (never TF32).

``triton`` (float32 accumulation only): one kernel launch per batch (``rmtkd.kernels.
covariance.shifted_gram``) forms the upper tiles of the shifted Gram matrix and the column
sums, reading the row mask in the same pass instead of gathering the kept rows. fp16/bf16
rows are centred in fp32 and rounded back to their dtype for the tensor-core product; the
accumulator picks shifts for which that rounding is exact (see ``_shifted_gram_triton``), so
the result is as accurate as the torch path's. It runs on CUDA tensors, or on CPU tensors
under ``TRITON_INTERPRET=1`` (tests). Both backends share the merge path below.

``cuda`` (float32 accumulation, CUDA tensors): the same per-batch step with the C++
extension's ``rmtkd::covariance_update`` (csrc/covariance.cu: upper tiles of the shifted Gram
matrix and the column sums in one pass, mask read in the kernel, fp16/bf16 on the tensor
cores), with the same shift choice as the triton backend and the same merge.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple

import torch
from scipy.linalg import blas as _blas

from .dispatch import register_backend, resolve_backend, triton_runnable
from .cuda_ext import cuda_runnable

__all__ = ["AccumulatorMemoryError", "CovarianceAccumulator", "CovarianceStats",
           "NonFiniteInputError", "accumulator_bytes", "merge_moments"]

_ACC_DTYPES = (torch.float32, torch.float64)
_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# CPU workspace: batches are split into balanced chunks of at most this many elements
# (128 MiB in fp32) but never fewer than _MIN_CHUNK_ROWS rows, so a typical batch is one
# product (each extra syrk call costs ~5-10 ms of thread hand-over at d = 1024).
_CHUNK_ELEMS = 1 << 25
_MIN_CHUNK_ROWS = 16384
# Which CPU product forms W^T W (see _cpu_method). Measured, n = 16384 rows, against
# X.T @ X + X.sum(0), d = 1024..4096: on 2 cores (AMD EPYC) syrk 1.4-1.9x, blocks 1.25-1.45x;
# on 16 cores (Xeon) OpenBLAS syrk 0.55-1.2x, blocks 1.15-1.3x. Below ~2.5e9 multiply-adds
# per chunk neither beats one GEMM (thread start-up and hand-over costs).
_BIG_MIN_DIM = 512
_BIG_MIN_WORK = 2.5e9
_SYRK_MAX_THREADS = 4
_BLOCK_COLS = 256


# d x d acc-dtype buffers an update holds at once: the running M2 and one batch's Gram matrix.
_STATE_BUFFERS = 2
# Messages of torch's allocation failures (CPU: c10's DefaultCPUAllocator; CUDA/other devices).
_OOM_MESSAGES = ("can't allocate memory", "DefaultCPUAllocator", "out of memory",
                 "not enough memory")


def accumulator_bytes(dim: int, acc_dtype: torch.dtype = torch.float32,
                      buffers: int = _STATE_BUFFERS) -> int:
    """Bytes of ``buffers`` ``(dim, dim)`` ``acc_dtype`` matrices: what a
    ``CovarianceAccumulator(dim)`` needs while it updates (the running ``M2`` and one
    batch's Gram matrix; the ``dim``-vectors and the CPU row workspace come on top)."""
    return dim * dim * acc_dtype.itemsize * buffers


def _human_bytes(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


class AccumulatorMemoryError(MemoryError):
    """A covariance accumulator (``dim x dim`` state) does not fit in memory on its device.

    Raised instead of torch's allocation error (CPU ``DefaultCPUAllocator: can't allocate
    memory``, ``torch.cuda.OutOfMemoryError``), which is kept as ``__cause__``. The message
    names the site (when known), ``dim``, the bytes needed and what to do: accumulate in
    float32 instead of float64, accumulate on the CPU, calibrate fewer sites at once.

    Attributes: ``site`` (None outside calibration), ``dim``, ``acc_dtype``, ``device``,
    ``bytes_needed`` (:func:`accumulator_bytes`), ``total_bytes`` (of every site calibrated
    at once, or None), ``n_sites``.
    """

    def __init__(self, *, dim: int, acc_dtype: torch.dtype, device: torch.device | str,
                 action: str = "allocating", site: str | None = None,
                 total_bytes: int | None = None, n_sites: int = 1, detail: str = "") -> None:
        self.dim, self.acc_dtype, self.device = dim, acc_dtype, torch.device(device)
        self.action, self.site, self.detail = action, site, detail
        self.bytes_needed = accumulator_bytes(dim, acc_dtype)
        self.total_bytes, self.n_sites = total_bytes, n_sites
        super().__init__(self._message())

    def _message(self) -> str:
        dt = str(self.acc_dtype).replace("torch.", "")
        whose = f"of site {self.site!r} " if self.site is not None else ""
        need = (f"out of memory on {self.device} {self.action} the covariance accumulator "
                f"{whose}(d = {self.dim:,}, {dt}): it needs about "
                f"{self.bytes_needed:,} bytes ({_human_bytes(self.bytes_needed)}: "
                f"{_STATE_BUFFERS} d x d {dt} buffers, the running M2 and one batch's Gram "
                f"matrix)")
        if self.total_bytes is not None and self.n_sites > 1:
            need += (f"; the {self.n_sites} sites calibrated at once need "
                     f"{_human_bytes(self.total_bytes)}")
        options = []
        if self.acc_dtype == torch.float64:
            options.append("accumulate in float32 instead of float64 (--acc-dtype float32, "
                           "acc_dtype=torch.float32: half the memory)")
        if self.device.type != "cpu":
            options.append("accumulate on the CPU (device='cpu' of "
                           "rmtkd.capture.collect_statistics; activations are copied there)")
        else:
            options.append("free memory on this machine or use one with more")
        options.append("calibrate fewer sites at once (--sites GLOB ..., sites=[...]: "
                       "every site keeps its own d x d accumulator)")
        msg = f"{need}. Options: " + "; ".join(options) + "."
        return msg + (f" (torch: {self.detail})" if self.detail else "")

    def for_site(self, site: str, total_bytes: int | None = None, n_sites: int = 1
                 ) -> "AccumulatorMemoryError":
        """The same error naming ``site`` (and the memory of every site at once)."""
        return AccumulatorMemoryError(dim=self.dim, acc_dtype=self.acc_dtype,
                                      device=self.device, action=self.action, site=site,
                                      total_bytes=total_bytes, n_sites=n_sites,
                                      detail=self.detail)


def _is_oom(e: BaseException) -> bool:
    """Whether ``e`` is an allocation failure (torch's CPU/CUDA OOM or MemoryError)."""
    if isinstance(e, AccumulatorMemoryError):
        return False
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(e, (MemoryError, oom)) or (
        isinstance(e, RuntimeError) and any(m in str(e) for m in _OOM_MESSAGES))


def _oom_guarded(action: str) -> Callable:
    """Decorate an accumulator method: an allocation failure inside it is re-raised as
    :class:`AccumulatorMemoryError` (the original error is its ``__cause__``)."""
    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        def guarded(self: "CovarianceAccumulator", *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except Exception as e:
                if not _is_oom(e):
                    raise
                first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
                raise AccumulatorMemoryError(
                    dim=self.dim, acc_dtype=self.acc_dtype,
                    device=getattr(self, "device", "cpu"), action=action,
                    detail=f"{type(e).__name__}: {first[:300]}") from e
        return guarded
    return wrap


def _new_state(dim: int, acc_dtype: torch.dtype, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty running state: mean ``(dim,)`` float64 and M2 ``(dim, dim)`` ``acc_dtype``."""
    return (torch.zeros(dim, dtype=torch.float64, device=device),
            torch.zeros(dim, dim, dtype=acc_dtype, device=device))


class NonFiniteInputError(ValueError):
    """A batch given to ``CovarianceAccumulator.update`` holds NaN or Inf values.

    The accumulator state is left unchanged; callers add context (site, batch index).
    """


@dataclass
class CovarianceStats:
    """Result of ``CovarianceAccumulator.finalize``.

    Attributes:
        n: number of rows seen.
        mean: ``(dim,)`` row mean, accumulation dtype (carried in float64 internally).
        cov: ``(dim, dim)`` centred covariance divided by ``n`` (not ``n - 1``), a full
            exactly symmetric matrix in the accumulation dtype.
    """

    n: int
    mean: torch.Tensor
    cov: torch.Tensor


def merge_moments(n_a: int, mean_a: torch.Tensor, m2_a: torch.Tensor,
                  n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor
                  ) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Pairwise (Chan et al.) merge of centred moments ``b`` into ``a``, in place.

    ``M2 = M2_a + M2_b + delta delta^T n_a n_b / n`` and ``mean = mean_a + delta n_b / n``
    with ``delta = mean_b - mean_a`` and ``n = n_a + n_b``.

    Args:
        n_a, n_b: row counts (either may be 0).
        mean_a, mean_b: ``(d,)`` means (float64 recommended); ``mean_a`` is updated in place.
        m2_a, m2_b: ``(d, d)`` centred sums of outer products, same dtype and device;
            ``m2_a`` is updated in place, ``m2_b`` is only read.

    Returns:
        ``(n, mean_a, m2_a)`` after the merge.
    """
    n = n_a + n_b
    if n_b == 0:
        return n_a, mean_a, m2_a
    delta = mean_b - mean_a
    mean_a.add_(delta, alpha=n_b / n)
    delta_m2 = delta.to(m2_a.dtype)
    m2_a.add_(m2_b).addr_(delta_m2, delta_m2, alpha=n_a * n_b / n)
    return n, mean_a, m2_a


@contextlib.contextmanager
def ieee_fp32_matmul() -> Iterator[None]:
    """Force full-precision fp32 matmuls (no TF32) for the duration of the block."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


def _shifted_gram_matmul(x: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted Gram matrix and column sums with plain torch ops (any device).

    Args:
        x: ``(m, d)`` rows, any float dtype, on ``shift``'s device.
        shift: ``(d,)`` in the accumulation dtype.

    Returns:
        ``G = Xs^T Xs`` ``(d, d)`` and ``s = Xs.sum(0)`` ``(d,)``, ``Xs = x - shift``, both in
        ``shift.dtype``.
    """
    xs = torch.sub(x, shift).to(shift.dtype)
    with ieee_fp32_matmul():
        g = xs.mT @ xs
    return g, xs.sum(0)


class _OpenBLAS(NamedTuple):
    controller: Any  # threadpoolctl's controller: .num_threads
    shutdown: Callable[[], None]  # blas_thread_shutdown_: stop the worker threads


@functools.lru_cache(maxsize=None)
def _scipy_openblas() -> _OpenBLAS | None:
    """The OpenBLAS that scipy uses (threadpoolctl's controller and its
    ``blas_thread_shutdown_``), or None if not found (then syrk is not used).

    After a threaded call, OpenBLAS workers busy-wait for ~2^28 cycles (~0.1 s) before
    sleeping. On a small machine they compete with torch's OpenMP threads, so the torch work
    that follows (the next forward pass) runs up to 5x slower and the time saved by syrk is
    lost again. Shutting the pool down costs ~0.05 ms and OpenBLAS restarts it on its next
    call, as it does after ``fork``. Loaded with ``PyDLL`` so the GIL stays held, as it is
    during scipy's (f2py) BLAS calls; code calling scipy's BLAS without the GIL (Cython) in
    another thread at the same moment would race with it.
    """
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    libs = [c for c in ThreadpoolController().lib_controllers if c.internal_api == "openblas"]
    # pip wheels: scipy's copy lives in scipy.libs/ or scipy_openblas32/, numpy's in numpy.libs/.
    ours = [c for c in libs if "scipy" in os.path.basename(os.path.dirname(c.filepath))
            or "scipy_openblas" in os.path.dirname(c.filepath)] or (libs if len(libs) == 1 else [])
    if len(ours) != 1:
        return None
    try:
        return _OpenBLAS(ours[0], ctypes.PyDLL(ours[0].filepath).blas_thread_shutdown_)
    except (OSError, AttributeError):
        return None


def _cpu_method(rows: int, d: int) -> str:
    """The CPU product for chunks of ``rows`` x ``d``: "gemm", "blocks" or "syrk".

    One GEMM for small products; for large ones only the upper triangle: scipy's ``?syrk``
    where its OpenBLAS pool is small (and can be released after the call), else torch GEMMs
    on column blocks of the upper triangle.
    """
    if d < _BIG_MIN_DIM or rows * d * d < _BIG_MIN_WORK:
        return "gemm"
    openblas = _scipy_openblas()
    if openblas is not None and openblas.controller.num_threads <= _SYRK_MAX_THREADS:
        return "syrk"
    return "blocks"


def _shifted_gram_cpu(x: torch.Tensor, shift: torch.Tensor, workspace: torch.Tensor,
                      method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted Gram matrix and column sums on CPU, from one product per chunk of rows.

    Each chunk of ``workspace.shape[0]`` rows is written shifted into ``workspace[:, :d]``,
    whose last column is ones, and ``W^T W`` is accumulated into one ``(d + 1, d + 1)``
    matrix: its ``[:d, :d]`` block is ``Xs^T Xs`` and its last column ``Xs.sum(0)``.

    Args:
        x: ``(m, d)`` CPU rows, any float dtype.
        shift: ``(d,)`` CPU, float32 or float64 (the accumulation dtype).
        workspace: ``(rows, d + 1)`` contiguous, ``shift.dtype``, last column all ones.
        method: "gemm" (one torch GEMM), "blocks" (torch GEMMs on column blocks of the upper
            triangle, ~half the flops) or "syrk" (scipy's BLAS ``?syrk``, half the flops).

    Returns:
        ``G`` ``(d, d)`` with its upper triangle valid and ``s`` ``(d,)``, views of one freshly
        allocated matrix.
    """
    m, d = x.shape
    n_cols = d + 1
    g = torch.zeros(n_cols, n_cols, dtype=shift.dtype)
    # BLAS is column-major: W^T (rows of W as columns) is F-contiguous without a copy, and the
    # lower triangle of the column-major view of g is the upper triangle of g.
    c = g.numpy().T
    syrk = _blas.ssyrk if shift.dtype == torch.float32 else _blas.dsyrk
    openblas = _scipy_openblas()
    n_blocks = max(1, round(n_cols / _BLOCK_COLS))
    edges = [round(i * n_cols / n_blocks) for i in range(n_blocks + 1)]
    rows = workspace.shape[0]
    for i in range(0, m, rows):
        r = min(rows, m - i)
        w = workspace[:r]
        torch.sub(x[i:i + r], shift, out=w[:, :d])
        if method == "syrk":
            c = syrk(1.0, w.numpy().T, beta=1.0, c=c, trans=0, lower=1, overwrite_c=1)
            if openblas is not None:
                openblas.shutdown()  # release the spinning workers now
        else:
            with ieee_fp32_matmul():  # oneDNN may also be set to TF32/bf16 for fp32
                if method == "gemm":
                    g.addmm_(w.mT, w)
                else:
                    for lo, hi in zip(edges[:-1], edges[1:]):
                        g[lo:hi, lo:].addmm_(w[:, lo:hi].mT, w[:, lo:])
    if method == "syrk":
        g = torch.from_numpy(c.T)  # the same storage unless f2py had to copy c
    return g[:d, :d], g[:d, d]


def _torch_available(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    if dtype not in _ACC_DTYPES:
        return False, f"accumulation dtype must be float32 or float64, got {dtype}"
    return True, ""


register_backend("covariance", "torch", _torch_available)


def _triton_available(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    if dtype != torch.float32:
        return False, (f"the Triton covariance kernel accumulates in float32 only, got "
                       f"acc_dtype={dtype}; use backend='torch' for float64 accumulation")
    return triton_runnable(device)


# backend="auto" resolves to Triton for CUDA tensors with float32 accumulation (never for CPU
# tensors), and then runs the Triton kernel for fp16/bf16 batches only: fp32/fp64 batches take
# the torch path (_AUTO_TRITON_DTYPES). Measured (bench/bench_covariance.py, n = 65536,
# NVIDIA H200, Triton 3.6, torch 2.11): bf16 d = 4096 kernel 7.3 ms, update 8.0 ms, while the
# torch backend upcasts to fp32 and runs a TF32-free fp32 GEMM of twice the flops (41.6 ms for
# the GEMM alone); fp32 d = 4096: Triton "ieee" kernel 66 ms vs that GEMM 41.6 ms, so torch.
# (Against a bare bf16 torch.mm with fp32 output, which the accumulator cannot use because it
# does not centre, the kernel is 0.39-0.61x; see the bench JSON.) backend="triton" given by
# name runs the kernel for every input dtype.
register_backend("covariance", "triton", _triton_available)
_AUTO_TRITON_DTYPES = (torch.float16, torch.bfloat16)


def _cuda_available(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    if dtype != torch.float32:
        return False, (f"the CUDA covariance kernel accumulates in float32 only, got "
                       f"acc_dtype={dtype}; use backend='torch' for float64 accumulation")
    return cuda_runnable(device)


# No GPU has measured the CUDA kernel yet (bench/bench_covariance.py has the column), so
# backend="auto" never picks it: it runs only when asked for by name, for every input dtype.
register_backend("covariance", "cuda", _cuda_available, auto=False)


def _shifted_gram_cuda(x2d: torch.Tensor, shift: torch.Tensor, keep: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G, s)`` of the kept rows of ``x2d - shift`` from one ``rmtkd::covariance_update``
    call: G's upper triangle (the lower one stays zero) and the column sums, float32."""
    from .cuda_ext import load_extension

    load_extension(with_cuda=True)
    d = x2d.shape[1]
    if x2d.shape[0] > 1 and x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    g = torch.zeros(d, d, dtype=torch.float32, device=x2d.device)
    s = torch.zeros(d, dtype=torch.float32, device=x2d.device)
    keep = keep.contiguous() if keep is not None else None
    torch.ops.rmtkd.covariance_update(x2d, shift.float().contiguous(), keep, g, s)
    return g, s


@functools.lru_cache(maxsize=None)
def _triton_kernels() -> Any:
    """``rmtkd.kernels.covariance``, imported on first use (importing it imports Triton)."""
    from ..kernels import covariance as kernels_covariance

    return kernels_covariance


class CovarianceAccumulator:
    """Streaming mean and covariance of rows of width ``dim``, in constant memory.

    Example::

        acc = CovarianceAccumulator(768)
        for h, attn_mask in batches:          # h: [batch, seq, 768], attn_mask: [batch, seq]
            acc.update(h, attn_mask.bool())
        stats = acc.finalize()                # stats.cov: (768, 768) float32

    Args:
        dim: row width ``d`` (>= 1).
        acc_dtype: accumulation dtype, ``torch.float32`` (default) or ``torch.float64``.
        device: where the state lives; ``None`` adopts the device of the first non-empty
            batch (or of a loaded state). Later batches are moved to it.
        backend: ``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"`` or ``None`` (the
            ``RMTKD_BACKEND`` environment variable); an unavailable backend raises.

    Every method that allocates raises :class:`AccumulatorMemoryError` (site-independent;
    :func:`rmtkd.capture.collect_statistics` adds the site) when the state does not fit.
    """

    @_oom_guarded("allocating")
    def __init__(self, dim: int, *, acc_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, backend: str | None = "auto") -> None:
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim must be an int, got {type(dim).__name__}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if acc_dtype not in _ACC_DTYPES:
            raise TypeError(f"acc_dtype must be torch.float32 or torch.float64, got {acc_dtype}")
        self.dim = dim
        self.acc_dtype = acc_dtype
        self._requested_backend = backend
        req = (backend or "auto").strip().lower()
        if req == "auto":
            req = os.environ.get("RMTKD_BACKEND", "auto").strip().lower()
        self._auto = req == "auto"  # auto-chosen Triton runs only _AUTO_TRITON_DTYPES
        self._device_fixed = device is not None
        self._set_device(torch.device(device) if device is not None else torch.device("cpu"))
        self._n = 0
        self._mean, self._m2 = _new_state(dim, acc_dtype, self.device)
        self._workspace: torch.Tensor | None = None

    def _set_device(self, device: torch.device) -> None:
        try:
            self.backend = resolve_backend("covariance", self._requested_backend, device,
                                           self.acc_dtype)
        except RuntimeError:
            # No device given yet: a GPU backend asked for by name is checked against CUDA
            # (the state adopts the device of the first batch, and is checked again then).
            if self._device_fixed or not torch.cuda.is_available():
                raise
            self.backend = resolve_backend("covariance", self._requested_backend,
                                           torch.device("cuda"), self.acc_dtype)
        self.device = device

    @_oom_guarded("moving")
    def _adopt_device(self, device: torch.device) -> None:
        """Move the (still empty) state to ``device`` if no device was fixed yet."""
        if self._device_fixed:
            return
        self._device_fixed = True
        moved = device != self.device
        self._set_device(device)  # (re)check the backend against the adopted device
        if moved:
            self._mean = self._mean.to(device)
            self._m2 = self._m2.to(device)

    @property
    def n(self) -> int:
        """Number of rows accumulated so far."""
        return self._n

    def __repr__(self) -> str:
        return (f"CovarianceAccumulator(dim={self.dim}, n={self._n}, acc_dtype={self.acc_dtype}, "
                f"device={self.device}, backend={self.backend!r})")

    def _batch(self, x: torch.Tensor, mask: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Validate a batch; return its rows ``(rows, dim)`` (a view where possible), the
        flattened bool mask ``(rows,)`` or None, and the number of selected rows. Both
        tensors are on the state device, adopted from the batch if it has selected rows."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape [..., {self.dim}], "
                            f"got {type(x).__name__}")
        if x.dtype not in _INPUT_DTYPES:
            raise TypeError(f"x has dtype {x.dtype}; expected a floating tensor (float32, "
                            f"float16, bfloat16 or float64): cast it first, e.g. x.float()")
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"expected x of shape [..., {self.dim}] (last dim = dim), "
                             f"got shape {tuple(x.shape)}")
        x2d = x.reshape(-1, self.dim)
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise TypeError(f"mask must be a bool tensor of shape {tuple(x.shape[:-1])} "
                                f"(True = keep the row), got {got}; use mask.bool()")
            if mask.shape != x.shape[:-1]:
                raise ValueError(f"mask must have shape x.shape[:-1] = {tuple(x.shape[:-1])}, "
                                 f"got {tuple(mask.shape)}")
            keep = mask.reshape(-1).to(x2d.device)
            m = int(torch.count_nonzero(keep))
        else:
            keep, m = None, x2d.shape[0]
        if m > 0:
            self._adopt_device(x2d.device)
        return x2d.to(self.device), None if keep is None else keep.to(self.device), m

    def _cpu_workspace(self, m: int) -> torch.Tensor:
        """A ``(rows, dim + 1)`` acc-dtype buffer, last column ones, for ``m`` rows split into
        balanced chunks of at most ~``_CHUNK_ELEMS`` elements; reused across updates."""
        cap = max(_MIN_CHUNK_ROWS, _CHUNK_ELEMS // (self.dim + 1))
        rows = -(-m // -(-m // cap))  # ceil(m / number of chunks)
        ws = self._workspace
        if ws is None or ws.shape[0] < rows:
            ws = torch.empty(rows, self.dim + 1, dtype=self.acc_dtype)
            ws[:, self.dim] = 1
            self._workspace = ws
        return ws[:rows]

    def _shifted_gram_triton(self, x2d: torch.Tensor, keep: torch.Tensor | None, m: int
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Shifted Gram matrix (upper triangle valid), column sums of the kept rows and the
        shift used, ``(G, s, shift)``, from one Triton launch that reads the mask itself (or,
        for the cuda backend, one ``rmtkd::covariance_update`` call with the same contract).

        The shift is the running mean (the first batch's own mean), except for fp16/bf16 rows,
        which the kernel centres in fp32 and rounds back to their dtype for the tensor-core
        product. There each column's shift is chosen so that this rounding is exact: 0 where
        ``|mean| < 8 std`` (then ``x - 0`` is ``x``; the cancellation in ``G - s s^T / m``
        costs at most a factor ``1 + 64`` on fp32 rounding errors, ~1e-6), else the mean
        rounded to the input dtype (then ``x - shift`` is exact for every ``x`` within a
        factor 2 of it, Sterbenz' lemma: all rows within ~4 std of the mean, and the shift is
        within ``u |mean|`` of the mean, ``u`` = 2^-11 fp16 / 2^-8 bf16). The products are
        then as exact as with fp32 rows and fp32 accumulation. float64 rows are centred in
        float64 by torch first (the kernel reads fp32/fp16/bf16).
        """
        acc = self.acc_dtype
        first = None
        if self._n > 0:
            shift = self._mean.to(acc)
        else:
            first = x2d if keep is None else x2d[keep]
            shift = first.mean(0, dtype=acc)
        kshift = shift
        if x2d.dtype == torch.float64:
            x2d = (x2d - shift.double()).float()
            kshift = torch.zeros_like(shift)
        elif x2d.dtype in (torch.float16, torch.bfloat16):
            if first is None:
                var = self._m2.diagonal().clamp_min(0) / self._n
            else:
                var = (first.to(acc) - shift).square_().mean(0)
            top = torch.finfo(x2d.dtype).max
            rounded = shift.clamp(-top, top).to(x2d.dtype).to(acc)
            shift = kshift = torch.where(shift.square() < 64 * var, torch.zeros_like(shift),
                                         rounded)
        if self.backend == "cuda":  # same contract, the C++ extension's kernel
            g, s = _shifted_gram_cuda(x2d, kshift, keep)
            return g, s, shift
        g, s, _ = _triton_kernels().shifted_gram(x2d, kshift, keep, rows_used=m,
                                                 shift_exact=True)  # (ignored for fp32)
        return g, s, shift

    @_oom_guarded("updating")
    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> "CovarianceAccumulator":
        """Add the rows of a batch.

        Args:
            x: ``[..., dim]`` float32/float16/bfloat16/float64; leading dims are flattened
                into rows.
            mask: optional bool tensor of shape ``x.shape[:-1]``; only rows where it is True
                are used (e.g. non-padding tokens).

        Returns:
            ``self``. A batch with no selected rows is a no-op.

        Raises:
            NonFiniteInputError: the batch holds NaN/Inf (the state is unchanged).
            AccumulatorMemoryError: the update does not fit on the device (allocation
                failure; the state is unchanged).
        """
        x2d, keep, m = self._batch(x, mask)
        if m == 0:
            return self
        acc = self.acc_dtype
        if self.backend == "cuda" or (self.backend == "triton" and (
                not self._auto or x2d.dtype in _AUTO_TRITON_DTYPES)):
            g, s, shift = self._shifted_gram_triton(x2d, keep, m)
        else:  # torch: see _cpu_method on CPU, plain matmuls elsewhere
            if keep is not None:
                x2d = x2d[keep]
            shift = self._mean.to(acc) if self._n > 0 else x2d.mean(0, dtype=acc)
            if self.device.type == "cpu":
                ws = self._cpu_workspace(m)
                g, s = _shifted_gram_cpu(x2d, shift, ws, _cpu_method(ws.shape[0], self.dim))
            else:
                g, s = _shifted_gram_matmul(x2d, shift)
        # Any NaN/Inf in the batch reaches the column sums; an overflowing square, the diagonal.
        if not bool(torch.isfinite(s).all() & torch.isfinite(g.diagonal()).all()):
            raise NonFiniteInputError(
                f"non-finite values in batch of shape {tuple(x.shape)} (NaN/Inf, or values whose "
                f"squares overflow {self.acc_dtype}); the accumulator was not updated")
        mean_b = shift.double() + s.double() / m
        m2_b = g.addr_(s, s, alpha=-1.0 / m)
        self._n, self._mean, self._m2 = merge_moments(
            self._n, self._mean, self._m2, m, mean_b, m2_b)
        return self

    @_oom_guarded("merging into")
    def merge(self, other: "CovarianceAccumulator") -> "CovarianceAccumulator":
        """Fold ``other``'s rows into this accumulator (pairwise update); ``other`` is unchanged.

        Returns ``self``. Both must have the same ``dim`` and ``acc_dtype``.
        """
        if not isinstance(other, CovarianceAccumulator):
            raise TypeError(f"can only merge a CovarianceAccumulator, got {type(other).__name__}")
        if other.dim != self.dim or other.acc_dtype != self.acc_dtype:
            raise ValueError(
                f"cannot merge accumulators of dim={other.dim}, acc_dtype={other.acc_dtype} into "
                f"dim={self.dim}, acc_dtype={self.acc_dtype}: both must match")
        if other._n == 0:
            return self
        self._adopt_device(other.device)
        self._n, self._mean, self._m2 = merge_moments(
            self._n, self._mean, self._m2,
            other._n, other._mean.to(self.device), other._m2.to(self.device))
        return self

    def _symmetric_m2(self) -> torch.Tensor:
        """``M2`` as a full symmetric ``(dim, dim)`` matrix built from its upper triangle."""
        upper = self._m2.triu()
        return upper + upper.triu(1).mT

    @_oom_guarded("finalizing")
    def finalize(self) -> CovarianceStats:
        """Return the mean and the covariance (divided by ``n``) of all rows seen so far.

        The accumulator is not modified and can keep accumulating.
        """
        if self._n < 2:
            raise ValueError(f"need at least 2 rows to estimate a covariance, have {self._n}; "
                             f"feed more (unmasked) rows before finalize()")
        return CovarianceStats(n=self._n, mean=self._mean.to(self.acc_dtype, copy=True),
                               cov=self._symmetric_m2().div_(self._n))

    def state_dict(self) -> dict:
        """Plain state: ``{"dim": int, "n": int, "mean": (dim,) float64, "m2": (dim, dim)
        acc_dtype, symmetric}``, copies."""
        return {"dim": self.dim, "n": self._n, "mean": self._mean.clone(),
                "m2": self._symmetric_m2()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state produced by ``state_dict`` of an accumulator with the same ``dim``
        and ``acc_dtype``; tensors are copied to this accumulator's device (adopted from the
        state if none was fixed)."""
        missing = {"dim", "n", "mean", "m2"} - set(state)
        if missing:
            raise ValueError(f"covariance state is missing keys {sorted(missing)}")
        dim, n, mean, m2 = state["dim"], state["n"], state["mean"], state["m2"]
        d = self.dim
        if dim != d or tuple(mean.shape) != (d,) or tuple(m2.shape) != (d, d):
            raise ValueError(
                f"covariance state has dim={dim}, mean {tuple(mean.shape)}, m2 {tuple(m2.shape)}; "
                f"this accumulator has dim={self.dim}: load it into CovarianceAccumulator({dim})")
        if mean.dtype != torch.float64 or m2.dtype != self.acc_dtype:
            raise ValueError(f"covariance state has mean {mean.dtype} / m2 {m2.dtype}; this "
                             f"accumulator expects float64 / acc_dtype={self.acc_dtype}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"covariance state has invalid n={n!r}; expected an int >= 0")
        self._adopt_device(mean.device)
        self._n = n
        self._mean = mean.detach().to(self.device, copy=True)
        self._m2 = m2.detach().to(self.device, copy=True)
