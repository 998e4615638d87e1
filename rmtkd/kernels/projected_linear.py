"""Triton kernels for the projected low-rank linear ``y = (x V) W^T + b``.

Shapes: ``x`` (M, d_in), ``V`` (d_in, k), ``W`` (d_out, k), ``b`` (d_out,), ``y`` (M, d_out),
any strides (nothing is made contiguous here). fp32 / fp16 / bf16; every ``tl.dot``
accumulates in fp32 (``out_dtype=tl.float32``) and fp32 operands use
``input_precision="ieee"`` (never TF32). The intermediate ``t = x V`` (M, k) is computed in an
fp32 accumulator on chip and rounded to the input dtype before the second product, which is
what the torch reference ``(x @ V) @ W.T`` does.

Two fused forward variants, one launch each (``split_rank`` adds a zero-fill and, for
fp16/bf16 outputs, a cast):

``tile`` (``_pl_tile_kernel``): each program owns a BLOCK_M x BLOCK_N tile of ``y``. It forms
    ``t = x_tile @ V`` (BLOCK_M x K_PAD fp32 registers, K_PAD = next power of two >= max(16,
    k), looping over d_in in BLOCK_K chunks), casts it, and finishes with
    ``y_tile = t @ W_tile^T + b`` in the epilogue. Programs along N recompute ``t``: redundant
    FLOPs, and every program reads all of ``V`` (d_in x k) from L2. At d_in = 4096, k = 256,
    bf16 that is 2 MiB per program, which bounds one program to roughly 2 MiB / (per-SM L2
    bandwidth) -- the bench decides where this variant wins.

``split_rank`` (``_pl_split_rank_kernel``): the grid also splits the rank. Program
    (m, r, g) forms ``t_r = x_tile @ V[:, r-chunk]`` (BLOCK_M x BLOCK_R fp32 on chip) and then,
    for the d_out tiles of its group g, adds ``t_r @ W[n-tile, r-chunk]^T`` (+ b for r = 0) into
    an fp32 output with relaxed atomics. Each program reads only a d_in x BLOCK_R slab of V
    (V is re-read once per group, not once per output tile), so the decode regime (M of 1-16
    tokens) spreads V's bytes over the whole GPU. Cost: M * d_out * ceil(k / BLOCK_R) atomic
    adds, and the fp32 summation order over rank chunks is not deterministic.

Both can also write ``t`` (rounded to the input dtype) to ``t_out`` (only the programs with
n-index / group 0 store it), which the autograd backward uses for ``grad_W = g^T t``.

Specialisation: d_in, d_out and k are specialised by Triton as usual (divisibility by 16),
because the masks along the contiguous dims must be provably constant over 16 elements for
the loads to be vectorised and pipelined (cp.async); the row count M is not (it changes
every call in decoding, and its mask runs along rows).

Importing this module imports Triton; ``rmtkd`` imports it lazily, only when the ``triton``
backend runs. On a machine without a GPU set ``TRITON_INTERPRET=1`` before Triton is imported
and pass CPU tensors.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import torch
import triton
import triton.language as tl
try:  # launch-time resource errors (names vary across Triton versions)
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover
    from triton.runtime.autotuner import OutOfResources
try:
    from triton.runtime.errors import PTXASError
except ImportError:  # pragma: no cover - older Triton
    class PTXASError(Exception):  # type: ignore[no-redef]
        pass

__all__ = ["projected_linear_fwd", "pick_config", "tiles_per_group", "describe", "VARIANTS"]


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every uninitialised buffer comes from here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)

VARIANTS = ("tile", "split_rank")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MIN_DOT = 16  # tl.dot needs every dimension >= 16 on the GPU (the interpreter accepts less)


@triton.jit
def _x_times_v(x_ptr, v_ptr, rows, mask_m, offs_r, mask_r, D_IN, stride_xm, stride_xk,
               stride_vk, stride_vr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """t = x[rows] @ V[:, offs_r] (BLOCK_M x BLOCK_R), fp32 accumulator on chip, rounded to
    the input dtype as the torch reference rounds x @ V."""
    offs_kb = tl.arange(0, BLOCK_K)
    acc_t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        offs_k = k0 + offs_kb
        mask_k = offs_k < D_IN
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        vt = tl.load(v_ptr + offs_k[:, None].to(tl.int64) * stride_vk + offs_r[None, :] * stride_vr,
                     mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if IEEE:  # fp32 operands: full-precision products, never TF32
            acc_t = tl.dot(xt, vt, acc_t, input_precision="ieee", out_dtype=tl.float32)
        else:
            acc_t = tl.dot(xt, vt, acc_t, out_dtype=tl.float32)
    return acc_t.to(x_ptr.dtype.element_ty)


@triton.jit(do_not_specialize=["M"])
def _pl_tile_kernel(
    x_ptr, v_ptr, w_ptr, b_ptr, y_ptr, t_ptr,
    M, D_IN, D_OUT, RANK,
    stride_xm, stride_xk, stride_vk, stride_vr, stride_wn, stride_wr, stride_b,
    stride_ym, stride_yn, stride_tm, stride_tr,
    HAS_BIAS: tl.constexpr, STORE_T: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_PAD: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)
    mask_m = offs_m < M
    offs_r = tl.arange(0, K_PAD)
    mask_r = offs_r < RANK

    # t = x_tile @ V, kept on chip (BLOCK_M x K_PAD)
    t = _x_times_v(x_ptr, v_ptr, rows, mask_m, offs_r, mask_r, D_IN, stride_xm, stride_xk,
                   stride_vk, stride_vr, IEEE, BLOCK_M, BLOCK_K, K_PAD)
    if STORE_T:
        if pid_n == 0:  # one program per row block writes t
            tl.store(t_ptr + rows[:, None] * stride_tm + offs_r[None, :] * stride_tr, t,
                     mask=mask_m[:, None] & mask_r[None, :])

    # epilogue: y_tile = t @ W_tile^T + b
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < D_OUT
    wt = tl.load(w_ptr + offs_r[:, None] * stride_wr + offs_n[None, :].to(tl.int64) * stride_wn,
                 mask=mask_r[:, None] & mask_n[None, :], other=0.0)  # (K_PAD, BLOCK_N)
    if IEEE:
        y = tl.dot(t, wt, input_precision="ieee", out_dtype=tl.float32)
    else:
        y = tl.dot(t, wt, out_dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n * stride_b, mask=mask_n, other=0.0).to(tl.float32)
        y += bias[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["M", "TILES_PER_GROUP"])
def _pl_split_rank_kernel(
    x_ptr, v_ptr, w_ptr, b_ptr, acc_ptr, t_ptr,
    M, D_IN, D_OUT, RANK, TILES_PER_GROUP,
    stride_xm, stride_xk, stride_vk, stride_vr, stride_wn, stride_wr, stride_b,
    stride_am, stride_an, stride_tm, stride_tr,
    HAS_BIAS: tl.constexpr, STORE_T: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_g = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)
    mask_m = offs_m < M
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < RANK

    # t_r = x_tile @ V[:, r-chunk], kept on chip (BLOCK_M x BLOCK_R)
    t = _x_times_v(x_ptr, v_ptr, rows, mask_m, offs_r, mask_r, D_IN, stride_xm, stride_xk,
                   stride_vk, stride_vr, IEEE, BLOCK_M, BLOCK_K, BLOCK_R)
    if STORE_T:
        if pid_g == 0:  # one program per (row block, rank chunk) writes its part of t
            tl.store(t_ptr + rows[:, None] * stride_tm + offs_r[None, :] * stride_tr, t,
                     mask=mask_m[:, None] & mask_r[None, :])

    # y[:, group's tiles] += t_r @ W[n-tile, r-chunk]^T (+ b from the r = 0 programs)
    n_begin = pid_g * TILES_PER_GROUP * BLOCK_N
    for j in range(0, TILES_PER_GROUP):
        offs_n = n_begin + j * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < D_OUT
        wt = tl.load(w_ptr + offs_r[:, None] * stride_wr + offs_n[None, :].to(tl.int64) * stride_wn,
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0)  # (BLOCK_R, BLOCK_N)
        if IEEE:
            part = tl.dot(t, wt, input_precision="ieee", out_dtype=tl.float32)
        else:
            part = tl.dot(t, wt, out_dtype=tl.float32)
        if HAS_BIAS:  # added once, by the programs of rank chunk 0
            first = (offs_n * 0 + pid_r) == 0
            bias = tl.load(b_ptr + offs_n * stride_b, mask=mask_n & first, other=0.0)
            part += bias.to(tl.float32)[None, :]
        tl.atomic_add(acc_ptr + rows[:, None] * stride_am + offs_n[None, :] * stride_an, part,
                      mask=mask_m[:, None] & mask_n[None, :], sem="relaxed")


# ----------------------------------------------------------------------------------------
# configuration

def _on_gpu(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"


@functools.lru_cache(maxsize=None)
def _device_limits(device: torch.device) -> tuple[int, int]:
    """(streaming multiprocessors, shared memory bytes per block) of ``device``.

    Off the GPU (interpreter) a small pretend SM count keeps several rank chunks and groups
    in play so that the tests exercise the same grid logic as the GPU."""
    if not _on_gpu(device):
        return 8, 1 << 20
    idx = device.index if device.index is not None else torch.cuda.current_device()
    sms = torch.cuda.get_device_properties(idx).multi_processor_count
    try:
        smem = int(triton.runtime.driver.active.utils.get_device_properties(idx)["max_shared_mem"])
    except Exception:  # pragma: no cover - older drivers: assume an A100-class limit
        smem = 160 * 1024
    return sms, smem


def _block_m(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


def _smem_tile(c: dict[str, int], es: int) -> int:
    """A pessimistic shared-memory estimate (bytes) for ``_pl_tile_kernel``."""
    bm, bn, bk, kp, st = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["K_PAD"], c["num_stages"]
    return (st * (bm * bk + bk * kp) * es + kp * bn * es + bm * kp * es + bm * bn * 4)


def _smem_split(c: dict[str, int], es: int) -> int:
    bm, bn, bk, br, st = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["BLOCK_R"], c["num_stages"]
    return st * (bm * bk + bk * br) * es + br * bn * es + bm * br * es + bm * bn * 4


def pick_config(variant: str, m: int, d_in: int, d_out: int, rank: int, dtype: torch.dtype,
                device: torch.device) -> dict[str, int]:
    """Heuristic launch configuration (block sizes, warps, stages, groups) for one call
    (a fresh dict; cached per shape)."""
    return dict(_pick_config(variant, m, d_in, d_out, rank, dtype, device,
                             os.environ.get("TRITON_INTERPRET")))


@functools.lru_cache(maxsize=4096)
def _pick_config(variant: str, m: int, d_in: int, d_out: int, rank: int, dtype: torch.dtype,
                 device: torch.device, _interp: str | None) -> dict[str, int]:
    es = torch.empty((), dtype=dtype).element_size()
    sms, smem = _device_limits(device)
    budget = smem - 8 * 1024
    bm = _block_m(m)
    if variant == "tile":
        kp = max(_MIN_DOT, triton.next_power_of_2(rank))
        c = {"BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_K": 64 if es == 2 else 32, "K_PAD": kp,
             "num_warps": 4 if bm * kp <= 32 * 256 else 8, "num_stages": 3}
        if not _on_gpu(device):  # interpreter: small blocks so loops and tails are exercised
            c.update(BLOCK_N=32, BLOCK_K=32)
        # shrink until the estimate fits: stages, then BLOCK_K, then BLOCK_N
        while _smem_tile(c, es) > budget:
            if c["num_stages"] > 2:
                c["num_stages"] -= 1
            elif c["BLOCK_K"] > _MIN_DOT:
                c["BLOCK_K"] //= 2
            elif c["BLOCK_N"] > _MIN_DOT:
                c["BLOCK_N"] //= 2
            elif c["num_stages"] > 1:
                c["num_stages"] -= 1
            else:
                break
        return c
    if variant == "split_rank":
        br = 16 if m <= 16 else 32
        br = min(br, max(_MIN_DOT, triton.next_power_of_2(rank)))
        c = {"BLOCK_M": bm, "BLOCK_N": 128, "BLOCK_K": 256 if es == 2 else 128, "BLOCK_R": br,
             "num_warps": 4, "num_stages": 4 if bm <= 16 else 3}
        if not _on_gpu(device):  # interpreter: small blocks so loops and tails are exercised
            c.update(BLOCK_N=32, BLOCK_K=32)
        while _smem_split(c, es) > budget and c["BLOCK_K"] > _MIN_DOT:
            c["BLOCK_K"] //= 2
        c["TILES_PER_GROUP"] = tiles_per_group(m, d_out, rank, c, sms)
        return c
    raise ValueError(f"unknown fused variant {variant!r}; expected one of {VARIANTS}")


def tiles_per_group(m: int, d_out: int, rank: int, c: dict[str, int], sms: int) -> int:
    """``split_rank``: how many BLOCK_N output tiles each program covers. The grid has
    (row blocks) x (rank chunks) x (groups) programs; groups are chosen so that the grid is
    about one wave (``sms`` programs): more groups re-read V more often, fewer leave SMs idle."""
    m_tiles = triton.cdiv(m, c["BLOCK_M"])
    r_chunks = triton.cdiv(rank, c["BLOCK_R"])
    n_tiles = triton.cdiv(d_out, c["BLOCK_N"])
    groups = max(1, min(n_tiles, triton.cdiv(sms, m_tiles * r_chunks)))
    return triton.cdiv(n_tiles, groups)


def _shrink(variant: str, c: dict[str, int]) -> dict[str, int] | None:
    """A smaller configuration after an out-of-resources failure, or None if none is left."""
    c = dict(c)
    if c["num_stages"] > 1:
        c["num_stages"] -= 1
    elif c["BLOCK_K"] > _MIN_DOT:
        c["BLOCK_K"] //= 2
    elif c["BLOCK_N"] > _MIN_DOT:
        c["BLOCK_N"] //= 2
        if c.get("TILES_PER_GROUP"):
            c["TILES_PER_GROUP"] *= 2
    else:
        return None
    return c


_WORKING: dict[tuple, dict[str, int]] = {}  # configs that needed shrinking, by call key


# ----------------------------------------------------------------------------------------
# launcher

def projected_linear_fwd(x: torch.Tensor, V: torch.Tensor, W: torch.Tensor,
                         bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                         t_out: torch.Tensor | None = None, variant: str = "tile",
                         config: dict[str, int] | None = None) -> torch.Tensor:
    """Fused ``y = (x @ V) @ W.T + bias`` for 2-D ``x``; returns ``y`` (M, d_out), x's dtype.

    Args:
        x: (M, d_in), V: (d_in, k), W: (d_out, k), bias: (d_out,) or None; one dtype among
            fp32 / fp16 / bf16, one device, any strides. k <= 256 is what the kernels are
            sized for (larger k works for ``split_rank`` but is dispatched to two GEMMs).
        out: optional preallocated (M, d_out) output in x's dtype (any strides); fully
            overwritten (``split_rank`` zero-fills it first when it is fp32).
        t_out: optional (M, k) tensor in x's dtype that receives ``t = x @ V`` (rounded to the
            input dtype), for the backward pass.
        variant: ``"tile"`` or ``"split_rank"`` (see the module docstring).
        config: override of :func:`pick_config`'s launch parameters (tuning, tests).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown fused variant {variant!r}; expected one of {VARIANTS}")
    if x.dim() != 2 or V.dim() != 2 or W.dim() != 2:
        raise ValueError(f"expected 2-D x, V, W; got {tuple(x.shape)}, {tuple(V.shape)}, "
                         f"{tuple(W.shape)}")
    m, d_in = x.shape
    rank = V.shape[1]
    d_out = W.shape[0]
    if V.shape[0] != d_in or W.shape[1] != rank:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, V {tuple(V.shape)} (expected "
                         f"({d_in}, k)), W {tuple(W.shape)} (expected (d_out, {rank}))")
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({d_out},)")
    tensors = [x, V, W] + ([bias] if bias is not None else [])
    if x.dtype not in _DTYPES or any(a.dtype != x.dtype for a in tensors):
        raise TypeError(f"x, V, W and bias must share one dtype among {_DTYPES}; got "
                        f"{[a.dtype for a in tensors]}")
    if any(a.device != x.device for a in tensors):
        raise ValueError(f"x, V, W and bias must be on one device; got "
                         f"{[str(a.device) for a in tensors]}")
    if out is None:
        out = _empty((m, d_out), x.dtype, x.device)
    elif tuple(out.shape) != (m, d_out) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out must be ({m}, {d_out}) {x.dtype} on {x.device}; got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if t_out is not None and (tuple(t_out.shape) != (m, rank) or t_out.dtype != x.dtype
                              or t_out.device != x.device):
        raise ValueError(f"t_out must be ({m}, {rank}) {x.dtype} on {x.device}; got "
                         f"{tuple(t_out.shape)} {t_out.dtype} on {t_out.device}")
    if m == 0 or d_out == 0:
        return out
    if rank == 0 or d_in == 0:  # nothing to multiply: y = bias
        out.copy_(bias.expand(m, d_out) if bias is not None else torch.zeros_like(out))
        if t_out is not None:
            t_out.zero_()
        return out

    key = (variant, m, d_in, d_out, rank, x.dtype, x.device)
    c = config if config is not None else (
        _WORKING.get(key) or _pick_config(variant, m, d_in, d_out, rank, x.dtype, x.device,
                                          os.environ.get("TRITON_INTERPRET")))
    while True:
        try:
            _launch(variant, c, x, V, W, bias, out, t_out)
            break
        except (OutOfResources, PTXASError) as err:  # pragma: no cover - GPU only
            smaller = _shrink(variant, c) if config is None else None
            if smaller is None:
                raise RuntimeError(f"projected_linear {variant} kernel does not fit this GPU "
                                   f"even at config {c}: {err}") from err
            c = smaller
            _WORKING[key] = c
    return out


