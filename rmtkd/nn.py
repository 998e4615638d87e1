"""Modules built on rmtkd's ops.

``ProjectedLinear``: a linear layer that first projects its input onto ``rank`` directions,
``y = (x V) W^T + b``; the ``project`` reduction mode replaces a consumer ``nn.Linear`` with
it (``ProjectedLinear.from_linear(linear, U)``, U the spike directions of the input).
"""
from __future__ import annotations

import torch
from torch import nn

from .hf.modeling_rmtkd import ProjectedLinear as _PlainProjectedLinear
from .ops.dispatch import _REGISTRY, BACKENDS
from .ops.projected_linear import projected_linear

__all__ = ["ProjectedLinear"]


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"ProjectedLinear: {name} must be a positive int; got {value!r}")
    return value


def _check_backend(backend: str | None) -> str:
    name = "auto" if backend is None else str(backend).strip().lower()
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"ProjectedLinear: unknown backend {backend!r}; expected 'auto' or one "
                         f"of {BACKENDS}")
    have = sorted(_REGISTRY.get("projected_linear", {}))
    if name != "auto" and name not in have:
        raise RuntimeError(f"ProjectedLinear: backend {name!r} is not implemented for "
                           f"projected_linear (implemented: {', '.join(have)}); use 'auto' "
                           f"or one of those")
    return name


class ProjectedLinear(_PlainProjectedLinear):
    """``y = (x @ V) @ W.T + bias``: a rank-``rank`` linear map through the columns of ``V``.

    The parameters, their initialisation and the state dict are those of the plain-torch
    :class:`rmtkd.hf.modeling_rmtkd.ProjectedLinear` (which a saved Hugging Face model
    uses without rmtkd); this class adds the argument checks and the kernel dispatch.

    Args:
        in_features: d_in, the size of the last dim of the input.
        out_features: d_out, the size of the last dim of the output.
        rank: k, the number of projection directions, ``1 <= rank <= in_features``.
        bias: learn an additive bias of shape (out_features,).
        backend: ``"auto"`` (torch on every device: the fused kernels run only when asked
            for; ``RMTKD_BACKEND`` overrides),
            ``"torch"`` or ``"triton"`` (on CPU only under ``TRITON_INTERPRET=1``). Checked when
            the layer runs, so a layer built on CPU may be moved to the GPU first.
        device, dtype: of the parameters.

    Parameters:
        V: (in_features, rank), initialised with orthonormal columns.
        W: (out_features, rank), initialised like ``nn.Linear``'s weight with fan-in ``rank``.
        bias: (out_features,) or None, uniform in +-1/sqrt(rank).

    Input (..., in_features) in the parameters' dtype; output (..., out_features).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
                 backend: str | None = "auto", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        _positive_int("in_features", in_features)
        _positive_int("out_features", out_features)
        _positive_int("rank", rank)
        if rank > in_features:
            raise ValueError(f"ProjectedLinear: rank must be <= in_features (V has orthonormal "
                             f"columns); got rank={rank}, in_features={in_features}")
        backend = _check_backend(backend)
        super().__init__(in_features, out_features, rank, bias, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"ProjectedLinear: expected input of shape (..., {self.in_features})"
                             f"; got {tuple(x.shape)}")
        return projected_linear(x, self.V, self.W, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}, backend={self.backend!r}")

    def freeze_basis(self) -> "ProjectedLinear":
        """Stop training the projection ``V`` (only ``W`` and ``bias`` learn); returns self."""
        self.V.requires_grad_(False)
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, basis: torch.Tensor, *,
                    backend: str | None = "auto", atol: float | None = None
                    ) -> "ProjectedLinear":
        """The layer ``x -> linear(x @ basis @ basis.T)`` as a ProjectedLinear.

        Args:
            linear: an ``nn.Linear`` (in_features -> out_features).
            basis: (in_features, rank) with orthonormal columns, e.g. the spike directions
                of the layer's input. Checked: ``|basis^T basis - I|_max <= atol`` (default
                1e-5 for fp32/fp64 bases, 2e-2 for fp16/bf16).
            backend: as in the constructor.

        Returns:
            A ProjectedLinear with ``V = basis``, ``W = linear.weight @ basis`` (computed in at
            least fp32) and ``bias = linear.bias``, in the linear layer's dtype and device.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"ProjectedLinear.from_linear: expected an nn.Linear; got "
                            f"{type(linear).__name__}")
        if not isinstance(basis, torch.Tensor) or not basis.is_floating_point():
            raise TypeError("ProjectedLinear.from_linear: basis must be a floating-point tensor")
        d_in = linear.in_features
        if basis.dim() != 2 or basis.shape[0] != d_in or basis.shape[1] < 1:
            raise ValueError(f"ProjectedLinear.from_linear: basis must have shape "
                             f"({d_in}, rank) with 1 <= rank <= {d_in} for this layer "
                             f"(in_features={d_in}); got {tuple(basis.shape)}")
        rank = basis.shape[1]
        if rank > d_in:
            raise ValueError(f"ProjectedLinear.from_linear: rank {rank} exceeds in_features "
                             f"{d_in}; a basis of orthonormal columns has at most {d_in}")
        b64 = basis.detach().to(torch.float64)
        if not torch.isfinite(b64).all():
            raise ValueError("ProjectedLinear.from_linear: basis holds NaN or Inf values")
        if atol is None:
            atol = 2e-2 if basis.dtype in (torch.float16, torch.bfloat16) else 1e-5
        dev = (b64.T @ b64 - torch.eye(rank, dtype=torch.float64, device=b64.device)).abs().max()
        if dev.item() > atol:
            raise ValueError(f"ProjectedLinear.from_linear: basis columns are not orthonormal "
                             f"(max |basis^T basis - I| = {dev.item():.3g} > {atol:g}); "
                             f"orthonormalise it first, e.g. torch.linalg.qr(basis).Q")
        weight = linear.weight.detach()
        wdt, wdev = weight.dtype, weight.device
        calc = torch.promote_types(wdt, torch.float32)
        U = basis.detach().to(device=wdev, dtype=calc)
        layer = cls(d_in, linear.out_features, rank, bias=linear.bias is not None,
                    backend=backend, device=wdev, dtype=wdt)
        with torch.no_grad():
            layer.V.copy_(U)
            layer.W.copy_(weight.to(calc) @ U)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer
