"""Reduction records and the helpers shared by the MLP and CNN surgery.

A :class:`Reduction` says how to shrink one site (the input of a consumer module): keep the
``k`` spike directions ``basis`` (d x k, orthonormal columns) of its activations, whose mean
is ``mean`` (d,). :func:`rmtkd.reduce.reduce_site` applies it and returns a
:class:`ReductionResult`.

Both modes rely on the affine model ``x ~= mean + U U^T (x - mean)`` of the site's
activation ``x``; a consumer with weight ``W`` then sees ``W U (U^T x) + W r`` with the
residual mean ``r = (I - U U^T) mean``, which goes into its bias.

Width mode through an elementwise nonlinearity (ReLU, GELU, BatchNorm + ReLU ...) cannot
rotate: ``relu(U^T z) != U^T relu(z)``. There it *selects* k of the producer's units
instead (:func:`select_units`): the k units that best span the spike subspace (pivoted
Gram-Schmidt on the rows of U), kept unchanged, so the nonlinearity commutes exactly; the
other units are predicted linearly from them, ``x ~= mean + R (x_S - mean_S)`` with the
least-squares ``R = C[:, S] C[S, S]^-1`` from the site covariance C. The consumer then
gets ``W R`` and ``b + W (mean - R mean_S)``. :func:`width_maps` gives either map.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

MODES = ("width", "project")
# How width mode maps the site: "select" units (through a nonlinearity), "rotate" onto U
# (exact where the producer -> consumer chain is linear), or "auto" (select exactly when
# an elementwise nonlinearity sits between producer and consumer).
SURGERIES = ("auto", "select", "rotate")

SUPPORTED = (
    "mode='project': consumer nn.Linear (-> rmtkd.nn.ProjectedLinear) or nn.Conv2d with "
    "groups=1 (-> nn.Sequential(1x1 projection conv, resized conv)); "
    "mode='width': nn.Linear -> [elementwise activation / Dropout]* -> nn.Linear inside "
    "(nested) nn.Sequential containers or a block holding them as attributes, and "
    "nn.Conv2d -> [nn.BatchNorm2d] -> [elementwise activation]* -> nn.Conv2d (groups=1) "
    "as in ResNet basic and bottleneck blocks; "
    "transformer blocks of the families in rmtkd.adapters (BERT, Llama, Qwen2, Mistral): "
    "the MLP inner width and the value width per key-value head (width mode), any "
    "projection's input (project mode); embeddings, query, key, pooler and head are left "
    "alone")

# Elementwise (shape-agnostic) modules that may sit between producer and consumer.
ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.GELU, nn.SiLU, nn.Mish,
               nn.Tanh, nn.Sigmoid, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Hardswish,
               nn.Hardsigmoid, nn.Hardtanh)
PASSTHROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
# Normalisations over all features: width mode cannot cut through them.
FEATURE_NORMS = tuple(t for t in (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None))
                      if t is not None)


class UnsupportedModuleError(ValueError):
    """The site's consumer (or the modules around it) is not a supported reduction pattern."""


