"""torch.distributed support: calibration across ranks and self-distillation under DDP.

Launch with torchrun (one process per rank)::

    torchrun --nproc_per_node=2 -m rmtkd.cli compress --distributed --model m.pt --data d.pt

or, from Python, call :func:`init_from_env` before :func:`rmtkd.compress`: ``compress``
runs distributed whenever a process group with more than one rank is initialized.

- Calibration: rank ``r`` of ``W`` streams batches ``r, r + W, ...`` (:func:`shard`) into
  its own accumulators; :func:`all_reduce_accumulators` merges the counts, means and
  centred second moments exactly (fp64, pairwise re-centring), so every rank holds the
  statistics of the whole calibration set and fits the same spectrum.
- Distillation: the student is wrapped in ``DistributedDataParallel`` (:func:`wrap_ddp`)
  and each rank trains on its shard of every epoch's shuffled batch order
  (:class:`ShardedBatches`); the teacher stays an unwrapped, frozen copy on each rank.
  With ``data_parallel="fsdp"`` an FSDP2-sharded copy (:func:`shard_fsdp`) is trained
  instead and gathered back (:func:`full_state_dict`): surgery and the teacher copy need
  the full parameters on each rank, so FSDP saves memory only while distilling.
- Only rank 0 writes checkpoints and reports; :func:`check_same` guards that every rank
  reached the same plan, and :func:`all_or_none` turns an error on one rank into an error
  on every rank (instead of the others waiting forever in the next collective).

Everything here is a no-op (or the identity) without an initialized process group of more
than one rank, so single-process runs are unchanged.
"""
from __future__ import annotations

import copy
import datetime
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .collectives import (agree, all_or_none, all_true, barrier, check_same, check_same_plan,
                          comm_device, digest, gather, is_distributed, is_main, plan_summary,
                          rank, world_size)
from .ops.covariance import CovarianceAccumulator, CovarianceStats

DATA_PARALLEL = ("ddp", "fsdp")
T = TypeVar("T")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ---------------------------------------------------------------------- process group


def torchrun_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset): > 1 under torchrun with
    several processes."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer; "
                           f"launch with torchrun --nproc_per_node=N") from None


def init_from_env(backend: str | None = None) -> bool:
    """Initialize the default process group from torchrun's environment.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
    A no-op (returns False) when ``WORLD_SIZE`` is absent or 1, or when a group is
    already initialized.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default ``"nccl"`` when CUDA is available,
            else ``"gloo"``. With nccl the CUDA device is set to ``LOCAL_RANK``.

    Returns:
        True when this call initialized the group (the caller then calls :func:`destroy`).

    Raises:
        RuntimeError: ``WORLD_SIZE`` > 1 but another torchrun variable is missing.
    """
    if not dist.is_available():
        raise RuntimeError("this build of torch has no torch.distributed; install a torch "
                           "build with distributed support")
    if dist.is_initialized() or torchrun_world_size() <= 1:
        return False
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE is {torchrun_world_size()} but {', '.join(missing)} "
                           f"{'is' if len(missing) == 1 else 'are'} not set; launch with "
                           f"torchrun --nproc_per_node=N (it sets them)")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
    return True


def destroy() -> None:
    """Destroy the default process group if one is initialized, after a barrier (so no
    rank tears down its connections while a peer still has a collective in flight)."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            try:   # bounded: a rank that died must not keep the others here
                if dist.get_backend() == "gloo":
                    dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
                else:
                    dist.barrier()
            except RuntimeError:
                pass
        dist.destroy_process_group()


# --------------------------------------------------------------------------- shards


def shard(items: Sequence[T], rank_: int | None = None, world: int | None = None
          ) -> list[T]:
    """Rank ``r``'s share of ``items``: items ``r, r + W, r + 2W, ...`` (deterministic).

    Shards may be uneven (and empty when there are fewer items than ranks): fine for
    calibration, whose merge sums the counts.
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return list(items[r::w])


