"""Projected low-rank linear ``y = (x @ V) @ W.T + bias``, the op behind
``rmtkd.nn.ProjectedLinear``.

Shapes: ``x`` (..., d_in), ``V`` (d_in, k), ``W`` (d_out, k), ``bias`` (d_out,) or None;
``y`` (..., d_out) in x's dtype. fp32 / fp16 / bf16 (the torch backend also takes fp64);
products accumulate in fp32 and the intermediate ``t = x @ V`` is rounded to the input dtype,
as two torch matmuls do.

Backends:
- ``torch``: the reference, ``F.linear(x @ V, W, bias)`` (two GEMMs, the bias fused into the
  second), autograd through torch. Runs everywhere.
- ``triton``: a ``torch.autograd.Function`` whose forward is a fused kernel
  (``rmtkd.kernels.projected_linear``: ``t`` stays on chip, bias in the epilogue). Its
  backward uses torch GEMMs on saved tensors: the forward kernel also writes ``t`` (M x k,
  small) so ``grad_W = g^T t`` needs no recomputation of ``x @ V``; ``grad_x = (g @ W) @ V^T``
  is itself a projected linear with the same rows and rank, so it runs the same fused kernel
  (which also writes ``g @ W`` for ``grad_V = x^T (g @ W)``); when x needs no gradient,
  ``g @ W`` is one GEMM; ``grad_b = g.sum(0)`` in fp32. Only the gradients in
  ``needs_input_grad`` are formed. Without autograd (no_grad, or no operand requiring a
  gradient) the kernel runs alone and ``t`` is not written.
  Where the fused kernel does not pay (rank above ``FUSED_MAX_RANK``, or more rows than
  ``FUSED_MAX_TOKENS``), the triton backend runs the same two GEMMs as the torch backend.

- ``cuda``: the C++ extension's ``rmtkd::projected_linear`` (csrc/projected_linear.cu: ``t``
  on chip, rank <= 256; above that, the two GEMMs of the torch backend). Its backward is
  registered with the op (``rmtkd.ops.cuda_ext``): torch GEMMs, ``t = x @ V`` recomputed for
  ``grad_W``.

``auto`` picks ``torch`` (measured faster on the GPU, see the constants below); ``triton``
and ``cuda`` run when asked for by name or through ``RMTKD_BACKEND`` (see
``rmtkd.ops.dispatch``).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .dispatch import always_available, register_backend, resolve_backend, triton_runnable
from .cuda_ext import MAX_RANK as CUDA_MAX_RANK
from .cuda_ext import cuda_runnable

__all__ = ["projected_linear", "projected_linear_triton", "projected_linear_cuda",
           "choose_variant",
           "FUSED_MAX_RANK", "FUSED_MAX_TOKENS", "SPLIT_RANK_MAX_TOKENS"]

# --- dispatch (set from bench/bench_projected_linear.py on the GPU) ------------------------
# Measured on an H200 (bench/results/projected_linear_gpu-vm-20261128T032017Z.json, bf16,
# d_in = d_out = 4096, k = 256): both fused kernels run at 0.03x-0.35x of two cuBLAS matmuls
# at every token count from 1 to 4096, so "auto" never picks the triton backend, and the
# triton backend itself runs the fused kernels only when a variant is forced (tests, bench).
# The fused kernel keeps a (rows x k) tile of t = x @ V on chip; above this rank it does not
# fit and the triton backend runs two GEMMs.
FUSED_MAX_RANK = 256
# Rows (tokens, the product of x's leading dims) above which the triton backend runs two
# GEMMs instead of the fused kernel: the fused kernel recomputes or re-reads t per output
# tile, which could only pay in the small-M (decode) regime; measured: it does not.
FUSED_MAX_TOKENS = 0
# Rows at or below which the fused forward uses the split-rank variant (V spread over the
# whole GPU, fp32 atomics) rather than the output-tile variant.
SPLIT_RANK_MAX_TOKENS = 0

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TORCH_DTYPES = _TRITON_DTYPES + (torch.float64,)


def _triton_available(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    if dtype not in _TRITON_DTYPES:
        return False, f"the Triton kernel takes float32/float16/bfloat16, not {dtype}"
    return triton_runnable(device)


register_backend("projected_linear", "torch", always_available)
register_backend("projected_linear", "triton", _triton_available, auto=False)


def _cuda_available(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    if dtype not in _TRITON_DTYPES:
        return False, f"the CUDA kernel takes float32/float16/bfloat16, not {dtype}"
    return cuda_runnable(device)


# No GPU has measured the CUDA kernel yet (bench/bench_projected_linear.py has the column), so
# "auto" never picks it; it runs when asked for by name.
register_backend("projected_linear", "cuda", _cuda_available, auto=False)

_RESOLVED: dict[tuple, str] = {}


def _resolve(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    # resolve_backend looks up the environment and Triton's presence; cache the answer per
    # (request, environment, device, dtype) so a decode step does not pay for it every call.
    key = (backend, os.environ.get("RMTKD_BACKEND"), os.environ.get("TRITON_INTERPRET"),
           device, dtype)
    be = _RESOLVED.get(key)
    if be is None:
        be = resolve_backend("projected_linear", backend, device, dtype)
        _RESOLVED[key] = be
    return be


def choose_variant(tokens: int, rank: int) -> str:
    """Which path the triton backend takes for ``tokens`` rows at rank ``rank``:
    ``"split_rank"`` or ``"tile"`` (fused kernels) or ``"gemm"`` (two GEMMs)."""
    if rank < 1 or rank > FUSED_MAX_RANK or tokens < 1 or tokens > FUSED_MAX_TOKENS:
        return "gemm"
    return "split_rank" if tokens <= SPLIT_RANK_MAX_TOKENS else "tile"


def _check(x: torch.Tensor, V: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None) -> None:
    if not all(isinstance(a, torch.Tensor) for a in (x, V, W)) or (
            bias is not None and not isinstance(bias, torch.Tensor)):
        raise TypeError("projected_linear: x, V, W (and bias if given) must be tensors")
    if V.dim() != 2:
        raise ValueError(f"projected_linear: V must be 2-D (d_in, k); got shape {tuple(V.shape)}")
    if W.dim() != 2:
        raise ValueError(f"projected_linear: W must be 2-D (d_out, k); got shape {tuple(W.shape)}")
    d_in, k = V.shape
    if W.shape[1] != k:
        raise ValueError(f"projected_linear: W must have {k} columns (the rank of V, "
                         f"{tuple(V.shape)}); got W of shape {tuple(W.shape)}")
    if x.dim() < 1 or x.shape[-1] != d_in:
        raise ValueError(f"projected_linear: x must have shape (..., {d_in}) to match V "
                         f"{tuple(V.shape)}; got {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (W.shape[0],):
        raise ValueError(f"projected_linear: bias must have shape ({W.shape[0]},); got "
                         f"{tuple(bias.shape)}")
    named = [("x", x), ("V", V), ("W", W)] + ([("bias", bias)] if bias is not None else [])
    if any(a.device != x.device for _, a in named):
        where = ", ".join(f"{n} on {a.device}" for n, a in named)
        raise ValueError(f"projected_linear: all tensors must be on one device; got {where}")
    if x.dtype not in _TORCH_DTYPES:
        raise TypeError(f"projected_linear: x must be float32/float16/bfloat16 (or float64 "
                        f"for the torch backend); got {x.dtype}")
    if any(a.dtype != x.dtype for _, a in named):
        what = ", ".join(f"{n} {a.dtype}" for n, a in named)
        raise TypeError(f"projected_linear: x, V, W and bias must share one dtype; got {what}. "
                        f"Cast the module (.to(dtype)) or run under torch.autocast")


def _torch_reference(x: torch.Tensor, V: torch.Tensor, W: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x @ V, W, bias)


def projected_linear(x: torch.Tensor, V: torch.Tensor, W: torch.Tensor,
                     bias: torch.Tensor | None = None, *, backend: str | None = "auto"
                     ) -> torch.Tensor:
    """``y = (x @ V) @ W.T + bias``.

    Args:
        x: (..., d_in) input, float32 / float16 / bfloat16 (float64: torch backend only).
        V: (d_in, k) projection (e.g. orthonormal columns), x's dtype.
        W: (d_out, k) weight in the projected space, x's dtype.
        bias: (d_out,) or None, x's dtype.
        backend: ``"auto"`` (default; ``RMTKD_BACKEND`` if set), ``"torch"``, ``"triton"`` or
            ``"cuda"``.
            An unavailable backend raises; it is never replaced silently.

    Returns:
        (..., d_out) tensor in x's dtype. Under ``torch.autocast`` the operands are cast to
        the autocast dtype first (as ``F.linear`` does).
    """
    _check(x, V, W, bias)
    dev_type = x.device.type
    if _autocast_on(dev_type) and x.dtype != torch.float64:
        dt = (torch.get_autocast_dtype(dev_type) if hasattr(torch, "get_autocast_dtype")
              else torch.get_autocast_gpu_dtype())
        x, V, W = x.to(dt), V.to(dt), W.to(dt)
        bias = bias.to(dt) if bias is not None else None
        with torch.autocast(dev_type, enabled=False):
            return dispatch(x, V, W, bias, backend)
    return dispatch(x, V, W, bias, backend)


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no per-device query
        return device_type == "cuda" and torch.is_autocast_enabled()


def _exporting() -> bool:
    """Under torch.onnx.export (either exporter) or torch.export: the graph takes the torch
    reference (plain matmuls any runtime has), whatever backend the layer asks for."""
    if torch.onnx.is_in_onnx_export():
        return True
    is_exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.5
    return bool(is_exporting and is_exporting())


def dispatch(x, V, W, bias, backend):
    if _exporting():
        return _torch_reference(x, V, W, bias)
    be = _resolve(backend, x.device, x.dtype)
    if be == "torch":
        return _torch_reference(x, V, W, bias)
    if be == "cuda":
        return projected_linear_cuda(x, V, W, bias)
    return projected_linear_triton(x, V, W, bias)


def projected_linear_cuda(x: torch.Tensor, V: torch.Tensor, W: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """The cuda backend (no availability check): the fused CUDA kernel for rank <=
    ``CUDA_MAX_RANK``, else the torch reference; differentiable (backward: torch GEMMs)."""
    if V.shape[1] > CUDA_MAX_RANK:
        return _torch_reference(x, V, W, bias)
    from .cuda_ext import load_extension

    load_extension(with_cuda=True)
    return torch.ops.rmtkd.projected_linear(x, V, W, bias)


def projected_linear_triton(x: torch.Tensor, V: torch.Tensor, W: torch.Tensor,
                            bias: torch.Tensor | None = None, *, variant: str | None = None
                            ) -> torch.Tensor:
    """The triton backend (no availability check): ``variant`` None follows
    :func:`choose_variant`; ``"tile"``/``"split_rank"`` force a fused kernel for the forward
    and the fused part of the backward, ``"gemm"`` forces the two-GEMM path."""
    d_in, k = V.shape
    d_out = W.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in)  # a view where x's strides allow it; never forced contiguous
    m = x2.shape[0]
    if variant is None:
        variant = choose_variant(m, k)
    if variant == "gemm" or m == 0 or k == 0:
        return _torch_reference(x, V, W, bias)
    if torch.is_grad_enabled() and any(a is not None and a.requires_grad
                                       for a in (x2, V, W, bias)):
        y2 = _ProjectedLinearFn.apply(x2, V, W, bias, variant)
    else:  # inference: the kernel alone (no t saved for a backward)
        y2 = _kernels().projected_linear_fwd(x2, V, W, bias, variant=variant)
    return y2.reshape(*lead, d_out)


def _kernels():
    from rmtkd.kernels import projected_linear as kp  # imports Triton: only here, lazily

    return kp


class _ProjectedLinearFn(torch.autograd.Function):
    """Fused forward; backward from torch GEMMs on the saved ``t = x @ V`` (see module doc)."""

    @staticmethod
    def forward(ctx, x2, V, W, bias, variant):  # type: ignore[override]
        need_x, need_v, need_w, need_b = ctx.needs_input_grad[:4]
        kp = _kernels()
        m, k = x2.shape[0], V.shape[1]
        t = kp._empty((m, k), x2.dtype, x2.device) if need_w else None  # t = x @ V, for grad_W
        y = kp.projected_linear_fwd(x2, V, W, bias, t_out=t, variant=variant)
        # keep only what the requested gradients need
        ctx.save_for_backward(x2 if need_v else None, V if need_x else None,
                              W if (need_x or need_v) else None, t)
        ctx.variant = variant
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x2, V, W, t = ctx.saved_tensors
        need_x, need_v, need_w, need_b = ctx.needs_input_grad[:4]
        gx = gV = gW = gb = None
        if need_x or need_v:
            m, k = gy.shape[0], W.shape[1]
            # grad_x = (g @ W) @ V^T is a projected linear of g (same rows and rank as the
            # forward): the same fused kernel, also writing g @ W for grad_V
            if need_x:
                kp = _kernels()
                gt = kp._empty((m, k), gy.dtype, gy.device) if need_v else None
                gx = kp.projected_linear_fwd(gy, W, V, None, t_out=gt, variant=ctx.variant)
            else:
                gt = gy @ W
            if need_v:
                gV = x2.T @ gt
        if need_w:
            gW = gy.T @ t
        if need_b:
            gb = gy.sum(0, dtype=torch.float32).to(gy.dtype)
        return gx, gV, gW, gb, None