@dataclass
class Reduction:
    """One site's reduction.

    Attributes:
        site: the :class:`rmtkd.capture.Site` name, e.g. ``"net.fc2:input"``.
        module_name: the consumer module's name in ``model.named_modules()`` (the site is
            its input).
        mode: ``"width"`` (cut the producer's outputs and the consumer's inputs to k) or
            ``"project"`` (replace the consumer by a rank-k projection of its input).
        d: features at the site (Linear ``in_features``, Conv2d ``in_channels``).
        k: directions kept, ``1 <= k <= d``.
        basis: (d, k) float tensor with orthonormal columns (the spike directions).
        mean: (d,) activation mean at the site (per channel for convolutions), or None for
            no bias correction; a residual-stream reduction may carry one mean per state,
            (states, d) (:func:`rmtkd.reduce.stream.state_means`).
        units: (k,) int64 producer units kept by a selecting width reduction, or None
            (rotate onto ``basis``); see :func:`select_units`.
        reconstruction: (d, k) float ``R`` predicting the site from the kept units
            (``x ~= mean + R (x_S - mean_S)``); required with ``units``.
        surgery: one of SURGERIES; "select"/"auto" take effect only with ``units``.
        maps: (2, d, k) float, a head width cut's block-diagonal query and key maps
            (:mod:`rmtkd.reduce.attention`), else None.
    """

    site: str
    module_name: str
    mode: str
    d: int
    k: int
    basis: torch.Tensor
    mean: torch.Tensor | None = None
    units: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    surgery: str = "auto"
    maps: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Reduction {self.site!r}: mode must be one of {MODES}; "
                             f"got {self.mode!r}")
        if not 1 <= self.k <= self.d:
            raise ValueError(f"Reduction {self.site!r}: need 1 <= k <= d; got k={self.k}, "
                             f"d={self.d}")
        if tuple(self.basis.shape) != (self.d, self.k):
            raise ValueError(f"Reduction {self.site!r}: basis must have shape (d, k) = "
                             f"({self.d}, {self.k}); got {tuple(self.basis.shape)}")
        if self.mean is not None and (tuple(self.mean.shape) != (self.d,) and not (
                self.mean.dim() == 2 and self.mean.shape[1] == self.d)):
            raise ValueError(f"Reduction {self.site!r}: mean must have shape ({self.d},) "
                             f"(or (states, {self.d}) for a residual stream); got "
                             f"{tuple(self.mean.shape)}")
        if self.surgery not in SURGERIES:
            raise ValueError(f"Reduction {self.site!r}: surgery must be one of {SURGERIES}; "
                             f"got {self.surgery!r}")
        if self.maps is not None and tuple(self.maps.shape) != (2, self.d, self.k):
            raise ValueError(f"Reduction {self.site!r}: maps must have shape (2, d, k) = "
                             f"(2, {self.d}, {self.k}); got {tuple(self.maps.shape)}")
        if (self.units is None) != (self.reconstruction is None):
            raise ValueError(f"Reduction {self.site!r}: units and reconstruction go together")
        if self.units is not None:
            if tuple(self.units.shape) != (self.k,) or tuple(self.reconstruction.shape) != (
                    self.d, self.k):
                raise ValueError(
                    f"Reduction {self.site!r}: units must have shape (k,) = ({self.k},) and "
                    f"reconstruction (d, k) = ({self.d}, {self.k}); got "
                    f"{tuple(self.units.shape)} and {tuple(self.reconstruction.shape)}")
            if len(set(self.units.tolist())) != self.k or not (
                    0 <= int(self.units.min()) and int(self.units.max()) < self.d):
                raise ValueError(f"Reduction {self.site!r}: units must be k distinct indices "
                                 f"in [0, {self.d})")

    @classmethod
    def from_fit(cls, site: Any, fit: Any, stats: Any = None, mode: str = "width",
                 surgery: str = "auto") -> "Reduction":
        """Build from a ``Site``, its ``SpectrumFit`` (``k``, ``eigenvectors`` d x k) and
        optionally its ``CovarianceStats`` (for ``mean``; in width mode with surgery
        "auto"/"select" also for the unit selection)."""
        if fit.k < 1 or fit.eigenvectors is None:
            raise ValueError(f"site {site.name!r}: the fit has no spike directions (k={fit.k})")
        basis = torch.as_tensor(fit.eigenvectors)[:, : fit.k]
        return cls.from_basis(site, basis, stats, mode, surgery)

    @classmethod
    def from_basis(cls, site: Any, basis: torch.Tensor, stats: Any = None,
                   mode: str = "width", surgery: str = "auto") -> "Reduction":
        """Like :meth:`from_fit` for a given (d, k) orthonormal basis."""
        if site.where != "input" and mode != "width":
            raise ValueError(f"site {site.name!r}: project mode reduces module inputs")
        mean = None if stats is None else torch.as_tensor(stats.mean)
        units = recon = None
        if mode == "width" and surgery != "rotate" and stats is not None:
            units, recon = select_units(torch.as_tensor(stats.cov), basis)
        return cls(site.name, site.module_name, mode, site.dim, basis.shape[1], basis, mean,
                   units, recon, surgery)

    def to_dict(self) -> dict:
        """JSON-able record without the tensors."""
        return {"site": self.site, "module_name": self.module_name, "mode": self.mode,
                "d": self.d, "k": self.k, "mean_corrected": self.mean is not None,
                "surgery": self.surgery if self.units is not None else "rotate"}


