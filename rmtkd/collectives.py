"""Collectives over torch.distributed that the rest of rmtkd uses (a leaf module: it imports
nothing from rmtkd). Every function is the identity / a no-op when no process group of more
than one rank is initialized."""
from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of ranks (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that prints and writes."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def comm_device() -> torch.device:
    """Where collective tensors must live: the current CUDA device for nccl, else CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------- agreement


def gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def digest(obj: Any) -> str:
    """A short SHA-256 of ``obj`` as JSON (``str`` for what JSON cannot hold)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_same(obj: Any, what: str) -> None:
    """Raise on every rank when ``obj`` (JSON-able) differs between ranks.

    All ranks must call it (one all_gather of a digest). The error names the ranks that
    differ from rank 0 and what differs (``what``)."""
    if not is_distributed():
        return
    digests = gather(digest(obj))
    bad = [r for r, d in enumerate(digests) if d != digests[0]]
    if bad:
        raise RuntimeError(f"ranks {bad} reached a different {what} than rank 0 (this "
                           f"rank, {rank()}: {obj!r}); every rank must see the same model, "
                           f"data and config (and the same torch build and thread count)")


def plan_summary(history: Sequence[Any]) -> list[list[Any]]:
    """The per-step decisions that must agree across ranks: site, d, k, status."""
    return [[r.site, r.d, r.k, r.status] for r in history]


def check_same_plan(history: Sequence[Any]) -> None:
    """:func:`check_same` on the steps' sites, widths, k's and statuses
    (:class:`rmtkd.engine.StepRecord` list)."""
    check_same(plan_summary(history), "plan (site, d, k, status per step)")


def agree(value: float) -> float:
    """Rank 0's ``value`` on every rank (a float broadcast; identity when not
    distributed), so that decisions taken on it (roll-backs) agree."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=comm_device())
    dist.broadcast(t, src=0)
    return float(t.item())


def all_true(flag: bool) -> bool:
    """True on every rank iff ``flag`` is True on every rank (one all-reduce; ``flag``
    itself when not distributed)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() == 1.0)


@contextlib.contextmanager
def all_or_none(what: str) -> Iterator[None]:
    """Run the body on every rank; if it raised on any rank, raise on every rank.

    The ranks where it failed re-raise their own error; the others raise a RuntimeError
    naming the failed ranks and their errors. Without this, an error on one rank leaves
    the others waiting in the next collective. All ranks must enter it (one all_gather).
    """
    error: BaseException | None = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 (re-raised below)
        error = e
    if is_distributed():
        errors = gather(None if error is None else f"{type(error).__name__}: {error}")
        failed = {r: e for r, e in enumerate(errors) if e is not None}
        if failed and error is None:
            raise RuntimeError(f"{what} failed on rank(s) {sorted(failed)}: "
                               + "; ".join(f"rank {r}: {e}" for r, e in failed.items()))
    if error is not None:
        raise error
