"""Triton kernel of the streaming covariance: shifted Gram matrix and column sums (SYRK).

One launch per batch computes, for rows ``X`` of shape ``(n, d)`` and a shift ``c`` ``(d,)``::

    G = (X - c)^T (X - c)      only the tiles on or above the diagonal (i_tile <= j_tile)
    s = sum over rows of (X - c)

skipping the rows whose mask entry is False (padding tokens), read in the same pass.
``CovarianceAccumulator(backend="triton")`` turns ``(G, s, m)`` into the batch's centred
moments ``M2_b = G - s s^T / m`` and merges them (Chan et al.) like every other backend.

Design
------
* Grid ``(number of upper-triangular tile pairs, split count)``. Program ``p`` of axis 0 is
  the tile pair ``(i, j)``, ``i <= j``, enumerated column by column
  (``p = j (j + 1) / 2 + i``), so programs that run together share the column block ``j``.
* Split-K over rows: split ``k`` reduces rows ``[k R, (k + 1) R)`` only. Each split writes its
  own fp32 partial tile into a workspace ``(S, d, d)`` and the partials are summed with
  ``torch.sum`` afterwards: deterministic (the same bits on every run, unlike fp32
  ``atomic_add``, whose order varies), no precision lost (fp32 partials summed in fp32), and
  cheap because splits are only used where the grid is small (``d`` small against ``n``),
  i.e. where the workspace is small. With one split the kernel writes ``G`` directly.
* Every load is masked: row tail, column tail, and the row mask; the loaded tile is upcast
  to fp32, the shift subtracted in fp32, and masked elements set to exactly 0 (so NaN in a
  padding row never reaches the sums), as in the torch path.
* fp32 input: ``tl.dot(..., input_precision="ieee")`` (never TF32: it destroys the small
  eigenvalues of the MP bulk). fp16 / bf16 input: the centred fp32 tile is rounded back to
  the input dtype and multiplied on the tensor cores (``out_dtype=tl.float32``, fp32
  accumulation). Rounding a centred value ``x - c`` costs a relative error of at most
  ``u`` (2^-11 fp16, 2^-8 bf16) *of the centred value*, i.e. ``u * |x - c| ~ u * std``: less
  than the rounding the input already carries (``u * |x|``) whenever ``|mean| >~ std``.
  The errors are independent and zero-mean, so the relative Frobenius error of ``G`` is about
  ``u * sqrt(d / (n + d))`` (fp16: ~1e-4 and below; bf16: ~1e-3 and below), and the
  eigenvalues of the covariance move by ~``2 u sqrt(d / n)`` relative. The rounding is
  *exact* when the shift is representable in the input dtype and ``x`` lies within a factor
  2 of it (Sterbenz' lemma; rows near a large mean), or when the shift is 0 (then the centred
  value is ``x`` itself): ``CovarianceAccumulator`` chooses its shifts that way (0 for
  columns with ``|mean| < 8 std``, else the mean rounded to the input dtype), so its fp16/bf16
  products carry only fp32 accumulation error, like fp32 rows. The column sums are
  taken over the *same* rounded values that enter the dot, so ``G - s s^T / m`` is exactly
  (up to fp32 accumulation) the scatter matrix of the rounded centred rows: positive
  semi-definite, and any overflow of the rounded values (``|x - c| > 65504`` in fp16) shows
  up in ``s`` for the accumulator's non-finite check.
* fp16/bf16 with a shift exactly representable in the input dtype (``shift_exact``, what
  the accumulator passes): the subtraction runs in the input dtype (one correctly rounded
  operation: the same values as the fp32 subtraction rounded back, for less work per
  element).
* Tensor-core accumulation: with all 65536 rows of a batch in one MMA accumulator, an H100
  gave 1.8-2.9e-4 relative error against the exact product of the same bf16/fp16 operands
  (and bit-identical results to cuBLAS's ``torch.mm(..., out_dtype=torch.float32)``), far
  above fp32 round-to-nearest summation: consistent with the truncating accumulation
  reported for NVIDIA tensor cores, a bias that grows with the number of accumulation
  steps. Each program therefore adds its MMA accumulator to an fp32 tile (ordinary fp32
  adds) every ``FLUSH_ROWS`` = 512 rows; the same test then passes at 2e-5 (H200).
* Diagonal tile programs (``i == j``) load one tile per step (the left operand is its
  transpose) and also accumulate the column sums; off-diagonal programs do only the product.
* Block sizes: on the GPU ``BLOCK_D`` (the square output tile) is 128 for ``d >= 128`` with
  ``BLOCK_K`` rows per step, warps and pipeline stages chosen by a small autotune (keyed on
  ``d``, the dtype and the rows per split); smaller ``d`` use a fixed 32/64 tile. Under the
  interpreter a fixed, small configuration keeps tests fast and deterministic.
* Speed (H200, n = 65536, bf16, see bench/bench_covariance.py and its JSON): 106-203
  TFLOP/s counting ``n d (d + 1)``, 15-29% of the measured bf16 matmul peak and 0.39-0.61x
  the time of a bare ``torch.mm(X.T, X, out_dtype=float32)`` + ``X.sum(0)`` (which neither
  centres nor masks); ~5x faster than the torch backend's TF32-free fp32 GEMM on bf16 rows.
  The per-element centring (load, subtract, select, and a register round trip before the
  MMA) is what keeps it from the cuBLAS rate.

Importing this module imports Triton; ``rmtkd`` imports it lazily, only when the Triton
backend is used. Set ``TRITON_INTERPRET=1`` before the first Triton import to run the kernel
on CPU tensors.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import torch
import triton
import triton.language as tl

__all__ = ["shifted_gram", "choose_config", "choose_split", "best_config", "INTERPRET"]

#: True when Triton runs kernels in its interpreter (TRITON_INTERPRET=1 at import time).
try:
    INTERPRET: bool = bool(triton.knobs.runtime.interpret)
except AttributeError:  # Triton < 3.4 has no knobs
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_LOWP = (torch.float16, torch.bfloat16)
_IN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Split-K: aim at this many programs per streaming multiprocessor, give each split at least
# _MIN_SPLIT_ROWS rows, keep the fp32 partial workspace below _MAX_WORKSPACE_BYTES.
_PROGRAMS_PER_SM = 2
_MIN_SPLIT_ROWS = 1024
_MAX_SPLITS = 64
_MAX_WORKSPACE_BYTES = 1 << 28
_INT32_MAX = 2**31 - 1
# fp16/bf16: rows per tensor-core accumulation chunk (see _accumulate); under the interpreter
# a small value so that tests exercise the flush.
_FLUSH_ROWS = 512
_FLUSH_ROWS_INTERPRET = 64

# Allocation of outputs and workspaces; tests replace it to poison them (fill with NaN).
_empty: Callable[..., torch.Tensor] = torch.empty


@triton.jit
def _accumulate(x_ptr, mask_ptr, acc, s_acc, offs_i, offs_j, sh_i, sh_j, ok_i, ok_j,
                row_lo, row_hi, stride_xn, stride_xd, stride_m,
                HAS_MASK: tl.constexpr, LOWP: tl.constexpr, SHIFT_LP: tl.constexpr,
                DIAG: tl.constexpr, INDEX_64: tl.constexpr, BLOCK_K: tl.constexpr,
                FLUSH_ROWS: tl.constexpr):
    """Add (X_i - c_i)^T (X_j - c_j) over rows [row_lo, row_hi) to acc; if DIAG (i == j),
    also the column sums to s_acc.

    Tensor-core products accumulate into ``part``, which is added to ``acc`` (ordinary fp32
    adds) every FLUSH_ROWS rows: one MMA accumulator over 65536 rows was 2-3e-4 off on an
    H100 (see the module docstring); 512-row chunks keep that bias to the fp32 level.
    """
    offs_k = tl.arange(0, BLOCK_K)
    if INDEX_64:
        col_i = offs_i.to(tl.int64) * stride_xd
        col_j = offs_j.to(tl.int64) * stride_xd
    else:
        col_i = offs_i * stride_xd
        col_j = offs_j * stride_xd
    if SHIFT_LP:  # the shift is exactly representable in the input dtype
        sh_i_lp = sh_i.to(x_ptr.dtype.element_ty)
        sh_j_lp = sh_j.to(x_ptr.dtype.element_ty)
    part = tl.zeros_like(acc)
    n_steps = tl.cdiv(row_hi - row_lo, BLOCK_K)
    for step in range(0, n_steps):
        rows = row_lo + step * BLOCK_K + offs_k
        ok_r = rows < row_hi
        if HAS_MASK:
            keep = tl.load(mask_ptr + rows * stride_m, mask=ok_r, other=0)
            ok_r = ok_r & (keep != 0)
        if INDEX_64:
            row_off = rows.to(tl.int64) * stride_xn
        else:
            row_off = rows * stride_xn
        # Right operand: rows x columns of block j, centred, masked to exact zeros.
        ok_b = ok_r[:, None] & ok_j[None, :]
        b = tl.load(x_ptr + row_off[:, None] + col_j[None, :], mask=ok_b, other=0.0)
        if SHIFT_LP:  # one subtraction in the input dtype, correctly rounded as below
            b = tl.where(ok_b, b - sh_j_lp[None, :], tl.zeros_like(b))
        else:  # fp32 subtraction, then (fp16/bf16) rounded back to the input dtype
            b = tl.where(ok_b, b.to(tl.float32) - sh_j[None, :], 0.0)
            if LOWP:
                b = b.to(x_ptr.dtype.element_ty)
        if DIAG:
            a = tl.trans(b)
            s_acc += tl.sum(b.to(tl.float32), axis=0)
        else:
            # Left operand, loaded transposed: columns of block i x rows.
            ok_a = ok_i[:, None] & ok_r[None, :]
            a = tl.load(x_ptr + col_i[:, None] + row_off[None, :], mask=ok_a, other=0.0)
            if SHIFT_LP:
                a = tl.where(ok_a, a - sh_i_lp[:, None], tl.zeros_like(a))
            else:
                a = tl.where(ok_a, a.to(tl.float32) - sh_i[:, None], 0.0)
                if LOWP:
                    a = a.to(x_ptr.dtype.element_ty)
        if LOWP:
            part = tl.dot(a, b, part, out_dtype=tl.float32)
        else:
            part = tl.dot(a, b, part, input_precision="ieee", out_dtype=tl.float32)
        if FLUSH_ROWS > 0:
            if step % (FLUSH_ROWS // BLOCK_K) == FLUSH_ROWS // BLOCK_K - 1:
                acc += part
                part = tl.zeros_like(part)
    return acc + part, s_acc


@triton.jit(do_not_specialize=["n", "rows_per_split", "tune_key"])
def _shifted_gram_kernel(x_ptr, shift_ptr, mask_ptr, g_ptr, s_ptr,
                         n, d, rows_per_split,
                         stride_xn, stride_xd, stride_m,
                         stride_gs, stride_gi, stride_gj, stride_ss,
                         tune_key,
                         HAS_MASK: tl.constexpr, LOWP: tl.constexpr, SHIFT_LP: tl.constexpr,
                         INDEX_64: tl.constexpr, FLUSH_ROWS: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (p, k): upper tile pair p = j (j + 1) / 2 + i (i <= j), row split k.

    Writes the fp32 tile G[i-block, j-block] of split k to g_ptr + k * stride_gs, and for
    i == j the column sums of block i to s_ptr + k * stride_ss. ``tune_key`` is unused by
    the kernel (the autotune key: a bucket of the rows per split).
    """
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    # Invert p = j (j + 1) / 2 + i: fp32 sqrt, then exact integer corrections (+-1).
    j = ((tl.sqrt(8.0 * pid.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    j = tl.where(j * (j + 1) // 2 > pid, j - 1, j)
    j = tl.where((j + 1) * (j + 2) // 2 <= pid, j + 1, j)
    i = pid - j * (j + 1) // 2

    offs_i = i * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_j = j * BLOCK_D + tl.arange(0, BLOCK_D)
    ok_i = offs_i < d
    ok_j = offs_j < d
    sh_i = tl.load(shift_ptr + offs_i, mask=ok_i, other=0.0)
    sh_j = tl.load(shift_ptr + offs_j, mask=ok_j, other=0.0)
    row_lo = pid_s * rows_per_split
    row_hi = tl.minimum(row_lo + rows_per_split, n)

    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    s_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if i == j:
        acc, s_acc = _accumulate(x_ptr, mask_ptr, acc, s_acc, offs_i, offs_j, sh_i, sh_j,
                                 ok_i, ok_j, row_lo, row_hi, stride_xn, stride_xd, stride_m,
                                 HAS_MASK, LOWP, SHIFT_LP, True, INDEX_64, BLOCK_K,
                                 FLUSH_ROWS)
    else:
        acc, s_acc = _accumulate(x_ptr, mask_ptr, acc, s_acc, offs_i, offs_j, sh_i, sh_j,
                                 ok_i, ok_j, row_lo, row_hi, stride_xn, stride_xd, stride_m,
                                 HAS_MASK, LOWP, SHIFT_LP, False, INDEX_64, BLOCK_K,
                                 FLUSH_ROWS)

    split_g = g_ptr + pid_s.to(tl.int64) * stride_gs
    tl.store(split_g + offs_i[:, None] * stride_gi + offs_j[None, :] * stride_gj, acc,
             mask=ok_i[:, None] & ok_j[None, :])
    split_s = s_ptr + pid_s.to(tl.int64) * stride_ss
    tl.store(split_s + offs_j, s_acc, mask=ok_j & (offs_i == offs_j))  # i == j only


def _gpu_configs(lowp: bool) -> list[triton.Config]:
    if lowp:  # bf16/fp16 tensor-core dot, 128 x 128 output tile
        return [triton.Config({"BLOCK_K": 64}, num_warps=8, num_stages=3),
                triton.Config({"BLOCK_K": 64}, num_warps=8, num_stages=4),
                triton.Config({"BLOCK_K": 32}, num_warps=8, num_stages=4)]
    # fp32 "ieee" dot (FMA units), 128 x 128 output tile
    return [triton.Config({"BLOCK_K": 32}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_K": 16}, num_warps=8, num_stages=3)]


# GPU kernels for d >= 128: autotuned over rows per step, warps and stages (BLOCK_D = 128
# is fixed so that the grid and the split count do not depend on the config).
_TUNED = {lowp: triton.autotune(configs=_gpu_configs(lowp), key=["d", "tune_key"])(
    _shifted_gram_kernel) for lowp in (False, True)}


def choose_config(n: int, d: int, dtype: torch.dtype, device: torch.device,
                  interpret: bool = INTERPRET) -> dict:
    """Block sizes and launch options for an ``(n, d)`` batch.

    Returns ``{"BLOCK_D", "BLOCK_K" (None: autotuned), "num_warps", "num_stages"}``.
    Under the interpreter: small fixed tiles (16 or 32 wide, 32 rows per step), so tests
    are fast and exercise several tiles and tail masks. On the GPU: a 128-wide tile for
    ``d >= 128`` (autotuned ``BLOCK_K``/warps/stages), 32- or 64-wide fixed tiles below.
    """
    if interpret:
        return {"BLOCK_D": 16 if d <= 16 else 32, "BLOCK_K": 32, "num_warps": 4,
                "num_stages": 1}
    lowp = dtype in _LOWP
    if d >= 128:
        return {"BLOCK_D": 128, "BLOCK_K": None, "num_warps": None, "num_stages": None}
    return {"BLOCK_D": 32 if d <= 32 else 64, "BLOCK_K": 64 if lowp else 32, "num_warps": 4,
            "num_stages": 3}


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_split(n: int, d: int, block_d: int, device: torch.device,
                 interpret: bool = INTERPRET) -> int:
    """Number of row splits: enough programs to fill the GPU (``_PROGRAMS_PER_SM`` per SM)
    when the grid of tile pairs is small, each split >= ``_MIN_SPLIT_ROWS`` rows and the
    fp32 partial workspace <= ``_MAX_WORKSPACE_BYTES``. 1 under the interpreter."""
    if interpret or device.type != "cuda":
        return 1
    t = -(-d // block_d)
    pairs = t * (t + 1) // 2
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    want = -(-_PROGRAMS_PER_SM * sms // pairs)
    cap = min(_MAX_SPLITS, max(1, n // _MIN_SPLIT_ROWS),
              max(1, _MAX_WORKSPACE_BYTES // (4 * d * d)))
    return max(1, min(want, cap))


def _max_offset(x: torch.Tensor) -> int:
    n, d = x.shape
    return (n - 1) * abs(x.stride(0)) + (d - 1) * abs(x.stride(1))


def shifted_gram(x: torch.Tensor, shift: torch.Tensor, mask: torch.Tensor | None = None, *,
                 split_k: int | None = None, block_d: int | None = None,
                 block_k: int | None = None, rows_used: int | None = None,
                 shift_exact: bool | None = None, flush_rows: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Shifted Gram matrix (upper tiles) and column sums of the kept rows, in one launch.

    Args:
        x: ``(n, d)`` float32 / float16 / bfloat16, any strides (not copied), on a CUDA
            device, or on CPU under the Triton interpreter.
        shift: ``(d,)`` float32 on ``x``'s device, subtracted from every row (in fp32).
        mask: optional ``(n,)`` bool or uint8 (nonzero = keep the row), any stride.
        split_k: row splits (programs per output tile); ``None`` chooses (``choose_split``).
        block_d, block_k: override the output tile width / rows per step (powers of 2,
            >= 16); ``None`` chooses (``choose_config``). Setting ``block_k`` on the GPU
            skips the autotune.
        rows_used: the number of kept rows if the caller knows it (saves counting the mask,
            a host synchronisation); returned as ``m``.
        shift_exact: fp16/bf16 only: whether every shift value is exactly representable in
            ``x.dtype`` (then the kernel subtracts in that dtype, one correctly rounded
            operation, the same result as the fp32 subtraction rounded back, and cheaper);
            ``None`` checks (a host synchronisation).
        flush_rows: fp16/bf16 only: rows per tensor-core accumulation chunk, after which the
            chunk is added to the fp32 tile (a multiple of the rows per step; ``None``: 512 on
            the GPU, 64 under the interpreter).

    Returns:
        ``(G, s, m)``: ``G`` ``(d, d)`` float32 with ``G[a, b] = sum_r (x_ra - c_a)(x_rb - c_b)``
        over kept rows, valid on and above the diagonal (whole diagonal tiles are written;
        elements in tiles strictly below the diagonal are unspecified); ``s`` ``(d,)``
        float32, the sum of the kept centred rows; ``m`` the number of kept rows (int).
        fp16/bf16 rows enter the product rounded to their dtype after centring (see the
        module docstring for the error this costs).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D (n, d) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype not in _IN_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; the Triton covariance kernel reads float32, "
                        f"float16 or bfloat16 (centre float64 input in torch first)")
    n, d = x.shape
    dev = x.device
    if not isinstance(shift, torch.Tensor) or tuple(shift.shape) != (d,) \
            or shift.dtype != torch.float32 or shift.device != dev:
        raise ValueError(f"shift must be a float32 tensor of shape ({d},) on {dev}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (n,) \
                or mask.dtype not in (torch.bool, torch.uint8) or mask.device != dev:
            raise ValueError(f"mask must be a bool/uint8 tensor of shape ({n},) on {dev}")
    if dev.type != "cuda" and not INTERPRET:
        raise RuntimeError("the Triton covariance kernel needs CUDA tensors; on CPU it runs "
                           "only under the Triton interpreter (TRITON_INTERPRET=1 set before "
                           "Triton is imported)")
    shift = shift.contiguous()
    g = _empty((d, d), dtype=torch.float32, device=dev)
    s = _empty((d,), dtype=torch.float32, device=dev)
    if n == 0 or d == 0:
        return g.zero_(), s.zero_(), 0
    if rows_used is None:
        rows_used = n if mask is None else int(torch.count_nonzero(mask))

    cfg = choose_config(n, d, x.dtype, dev)
    bd = block_d or cfg["BLOCK_D"]
    bk = block_k or cfg["BLOCK_K"]
    for name, v in (("block_d", bd), ("block_k", bk)):
        if v is not None and (v < 16 or v & (v - 1)):
            raise ValueError(f"{name} must be a power of 2 >= 16, got {v}")
    splits = split_k if split_k is not None else choose_split(n, d, bd, dev)
    if splits < 1:
        raise ValueError(f"split_k must be >= 1, got {splits}")
    # Rows per split, a multiple of BLOCK_K (64 if autotuned); recount so none is empty.
    step = bk or 64
    rps = -(-(-(-n // splits)) // step) * step
    splits = -(-n // rps)

    if splits == 1:
        g_ws, s_ws = g.unsqueeze(0), s.unsqueeze(0)
    else:
        g_ws = _empty((splits, d, d), dtype=torch.float32, device=dev)
        s_ws = _empty((splits, d), dtype=torch.float32, device=dev)
    m_arg = mask.view(torch.uint8) if mask is not None and mask.dtype == torch.bool else mask
    t = -(-d // bd)
    grid = (t * (t + 1) // 2, splits)
    args = (x, shift, m_arg if m_arg is not None else x, g_ws, s_ws,
            n, d, rps, x.stride(0), x.stride(1), m_arg.stride(0) if m_arg is not None else 0,
            g_ws.stride(0), g_ws.stride(1), g_ws.stride(2), s_ws.stride(0), rps.bit_length())
    lowp = x.dtype in _LOWP
    if lowp and shift_exact is None:
        shift_exact = bool(torch.equal(shift.to(x.dtype).float(), shift))
    flush = 0
    if lowp:
        flush = flush_rows or (_FLUSH_ROWS_INTERPRET if INTERPRET else _FLUSH_ROWS)
        if flush % (bk or 64):
            raise ValueError(f"flush_rows={flush} must be a multiple of the rows per step "
                             f"({bk or 64})")
    meta = dict(HAS_MASK=m_arg is not None, LOWP=lowp, SHIFT_LP=bool(lowp and shift_exact),
                INDEX_64=_max_offset(x) > _INT32_MAX, FLUSH_ROWS=flush, BLOCK_D=bd)
    if bk is None:  # GPU, d >= 128: autotuned rows per step / warps / stages
        _TUNED[x.dtype in _LOWP][grid](*args, **meta)
    else:
        launch = {} if INTERPRET else {"num_warps": cfg["num_warps"] or 8,
                                       "num_stages": cfg["num_stages"] or 3}
        _shifted_gram_kernel[grid](*args, **meta, BLOCK_K=bk, **launch)
    if splits > 1:
        torch.sum(g_ws, dim=0, out=g)
        torch.sum(s_ws, dim=0, out=s)
    return g, s, rows_used


def best_config(dtype: torch.dtype) -> str | None:
    """The configuration the GPU autotuner picked last for ``dtype`` inputs (for benches)."""
    tuner = _TUNED[dtype in _LOWP]
    cfg = getattr(tuner, "best_config", None)
    return None if cfg is None else str(cfg)