@dataclass
class ReductionResult:
    """Outcome of :func:`rmtkd.reduce.reduce_site`; parameter counts are the whole model's."""

    reduction: Reduction
    applied: bool
    reason: str
    params_before: int
    params_after: int

    def to_dict(self) -> dict:
        return {**self.reduction.to_dict(), "applied": self.applied, "reason": self.reason,
                "params_before": self.params_before, "params_after": self.params_after}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule ``name`` of ``model`` by ``module``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def select_units(cov: torch.Tensor, basis: torch.Tensor, *, ridge: float = 1e-6
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k units (rows of the d x k ``basis``) that best span its column space, and the
    least-squares map predicting every unit from them.

    Units are picked by pivoted Gram-Schmidt on the columns of ``basis^T`` (k x d): at each
    step the unit whose row has the largest norm after removing the span of those already
    picked, i.e. the first k pivots of a column-pivoted QR of U^T (LAPACK geqp3, which
    is what runs). ``R = C[:, S] (C[S, S] + lam I)^-1`` with ``lam = ridge * mean(diag
    C[S, S])`` (the regression of all units on the kept ones under the site covariance
    ``cov`` (d x d, symmetric).

    Returns:
        ``(units (k,) int64 sorted, R (d, k) float64)``; ``R[S] ~= I``.
    """
    from scipy.linalg import qr

    B = basis.detach().to(device="cpu", dtype=torch.float64)
    d, k = B.shape
    _, _, piv = qr(B.T.numpy(), mode="economic", pivoting=True, check_finite=False)
    picked = [int(j) for j in piv[:k]]
    S = torch.tensor(sorted(picked), dtype=torch.int64)
    C = cov.detach().to(device="cpu", dtype=torch.float64)
    css = C[S][:, S]
    lam = ridge * float(css.diagonal().mean().clamp_min(1e-300))
    R = torch.linalg.solve(css + lam * torch.eye(k, dtype=torch.float64), C[S].contiguous()).T
    R[S] = torch.eye(k, dtype=torch.float64)   # kept units pass through unchanged
    return S, R


def width_maps(reduction: Reduction, nonlinear: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, str]:
    """How width mode maps the site, in float64 on the CPU: ``(P, R, c, how)``.

    The producer's new outputs are ``P @ outputs`` (P: k x d); the consumer's input is
    rebuilt as ``c + R @ new`` (R: d x k, c: (d,) or None), so the consumer becomes
    ``W R`` with bias ``b + W c``. ``how`` is "select" (P picks the units, c = mean -
    R mean_S) when the reduction carries units and its surgery is "select", or "auto" with
    ``nonlinear`` (an elementwise nonlinearity between producer and consumer); else
    "rotate" (P = U^T, R = U, c = (I - U U^T) mean).
    """
    if reduction.units is not None and (reduction.surgery == "select" or (
            reduction.surgery == "auto" and nonlinear)):
        S = reduction.units.detach().cpu()
        P = torch.zeros(reduction.k, reduction.d, dtype=torch.float64)
        P[torch.arange(reduction.k), S] = 1.0
        R = reduction.reconstruction.detach().to(device="cpu", dtype=torch.float64)
        c = None
        if reduction.mean is not None:
            m = reduction.mean.detach().to(device="cpu", dtype=torch.float64)
            c = m - R @ m[S]
        return P, R, c, "select"
    U = reduction.basis.detach().to(device="cpu", dtype=torch.float64)
    return U.T, U, residual_mean(reduction), "rotate"


def residual_mean(reduction: Reduction) -> torch.Tensor | None:
    """``r = (I - U U^T) mean`` in float64, (d,), or None without a mean."""
    if reduction.mean is None:
        return None
    U = reduction.basis.detach().to(torch.float64).cpu()
    m = reduction.mean.detach().to(torch.float64).cpu()
    return m - U @ (U.T @ m)


def execution_chain(model: nn.Module, name: str) -> tuple[list[tuple[str, nn.Module]], bool]:
    """Modules around ``name`` in (assumed) execution order, and whether that order is sure.

    Inside nn.Sequential containers the order is the execution order: the chain is the
    flattened outermost Sequential ancestor of ``name`` (nested Sequentials expanded).
    Otherwise it is the parent's children in registration order (how ResNet blocks and
    MLP modules declare conv1/bn1/relu/conv2 or fc1/act/fc2), which is only a guess.
    """
    parts = name.split(".")
    depth = len(parts) - 1  # the container is ".".join(parts[:depth])
    parent = ".".join(parts[:depth])
    if not isinstance(model.get_submodule(parent), nn.Sequential):
        return _flatten(parent, model.get_submodule(parent)), False
    while depth > 0 and isinstance(model.get_submodule(".".join(parts[: depth - 1])),
                                   nn.Sequential):
        depth -= 1
    container = ".".join(parts[:depth])
    return _flatten(container, model.get_submodule(container)), True


def _flatten(prefix: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    for child_name, child in module.named_children():
        full = f"{prefix}.{child_name}" if prefix else child_name
        out.extend(_flatten(full, child) if isinstance(child, nn.Sequential)
                   else [(full, child)])
    return out


def modules_before(model: nn.Module, name: str) -> tuple[list[tuple[str, nn.Module]], bool]:
    """The modules before ``name`` in its :func:`execution_chain`, nearest first."""
    chain, ordered = execution_chain(model, name)
    index = [n for n, _ in chain].index(name)
    return chain[:index][::-1], ordered


def check_orthonormal(reduction: Reduction, atol: float = 1e-4) -> None:
    U = reduction.basis.detach().to(torch.float64)
    dev = (U.T @ U - torch.eye(reduction.k, dtype=torch.float64, device=U.device)).abs().max()
    if dev.item() > atol:
        raise ValueError(f"Reduction {reduction.site!r}: basis columns are not orthonormal "
                         f"(max |U^T U - I| = {dev.item():.3g}); orthonormalise it first, "
                         f"e.g. torch.linalg.qr(basis).Q")