def _check_dot_dims(*dims: int) -> None:
    # The interpreter accepts any dot shape; the GPU compiler needs >= 16. Fail the same way
    # in both so the CPU tests catch a config the GPU would reject.
    if min(dims) < _MIN_DOT:
        raise ValueError(f"tl.dot block sizes must be >= {_MIN_DOT}; got {dims}")


def _launch(variant: str, c: dict[str, int], x, V, W, bias, out, t_out) -> None:
    m, d_in = x.shape
    rank = V.shape[1]
    d_out = W.shape[0]
    has_bias = bias is not None
    store_t = t_out is not None
    ieee = x.dtype == torch.float32
    b_arg = bias if has_bias else x
    b_stride = bias.stride(0) if has_bias else 0
    t_arg = t_out if store_t else x
    t_strides = (t_out.stride(0), t_out.stride(1)) if store_t else (0, 0)
    common = (x.stride(0), x.stride(1), V.stride(0), V.stride(1), W.stride(0), W.stride(1),
              b_stride)
    if variant == "tile":
        _check_dot_dims(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["K_PAD"])
        if c["K_PAD"] < rank:
            raise ValueError(f"K_PAD={c['K_PAD']} is smaller than the rank {rank}")
        grid = (triton.cdiv(m, c["BLOCK_M"]), triton.cdiv(d_out, c["BLOCK_N"]))
        _pl_tile_kernel[grid](
            x, V, W, b_arg, out, t_arg, m, d_in, d_out, rank,
            *common, out.stride(0), out.stride(1), *t_strides,
            HAS_BIAS=has_bias, STORE_T=store_t, IEEE=ieee,
            BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], K_PAD=c["K_PAD"],
            num_warps=c["num_warps"], num_stages=c["num_stages"])
        return
    _check_dot_dims(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["BLOCK_R"])
    # fp32 output: accumulate straight into it; fp16/bf16: into an fp32 buffer, cast once.
    acc = out if out.dtype == torch.float32 else _empty((m, d_out), torch.float32, x.device)
    acc.zero_()
    tpg = c.get("TILES_PER_GROUP") or tiles_per_group(m, d_out, rank, c,
                                                       _device_limits(x.device)[0])
    n_tiles = triton.cdiv(d_out, c["BLOCK_N"])
    grid = (triton.cdiv(m, c["BLOCK_M"]), triton.cdiv(rank, c["BLOCK_R"]),
            triton.cdiv(n_tiles, tpg))
    _pl_split_rank_kernel[grid](
        x, V, W, b_arg, acc, t_arg, m, d_in, d_out, rank, tpg,
        *common, acc.stride(0), acc.stride(1), *t_strides,
        HAS_BIAS=has_bias, STORE_T=store_t, IEEE=ieee,
        BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], BLOCK_R=c["BLOCK_R"],
        num_warps=c["num_warps"], num_stages=c["num_stages"])
    if acc is not out:
        out.copy_(acc)


def describe(variant: str, m: int, d_in: int, d_out: int, rank: int, dtype: torch.dtype,
             device: torch.device) -> dict[str, Any]:
    """The configuration and grid a call would use (for the bench's JSON)."""
    c = pick_config(variant, m, d_in, d_out, rank, dtype, device)
    if variant == "tile":
        grid = (triton.cdiv(m, c["BLOCK_M"]), triton.cdiv(d_out, c["BLOCK_N"]))
    else:
        n_tiles = triton.cdiv(d_out, c["BLOCK_N"])
        grid = (triton.cdiv(m, c["BLOCK_M"]), triton.cdiv(rank, c["BLOCK_R"]),
                triton.cdiv(n_tiles, c["TILES_PER_GROUP"]))
    return {"variant": variant, "config": c, "grid": grid}