class ShardedBatches:
    """This rank's batches of every pass over ``batches`` (re-iterable, e.g. shuffled).

    Each pass reads ``batches``' order (the same on every rank when its shuffling is
    seeded alike) and yields positions ``r, r + W, ...``; shorter shards are padded with
    the pass's first batches, so every rank has ``ceil(N / W)`` batches and takes the same
    number of DDP steps (as ``DistributedSampler`` pads). Every rank reads every batch
    (skipping the others'): pass lists of batches, not loaders with expensive loading.
    """

    def __init__(self, batches: Iterable[Any], rank_: int | None = None,
                 world: int | None = None) -> None:
        self.batches = batches
        self.rank = rank() if rank_ is None else rank_
        self.world = world_size() if world is None else world

    def __len__(self) -> int:
        return -(-len(self.batches) // self.world)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        head: list[Any] = []
        count = 0
        for i, batch in enumerate(self.batches):
            if len(head) < self.world:
                head.append(batch)
            if i % self.world == self.rank:
                count += 1
                yield batch
        if count == 0 and not head:
            return
        for j in range(len(self) - count):   # pad to ceil(N / W)
            yield head[j % len(head)]


# ----------------------------------------------------------------------- calibration


def _moments(state: Mapping[str, Any]) -> torch.Tensor:
    """``[n, n * mean]`` of one accumulator state, ``(1 + dim,)`` float64 on CPU."""
    return torch.cat([torch.tensor([float(state["n"])], dtype=torch.float64),
                      state["mean"].detach().to("cpu", torch.float64) * state["n"]])


def _recentred_m2(state: Mapping[str, Any], mean: torch.Tensor) -> torch.Tensor:
    """``M2_r + n_r (mu_r - mu)(mu_r - mu)^T``: a state's centred second moments about the
    global mean ``mu``, ``(dim, dim)`` float64 on ``mean``'s device."""
    delta = state["mean"].to(mean.device, torch.float64) - mean
    return state["m2"].to(mean.device, torch.float64).addr_(delta, delta,
                                                            alpha=float(state["n"]))


def _merged_state(state: Mapping[str, Any], n: int, mean: torch.Tensor, m2: torch.Tensor,
                  acc_dtype: torch.dtype) -> dict:
    where = state["mean"].device
    return {"dim": state["dim"], "n": n, "mean": mean.to(where),
            "m2": m2.to(where, acc_dtype)}


def merge_states(states: Sequence[Mapping[str, Any]], acc_dtype: torch.dtype = torch.float32
                 ) -> dict:
    """The exact merge of several accumulator states (``CovarianceAccumulator.state_dict``,
    e.g. one per rank) in one process: what :func:`all_reduce_accumulators` computes with
    all-reduces (same formulas, same fp64 arithmetic). Returns a state for
    ``load_state_dict`` of an accumulator with ``acc_dtype``."""
    if not states:
        raise ValueError("merge_states needs at least one state")
    moments = torch.stack([_moments(s) for s in states]).sum(0)
    n = int(moments[0].item())
    if n == 0:
        return dict(states[0])
    mean = moments[1:] / n
    m2 = torch.stack([_recentred_m2(s, mean) for s in states]).sum(0)
    return _merged_state(states[0], n, mean, m2, acc_dtype)


def all_reduce_accumulators(accs: Mapping[str, CovarianceAccumulator]
                            ) -> Mapping[str, CovarianceAccumulator]:
    """Merge every rank's accumulators exactly, in place; all ranks end with the same state.

    Per site, with rank ``r`` holding ``n_r`` rows of mean ``mu_r`` and centred sum of
    outer products ``M2_r``: ``n = sum n_r``, ``mu = sum n_r mu_r / n`` (one all-reduce of
    every site's ``[n_r, n_r mu_r]`` in fp64), then
    ``M2 = sum_r M2_r + n_r (mu_r - mu)(mu_r - mu)^T`` (one fp64 all-reduce of a
    ``(dim, dim)`` matrix per site), rounded back to the accumulator's ``acc_dtype``.
    The result equals a single-process accumulation of all rows up to rounding
    (:func:`merge_states` is the same computation in one process).

    Args:
        accs: ``{site name: accumulator}``, the same names (in the same order), dims and
            acc_dtypes on every rank; accumulators may be empty (n = 0).

    Returns:
        ``accs`` (identity when not distributed).

    Raises:
        ValueError (on every rank): the ranks' sites, dims or dtypes differ.
    """
    if not is_distributed():
        return accs
    layout = [[name, a.dim, str(a.acc_dtype)] for name, a in accs.items()]
    layouts = gather(layout)
    bad = [r for r, lay in enumerate(layouts) if lay != layouts[0]]
    if bad:
        raise ValueError(f"cannot merge covariance accumulators: ranks {bad} have sites "
                         f"(name, dim, acc_dtype) {layouts[bad[0]]}, rank 0 has "
                         f"{layouts[0]}; every rank must calibrate the same sites")
    dev = comm_device()
    states = {name: a.state_dict() for name, a in accs.items()}
    # 1. every site's counts and sums in one all-reduce -> the global means
    moments = torch.cat([_moments(s) for s in states.values()]).to(dev)
    dist.all_reduce(moments)
    offset = 0
    for name, acc in accs.items():
        d = acc.dim
        n = int(moments[offset].item())
        mean = moments[offset + 1:offset + 1 + d] / max(n, 1)
        offset += 1 + d
        if n == 0:
            continue
        # 2. the centred second moments about the global mean, one all-reduce per site
        m2 = _recentred_m2(states[name], mean)
        dist.all_reduce(m2)
        acc.load_state_dict(_merged_state(states[name], n, mean, m2, acc.acc_dtype))
    return accs


def collect_sharded_statistics(model: nn.Module, batches: Sequence[Any], sites: Sequence[Any],
                               **kwargs: Any) -> dict[str, CovarianceStats]:
    """:func:`rmtkd.capture.collect_statistics` over all ranks: each rank streams its
    :func:`shard` of ``batches``, the accumulators are merged with
    :func:`all_reduce_accumulators`, and every rank gets the statistics of all of
    ``batches``. ``kwargs`` go to :func:`rmtkd.capture.stream.collect_accumulators`.
    Errors on one rank are raised on every rank (:func:`all_or_none`); each rank's shard
    must give every site at least 2 rows (calibration batches of >= 2 samples)."""
    from .capture.stream import collect_accumulators

    mine = shard(batches)
    accs: dict[str, CovarianceAccumulator] = {}
    with all_or_none("calibration"):
        if mine:
            accs = collect_accumulators(model, mine, sites, **kwargs)
        else:   # fewer batches than ranks: this rank contributes nothing
            accs = {s.name: CovarianceAccumulator(s.dim, acc_dtype=kwargs.get(
                "acc_dtype", torch.float32), device=kwargs.get("device")) for s in sites}
    all_reduce_accumulators(accs)
    return {name: acc.finalize() for name, acc in accs.items()}


# ---------------------------------------------------------------------- distillation


def wrap_ddp(model: nn.Module, *, static_graph: bool = True) -> nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` (``model`` itself when not
    distributed). Gradients are averaged across ranks at every backward, so replicas that
    start equal (DDP broadcasts rank 0's parameters and buffers) stay equal.

    static_graph: the distillation graph is the same at every step; DDP then learns in
    the first step which parameters get no gradient (e.g. a pooler an embedding loss does
    not use), without ``find_unused_parameters``' graph walk (and its warning) per step.
    """
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    return DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None,
                                   static_graph=static_graph)


def shard_fsdp(model: nn.Module) -> nn.Module:
    """A copy of ``model`` sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``):
    every module owning parameters is one unit (a parameter shared between modules stays
    with the first), then the root. Parameters, gradients and Adam's state are split across
    the ranks; each unit's parameters are all-gathered only for its forward/backward.
    Rank 0's weights are broadcast first (as DDP does).
    Read the trained weights back with :func:`full_state_dict`."""
    from torch.distributed.fsdp import fully_shard

    sharded = copy.deepcopy(model)
    with torch.no_grad():   # start from rank 0's weights, as DDP does
        for t in [*sharded.parameters(), *sharded.buffers()]:
            dist.broadcast(t.data, src=0)
    seen: set[int] = set()
    for module in list(sharded.modules())[1:]:
        own = [id(p) for p in module.parameters(recurse=False)]
        if own and not seen.intersection(own):
            fully_shard(module)
        seen.update(own)
    fully_shard(sharded)
    return sharded


def full_state_dict(sharded: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict of an FSDP2 model, on every rank (one all-gather per
    parameter)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))


def distributed_distill(student: nn.Module, teacher: nn.Module, batches: Sequence[Any], *,
                        data_parallel: str = "ddp", **kwargs: Any) -> dict[str, Any]:
    """:func:`rmtkd.distill.distill` over the ranks: each rank on its
    :class:`ShardedBatches` of ``batches`` (every epoch's order), the teacher frozen and
    unwrapped on each rank, progress on rank 0 only. ``kwargs`` go to ``distill``. Plain
    ``distill`` when not distributed.

    data_parallel: "ddp" (the student wrapped by :func:`wrap_ddp`: a full replica per rank,
    gradients all-reduced) or "fsdp" (a :func:`shard_fsdp` copy is trained, parameters,
    gradients and optimizer state split across the ranks; its weights are then gathered
    back into ``student``, which surgery needs whole).
    """
    from .distill.trainer import distill

    if data_parallel not in DATA_PARALLEL:
        raise ValueError(f"data_parallel must be one of {DATA_PARALLEL}, got {data_parallel!r}")
    if not is_distributed():
        return distill(student, teacher, batches, **kwargs)
    kwargs["progress"] = kwargs.get("progress", True) and is_main()
    if data_parallel == "fsdp":
        sharded = shard_fsdp(student)
        try:
            info = distill(sharded, teacher, ShardedBatches(batches), **kwargs)
            student.load_state_dict(full_state_dict(sharded))
        finally:
            del sharded
        student.eval()
        return info
    ddp = wrap_ddp(student)
    try:
        return distill(ddp, teacher, ShardedBatches(batches), **kwargs)
    finally:
        del ddp
