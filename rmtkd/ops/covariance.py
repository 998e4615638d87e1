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

Backends: ``torch`` (the reference). On CPU it forms the shifted Gram matrix with BLAS
``?syrk`` (upper triangle only, half the flops of ``X.T @ X``) on a workspace whose last
column is ones, so the column sums come out of the same product; on other devices it uses
plain torch matmuls in full fp32/fp64 precision (never TF32).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from scipy.linalg import blas as _blas

from ._dispatch import register_backend, resolve_backend

__all__ = ["CovarianceAccumulator", "CovarianceStats", "NonFiniteInputError", "merge_moments"]

_ACC_DTYPES = (torch.float32, torch.float64)
_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# CPU workspace: at most this many elements per chunk of rows (64 MiB in fp32), but never
# fewer than _MIN_CHUNK_ROWS rows, below which syrk loses efficiency.
_CHUNK_ELEMS = 1 << 24
_MIN_CHUNK_ROWS = 8192


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
def _ieee_fp32_matmul() -> Iterator[None]:
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
    with _ieee_fp32_matmul():
        g = xs.mT @ xs
    return g, xs.sum(0)


def _shifted_gram_syrk(x: torch.Tensor, shift: torch.Tensor, workspace: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper triangle of the shifted Gram matrix and the column sums with BLAS ``?syrk`` (CPU).

    Rows are processed in chunks of ``workspace.shape[0]``: each chunk is written shifted into
    ``workspace[:, :d]`` (whose last column is ones) and ``W^T W`` is accumulated into one
    ``(d + 1, d + 1)`` matrix, whose last column holds the column sums.

    Args:
        x: ``(m, d)`` CPU rows, any float dtype.
        shift: ``(d,)`` CPU, float32 or float64 (the accumulation dtype).
        workspace: ``(rows, d + 1)`` contiguous, ``shift.dtype``, last column all ones.

    Returns:
        ``G`` ``(d, d)`` with only its upper triangle valid (lower triangle zero) and ``s``
        ``(d,)``, views of one freshly allocated matrix.
    """
    m, d = x.shape
    syrk = _blas.ssyrk if shift.dtype == torch.float32 else _blas.dsyrk
    g = torch.zeros(d + 1, d + 1, dtype=shift.dtype)
    # BLAS is column-major: W^T (rows of W as columns) is F-contiguous without a copy, and the
    # lower triangle of the column-major view of g is the upper triangle of g.
    c = g.numpy().T
    rows = workspace.shape[0]
    for i in range(0, m, rows):
        r = min(rows, m - i)
        torch.sub(x[i:i + r], shift, out=workspace[:r, :d])
        c = syrk(1.0, workspace[:r].numpy().T, beta=1.0, c=c, trans=0, lower=1, overwrite_c=1)
    g = torch.from_numpy(c.T)  # the same storage unless f2py had to copy c
    return g[:d, :d], g[:d, d]


def _torch_available(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    if dtype not in _ACC_DTYPES:
        return False, f"accumulation dtype must be float32 or float64, got {dtype}"
    return True, ""


register_backend("covariance", "torch", _torch_available)


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
    """

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
        self._device_fixed = device is not None
        self._set_device(torch.device(device) if device is not None else torch.device("cpu"))
        self._n = 0
        self._mean = torch.zeros(dim, dtype=torch.float64, device=self.device)
        self._m2 = torch.zeros(dim, dim, dtype=acc_dtype, device=self.device)
        self._workspace: torch.Tensor | None = None

    def _set_device(self, device: torch.device) -> None:
        self.backend = resolve_backend("covariance", self._requested_backend, device, self.acc_dtype)
        self.device = device

    def _adopt_device(self, device: torch.device) -> None:
        """Move the (still empty) state to ``device`` if no device was fixed yet."""
        if self._device_fixed:
            return
        self._device_fixed = True
        if device != self.device:
            self._set_device(device)
            self._mean = self._mean.to(device)
            self._m2 = self._m2.to(device)

    @property
    def n(self) -> int:
        """Number of rows accumulated so far."""
        return self._n

    def __repr__(self) -> str:
        return (f"CovarianceAccumulator(dim={self.dim}, n={self._n}, acc_dtype={self.acc_dtype}, "
                f"device={self.device}, backend={self.backend!r})")

    def _rows(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Validate a batch and return its selected rows, ``(m, dim)``, on the state device."""
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
            x2d = x2d[mask.reshape(-1).to(x2d.device)]
        if x2d.shape[0] > 0:
            self._adopt_device(x2d.device)
        return x2d.to(self.device)

    def _cpu_workspace(self, m: int) -> torch.Tensor:
        """A ``(rows, dim + 1)`` acc-dtype buffer whose last column is ones, reused across updates."""
        cap = max(_MIN_CHUNK_ROWS, _CHUNK_ELEMS // (self.dim + 1))
        rows = min(m, cap)
        ws = self._workspace
        if ws is None or ws.dtype != self.acc_dtype or ws.shape[0] < rows:
            ws = torch.empty(rows, self.dim + 1, dtype=self.acc_dtype)
            ws[:, self.dim] = 1
            self._workspace = ws
        return ws

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
        """
        x2d = self._rows(x, mask)
        m = x2d.shape[0]
        if m == 0:
            return self
        shift = self._mean.to(self.acc_dtype) if self._n > 0 else x2d.mean(0, dtype=self.acc_dtype)
        if self.device.type == "cpu":
            g, s = _shifted_gram_syrk(x2d, shift, self._cpu_workspace(m))
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
        if dim != self.dim or tuple(mean.shape) != (self.dim,) or tuple(m2.shape) != (self.dim, self.dim):
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
