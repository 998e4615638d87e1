"""Backend selection shared by every op.

Each op registers the backends that implement it. ``resolve_backend`` turns a request
(``"torch"``, ``"triton"``, ``"cuda"``, or ``"auto"``/``None``, which defer to the
``RMTKD_BACKEND`` environment variable and else pick the fastest available) into one
concrete backend name, or raises a clear error: asking for a backend that cannot run is
never silently replaced by another one.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

BACKENDS = ("torch", "triton", "cuda")

# op -> backend -> predicate(device, dtype) -> (ok, reason-if-not)
_REGISTRY: dict[str, dict[str, Callable[[torch.device, torch.dtype], tuple[bool, str]]]] = {}
# (op, backend) pairs that "auto" may pick: those the op's GPU benchmark shows faster.
AUTO_PICKS: set[tuple[str, str]] = set()


def register_backend(
    op: str, backend: str, available: Callable[[torch.device, torch.dtype], tuple[bool, str]],
    *, auto: bool = True,
) -> None:
    """Declare that ``backend`` implements ``op``; ``available`` says whether it can run.

    auto: whether ``backend="auto"`` may choose it (False where the benchmark shows torch
    faster: the backend then runs only when asked for by name).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _REGISTRY.setdefault(op, {})[backend] = available
    if auto:
        AUTO_PICKS.add((op, backend))
    else:
        AUTO_PICKS.discard((op, backend))


def always_available(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    return True, ""


def triton_runnable(device: torch.device) -> tuple[bool, str]:
    """Whether Triton kernels can run on ``device``: CUDA tensors with Triton installed, or
    CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set before Triton is
    imported), which is how tests and machines without a GPU exercise the kernels."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return False, "Triton is not installed (pip install 'rmtkd[triton]')"
    if device.type == "cuda":
        return (True, "") if torch.cuda.is_available() else (False, "CUDA is not available")
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return True, ""
        return False, ("Triton kernels need a CUDA device; on CPU they run only under the "
                       "Triton interpreter (set TRITON_INTERPRET=1 before importing rmtkd)")
    return False, f"Triton does not support {device.type} tensors"


def resolve_backend(op: str, requested: str | None, device: torch.device | str | None,
                    dtype: torch.dtype = torch.float32) -> str:
    """Return the backend that will run ``op`` on ``device``/``dtype``."""
    req = (requested or "auto").strip().lower()
    if req == "auto":  # the process-wide choice, if any, replaces the default
        req = os.environ.get("RMTKD_BACKEND", "auto").strip().lower()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    impls = _REGISTRY.get(op, {"torch": always_available})
    if req == "auto":
        # GPU backends only for CUDA tensors (never the Triton interpreter), fastest first;
        # an op whose GPU kernels lose to torch at some shapes leaves them unregistered or
        # declines in its predicate, as its benchmark decides.
        for name in ("cuda", "triton"):
            if (dev.type == "cuda" and name in impls and (op, name) in AUTO_PICKS
                    and impls[name](dev, dtype)[0]):
                return name
        return "torch"
    if req not in BACKENDS:
        raise ValueError(f"unknown backend {req!r} for {op}; expected 'auto' or one of {BACKENDS}")
    if req not in impls:
        have = ", ".join(sorted(impls))
        raise RuntimeError(
            f"backend {req!r} is not implemented for {op} (implemented: {have}); "
            f"use backend='auto' or one of those")
    ok, why = impls[req](dev, dtype)
    if not ok:
        raise RuntimeError(f"backend {req!r} cannot run {op} on {dev} / {dtype}: {why}")
    return req
