"""The whole-model strategy: RMT-KD on a model that fits in memory, one site per step.

``compress(model, train_data, eval_data=..., config=CompressConfig(...))`` works on a copy
of ``model``. The sites are the reducible dimensions its adapter names (a transformer's
per-block MLP and value widths; a plain network's hidden Linear / Conv2d inputs), shallow
to deep. Per site (:func:`rmtkd.engine.loop.run`):

1. teacher = a frozen copy of the current model;
2. calibrate on a fixed, seeded calibration subset (live forward hooks) and fit the
   spectrum; k by the rank rule (per head for value sites);
3. stop if k/d < rho_min; cut (a cut that would not reduce parameters is skipped);
4. self-distil from the teacher (or the original model, ``distil_from``);
5. the budget: if the metric dropped more than ``epsilon`` points below the original
   model's, or became NaN, roll back to the teacher; ``on_violation`` "stop" ends the run.
   With ``past_edge`` the site first tries a deeper cut than its rule's, kept when it
   spends at most the site's share of the budget left (else the rule's k follows, and
   where that breaks the budget too, half of the rule's cut; at the last site, which has
   the whole budget left, the k halfway between the deep cut and the rule's is tried
   first);
6. stop once ``params <= param_target * original`` or ``max_steps`` steps were tried.

Under torch.distributed (a process group of more than one rank) calibration is sharded and
merged exactly, distillation runs DDP / FSDP2, rank 0's metric decides and only rank 0
writes checkpoints: the same loop with distributed hooks.
"""
from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapters import TransformerAdapter, adapter_for
from ..capture import Site, collect_statistics, distinct_inputs, find_sites, pooled_statistics
from ..capture.sites import batch_size, fit_samples, model_device
from ..checkpoint import load_checkpoint, write_checkpoint
from ..collectives import agree, all_or_none, check_same, check_same_plan, is_distributed, \
    is_main
from ..distill.trainer import NonFiniteLossError, TeacherCache
from ..distributed import collect_sharded_statistics, distributed_distill
from ..reduce import Reduction, UnsupportedModuleError, reduce_site
from ..reduce.attention import head_statistics
from ..reduce.maths import n_params
from ..reduce.transformer import dim_site, reads_compact_values
from ..spectral import SpectrumFit
from .config import CompressConfig
from .data import Batches, calibration_subset, evaluate
from .loop import Strategy, Unit, run
from .step import Cut, StepRecord, attempt_k, kept_energy, reduction


@dataclass
class CompressionResult:
    """Outcome of :func:`compress`: the compressed model (a copy; eval mode), the applied
    reductions in order, one record per step tried, the spectrum fit of every site
    analysed (keyed by site name), and the metric / parameter totals."""

    model: nn.Module
    plan: list[Reduction]
    history: list[StepRecord]
    fits: dict[str, SpectrumFit]
    original_metric: float
    final_metric: float
    original_params: int
    final_params: int
    metric_name: str = "accuracy (%)"
    config: CompressConfig = field(default_factory=CompressConfig)

    @property
    def reduction(self) -> float:
        """Fraction of the parameters removed."""
        return 1.0 - self.final_params / self.original_params if self.original_params else 0.0

    def summary(self) -> str:
        applied = sum(r.status == "applied" for r in self.history)
        rolled = sum(r.status == "rolled back" for r in self.history)
        return "\n".join([
            f"parameters: {self.original_params:,} -> {self.final_params:,} "
            f"({100 * self.reduction:.1f}% fewer)",
            f"{self.metric_name}: {self.original_metric:.2f} -> {self.final_metric:.2f} "
            f"({self.final_metric - self.original_metric:+.2f} points)",
            f"steps: {len(self.history)} tried, {applied} applied, {rolled} rolled back, "
            f"{len(self.history) - applied - rolled} skipped (mode {self.config.mode}, "
            f"rank rule {self.config.rank_rule})",
        ])

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "metric": self.metric_name,
                "original_metric": self.original_metric, "final_metric": self.final_metric,
                "original_params": self.original_params, "final_params": self.final_params,
                "reduction": self.reduction, "plan": [r.to_dict() for r in self.plan],
                "history": [r.to_dict() for r in self.history]}

    def plan_record(self) -> dict:
        """What :func:`rmtkd.save` writes into plan.json besides the weights."""
        return {"reductions": [r.to_dict() for r in self.plan],
                "history": [r.to_dict() for r in self.history],
                "config": self.config.to_dict(), "metric": self.metric_name,
                "original_metric": self.original_metric, "final_metric": self.final_metric,
                "original_params": self.original_params, "final_params": self.final_params}


# ------------------------------------------------------------------ checkpoint payloads

_RED_TENSORS = ("basis", "mean", "units", "reconstruction", "maps")


def _pack_reduction(r: Reduction, i: int, tensors: dict) -> dict:
    for name in _RED_TENSORS:
        t = getattr(r, name)
        if t is not None:
            tensors[f"plan/{i}/{name}"] = torch.as_tensor(t)
    return {"site": r.site, "module_name": r.module_name, "mode": r.mode, "d": r.d, "k": r.k,
            "surgery": r.surgery}


def _unpack_reduction(d: dict, i: int, tensors: dict) -> Reduction:
    t = {n: tensors.get(f"plan/{i}/{n}") for n in _RED_TENSORS}
    return Reduction(d["site"], d["module_name"], d["mode"], d["d"], d["k"], t["basis"],
                     t["mean"], t["units"], t["reconstruction"], d["surgery"], t["maps"])


def _pack_fit(name: str, f: SpectrumFit, tensors: dict) -> dict:
    import numpy as np

    tensors[f"fits/{name}/eigenvalues"] = torch.from_numpy(np.asarray(f.eigenvalues,
                                                                       dtype=np.float64))
    if f.eigenvectors is not None:
        tensors[f"fits/{name}/eigenvectors"] = torch.as_tensor(f.eigenvectors)
    d = f.to_dict()
    d.pop("eigenvalues")
    return d


def _unpack_fit(name: str, d: dict, tensors: dict) -> SpectrumFit:
    d = dict(d)
    d["ks_distance"] = math.nan if d.get("ks_distance") is None else d["ks_distance"]
    vecs = tensors.get(f"fits/{name}/eigenvectors")
    return SpectrumFit(eigenvalues=tensors[f"fits/{name}/eigenvalues"].numpy(),
                       eigenvectors=vecs, **d)


def fingerprint(model: nn.Module, *batch_lists: Any) -> str:
    """sha256 of a model's weights and some batches' tensors (resume checks it)."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            h.update(str((x.dtype, tuple(x.shape))).encode())
            h.update(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                     .tobytes())
        elif isinstance(x, dict):
            for k in sorted(x):
                h.update(str(k).encode())
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                feed(v)
        else:
            h.update(repr(x).encode())

    for name, t in model.state_dict().items():
        h.update(name.encode())
        feed(t)
    for batches in batch_lists:
        feed(list(batches))
    return h.hexdigest()


# ----------------------------------------------------------------------------- strategy

#: past_edge: after a deep cut that held, the next site goes this much further past the
#: edge (s -> 1 + 1.5 (s - 1)); after one that broke, half as far (s -> 1 + (s - 1) / 2)
DEPTH_GROWTH = 1.5
#: past_edge: a site whose rule's cut breaks the budget then tries this share of that cut
#: (half of the directions the rule cuts; measured on the Rotten Tomatoes residual stream,
#: whose MP cut 384 -> 269 broke by 0.33 points, BENCHMARKS.md)
BACKOFF_SHARE = 0.5

class WholeModel(Strategy):
    def __init__(self, model: nn.Module, train_data: Any, eval_data: Any, calib_data: Any,
                 cfg: CompressConfig, checkpoint_dir: Any, resume: bool) -> None:
        self.cfg = cfg
        self.multi = is_distributed()
        self.acc_dtype = getattr(torch, cfg.acc_dtype)
        self.progress = cfg.progress and is_main()
        torch.manual_seed(cfg.seed)
        self.original = model
        self.model = copy.deepcopy(model).eval()
        self.train = Batches(train_data, what="train_data", shuffle=True, seed=cfg.seed)
        self.evals = Batches(eval_data if eval_data is not None else train_data,
                             what="eval_data")
        self.calib = (list(Batches(calib_data, what="calib_data")) if calib_data is not None
                      else calibration_subset(train_data, cfg.calib_fraction, cfg.seed))
        if not self.calib:
            raise ValueError("the calibration data is empty: pass calib_data or more "
                             "train_data")
        self.n_calib = sum(batch_size(b) for b in self.calib)
        # Embedding metric: similarity to the original model's outputs (a frozen copy).
        self.reference = copy.deepcopy(model).eval() if cfg.task == "embedding" else None
        self.source = None   # distil_from="original": the original model is every teacher
        if cfg.distil_from == "original":
            self.source = self.reference if self.reference is not None else \
                copy.deepcopy(model).eval()
        # One cache for the job: it is emptied whenever the teacher is another module.
        self.teacher_cache = None if self.multi or cfg.teacher_cache_mb <= 0 else \
            TeacherCache(cfg.teacher_cache_mb * 2**20)
        self.adapter = adapter_for(self.model)   # an unknown architecture: refused first
        self.original_metric = self._metric(self.model)
        self.original_params = n_params(self.model)
        self.current_metric = self.original_metric
        self.units = self._units()
        self.plan: list[Reduction] = []
        self.history: list[StepRecord] = []
        self.fits: dict[str, SpectrumFit] = {}
        self.checkpoint_dir, self.resuming = checkpoint_dir, resume
        self.finished = False
        self._fp = None
        self.depth = cfg.past_edge   # how far past the edge the next site tries first
        self.shares = [1.0]

    # -------------------------------------------------------------- setup
    def _units(self) -> list[Unit]:
        cfg, model = self.cfg, self.model
        if isinstance(self.adapter, TransformerAdapter):
            dims = self.adapter.select_dims(model, cfg.sites)
            units = []
            values_cut = set()
            for i, d in enumerate(dims):
                site = dim_site(d, model)
                values = d.kind == "value_width" and cfg.mode == "width"
                heads = d.kind == "head_width"   # a head size, whatever the mode
                if values:
                    values_cut.add(d.block.name)
                if heads and d.block.name in values_cut:
                    raise ValueError(f"sites: the head width of {d.block.name!r} is listed "
                                     f"after its value width; cut the head width first")
                kv = {site.name: d.block.attention.kv_heads} if values or heads else {}
                one = {site.name} if heads or values and reads_compact_values(
                    model.get_submodule(d.block.name) if d.block.name else model,
                    d.block) else set()
                units.append(Unit(i, site.name, [site], kv, one_width=one))
        else:
            sites = find_sites(model, self.calib[0], include=cfg.sites)
            units = [Unit(i, s.name, [s]) for i, s in enumerate(sites)]
        if not units:
            raise ValueError("no sites to reduce: the model has no nn.Linear/nn.Conv2d with "
                             "a hidden input of >= 2 features; name modules with sites=[...]")
        return units

    def _metric(self, m: nn.Module) -> float:   # every rank evaluates; rank 0's decides
        return agree(evaluate(m, self.evals, task=self.cfg.task, reference=self.reference))

    def _fingerprint(self) -> str:
        if self._fp is None:
            self._fp = fingerprint(self.original, self.calib, self.evals)
        return self._fp

    # -------------------------------------------------------------- checkpoints
    def _state(self, next_index: int, finished: bool) -> tuple[dict, dict]:
        tensors = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        plan = [_pack_reduction(r, i, tensors) for i, r in enumerate(self.plan)]
        fits = {n: _pack_fit(n, f, tensors) for n, f in self.fits.items()}
        return {"strategy": "whole", "next_step": next_index, "finished": finished,
                "plan": plan, "history": [r.to_dict() for r in self.history], "fits": fits,
                "current_metric": self.current_metric, "depth": self.depth,
                "original_metric": self.original_metric,
                "original_params": self.original_params,
                "config": self.cfg.fingerprint_dict(),
                "sites": [u.name for u in self.units],
                "fingerprint": self._fingerprint()}, tensors

    def checkpoint(self, next_index: int, finished: bool) -> None:
        self.finished = finished
        if self.checkpoint_dir is None:
            return
        with all_or_none("writing the checkpoint"):   # rank 0 writes; the others wait
            if is_main():
                state, tensors = self._state(next_index, finished)
                write_checkpoint(self.checkpoint_dir, state, tensors, step=next_index)

    def resume(self) -> int:
        start = 0
        if self.checkpoint_dir is not None and self.resuming:
            got = load_checkpoint(self.checkpoint_dir)
            if got is not None:
                state, tensors = got
                self._check_resumable(state)
                self.plan = [_unpack_reduction(d, i, tensors)
                             for i, d in enumerate(state["plan"])]
                model = copy.deepcopy(self.original).eval()
                for r in self.plan:   # the same surgery, then the checkpoint's weights
                    reduce_site(model, r, force=True)
                weights = {k[len("model/"):]: v for k, v in tensors.items()
                           if k.startswith("model/")}
                model.load_state_dict(weights, strict=True)
                self.model = model.to(model_device(self.model)).eval()
                self.history = [StepRecord.from_dict(d) for d in state["history"]]
                self.fits = {n: _unpack_fit(n, d, tensors) for n, d in state["fits"].items()}
                self.current_metric = state["current_metric"]
                self.depth = state.get("depth", self.cfg.past_edge)
                start, self.finished = state["next_step"], state["finished"]
            if self.multi:   # every rank read the checkpoint: all must resume alike
                check_same([start, self.finished], "resume point (next step, finished) in "
                           f"{self.checkpoint_dir}")
        return len(self.units) if self.finished else start

    def _check_resumable(self, state: dict) -> None:
        now = self.cfg.fingerprint_dict()
        # fields added after the checkpoint was written had their defaults then
        old = {**CompressConfig().resolved("whole").fingerprint_dict(), **state["config"]}
        diff = sorted(k for k in set(now) | set(old) if now.get(k) != old.get(k))
        if diff:
            was = ", ".join(f"{k}={old.get(k)!r}" for k in diff)
            new = ", ".join(f"{k}={now.get(k)!r}" for k in diff)
            raise ValueError(f"cannot resume: the checkpoint was written with a different "
                             f"config ({was}; now {new}); pass the same config or start "
                             f"afresh")
        if state["sites"] != [u.name for u in self.units]:
            raise ValueError(f"cannot resume: the checkpoint's sites {state['sites']} differ "
                             f"from this model's; pass the same model")
        if state.get("fingerprint") != self._fingerprint():
            raise ValueError("cannot resume: the checkpoint belongs to another model or "
                             "other data (their fingerprint differs); pass the same model "
                             "and data, or start afresh without resume")

    # -------------------------------------------------------------- the step
    def stop_before(self, unit: Unit) -> bool:
        cfg = self.cfg
        if cfg.max_steps is not None and unit.index >= cfg.max_steps:
            return True
        return (cfg.param_target is not None
                and n_params(self.model) <= cfg.param_target * self.original_params)

    def generators(self) -> tuple:
        return (self.train.gen,)

    def prepare(self, unit: Unit) -> None:
        _contiguous_(self.model)   # as a model read back from a checkpoint: same bits
        site = unit.sites[0]
        module = self.model.get_submodule(site.module_name)
        attr = "embedding_dim" if site.kind == "embedding" else "normalized_shape" \
            if site.kind == "residual" else "out_features" if site.kind == "heads" else \
            ("in_channels" if isinstance(module, nn.Conv2d) else "in_features") \
            if site.where == "input" else \
            ("out_channels" if isinstance(module, nn.Conv2d) else "out_features")
        dim = getattr(module, attr)
        unit.sites = [type(site)(site.name, site.module_name, site.kind,
                                 int(dim[0] if isinstance(dim, tuple) else dim), site.where)]
        self.teacher = copy.deepcopy(self.model).eval()

    def calibrate(self, unit: Unit) -> dict:
        site = unit.sites[0]
        collect = collect_sharded_statistics if self.multi else collect_statistics
        if site.kind == "residual":   # every state of the stream, pooled
            states = [Site(f"{n}:output", n, "linear", site.dim, "output")
                      for n in self.adapter.stream(self.model).states]
            got = collect(self.model, self.calib, states, progress=False,
                          acc_dtype=self.acc_dtype)
            stats = pooled_statistics([got[s.name] for s in states])
            return {site.name: (stats, stats.n)}
        if site.kind == "heads":   # the attention's input; every head's statistics from it
            module = self.model.get_submodule(site.module_name)
            probe = Site(site.name, site.module_name, "linear", module.in_features, "input")
            stats = collect(self.model, self.calib, [probe], progress=False,
                            acc_dtype=self.acc_dtype)[site.name]
            dim = self.adapter.dim_for(self.model, site.name)
            block = self.model.get_submodule(dim.block.name) if dim.block.name else self.model
            n = fit_samples(probe, stats.n, self.n_calib, self.cfg.conv_samples, None)
            return {site.name: (head_statistics(block, dim.block, stats.mean, stats.cov), n)}
        stats = collect(self.model, self.calib, [site], progress=False,
                        acc_dtype=self.acc_dtype)[site.name]
        distinct = distinct_inputs(self.model, self.calib, site.module_name) \
            if site.kind == "embedding" else None
        n = fit_samples(site, stats.n, self.n_calib, self.cfg.conv_samples, distinct)
        return {site.name: (stats, n)}

    def metric(self) -> float:
        return self.current_metric

    def params(self) -> int:
        return n_params(self.model)

    def screen(self, unit: Unit, cuts: list[Cut], recs: list[StepRecord]) -> bool:
        cut, rec = cuts[0], recs[0]
        if cut.fit is not None:
            self.fits[cut.site.name] = cut.fit
        if self.multi:
            check_same([cut.site.name, cut.k, cut.head_ks],
                       "k at this site (site, k, per-head k)")
        if cut.k / cut.d < self.cfg.rho_min:
            rec.status, rec.reason = "skipped", (f"k/d = {cut.k}/{cut.d} < rho_min = "
                                                 f"{self.cfg.rho_min}: stopping")
            return False
        if cut.k < 1:
            rec.status, rec.reason = "skipped", ("no spike above the threshold (k = 0): the "
                                                 "site is left as is")
        # the attempts: past the edge first (when the budget is spent), then the rule's k
        self.shares = [1.0]
        if self.depth is not None and cut.k >= 1:
            k_deep, _ = attempt_k(cut, self.depth)
            if 1 <= k_deep < cut.k:
                self.shares = [self.depth, 1.0]
                # the last site: no site after it needs the slack, so where the deep cut
                # breaks, the k halfway between it and the rule's is tried before the rule's
                mid = 2.0 * self.depth / (self.depth + 1.0)
                if unit.index == len(self.units) - 1 and k_deep < attempt_k(cut, mid)[0] \
                        < cut.k:
                    self.shares = [self.depth, mid, 1.0]
            # short of the edge: half the rule's cut, when the rule's own cut breaks
            k_half, _ = attempt_k(cut, BACKOFF_SHARE)
            if cut.k < k_half < cut.d:
                self.shares.append(BACKOFF_SHARE)
        self.backoff = len(self.shares) - 1
        return True

    def cut(self, unit: Unit, cuts: list[Cut], recs: list[StepRecord], attempt: int
            ) -> bool:
        cut, rec = cuts[0], recs[0]
        if cut.k < 1:
            return False
        share = self.shares[attempt]
        rec.k, rec.head_ks = attempt_k(cut, share)
        rec.attempt, rec.share = attempt, share
        rec.energy = kept_energy(cut, rec.k, rec.head_ks)
        try:
            red = reduction(cut, self.cfg, share)
            result = None if red is None else reduce_site(self.model, red)
        except UnsupportedModuleError as e:
            rec.status, rec.reason = "skipped", str(e)
            return False
        if result is None or not result.applied:
            rec.status = "skipped"
            rec.reason = "nothing to cut" if result is None else result.reason
            return False
        self._last = result
        before = f"{rec.reason}; then " if attempt else ""   # why the last attempt failed
        rec.status, rec.reason = "applied", before + result.reason
        rec.params_after = n_params(self.model)
        rec.metric_reduced = self._metric(self.model)
        return True

    def distil(self, unit: Unit, recs: list[StepRecord]) -> str | None:
        cfg = self.cfg
        min_steps, max_steps = cfg.distill_min_steps, cfg.distill_max_steps
        if unit.sites[0].kind == "residual" and cfg.residual_distill_steps is not None:
            min_steps = max_steps = cfg.residual_distill_steps
        try:   # under DDP: each rank on its shard of every epoch's batch order
            distributed_distill(self.model, self.teacher if self.source is None
                                else self.source, self.train, task=cfg.task,
                                alpha=cfg.alpha, temperature=cfg.temperature, lr=cfg.lr,
                                warmup_steps=cfg.warmup_steps, epochs=cfg.distill_epochs,
                                min_steps=min_steps, max_steps=max_steps,
                                progress=self.progress,
                                data_parallel=cfg.data_parallel,
                                features=cfg.distill_features,
                                feature_weight=cfg.feature_weight,
                                teacher_cache=self.teacher_cache,
                                desc=f"distil {unit.sites[0].module_name}")
        except NonFiniteLossError as e:
            return f"distillation diverged: {e}"
        return None

    def judge(self, unit: Unit, recs: list[StepRecord]) -> str | None:
        rec = recs[0]
        rec.metric_after = self._metric(self.model)
        if math.isnan(rec.metric_after):
            return "the distilled model's outputs are NaN/Inf"
        drop = self.original_metric - rec.metric_after
        deep = f"{rec.share:g}x past the edge: " if rec.share > 1.0 else ""
        if drop > self.cfg.epsilon:
            return (f"{deep}metric {rec.metric_after:.2f} is {drop:.2f} points below the "
                    f"original {self.original_metric:.2f} (epsilon = {self.cfg.epsilon})")
        if deep:   # past the edge: at most this site's share of the budget left
            slack = self.current_metric - (self.original_metric - self.cfg.epsilon)
            floor = self.current_metric - max(slack, 0.0) / (len(self.units) - unit.index)
            if rec.metric_after < floor:
                return (f"{deep}metric {rec.metric_after:.2f} is below {floor:.2f}, this "
                        f"site's share of the budget left")
        return None

    def accept(self, unit: Unit, recs: list[StepRecord]) -> None:
        self.plan.append(self._last.reduction)
        self.current_metric = recs[0].metric_after
        if recs[0].share > 1.0:   # the budget held past the edge: the next site goes further
            self.depth = 1.0 + (self.depth - 1.0) * DEPTH_GROWTH

    def rollback(self, unit: Unit, recs: list[StepRecord]) -> None:
        self.model = self.teacher   # the model just before this step
        self.teacher = copy.deepcopy(self.model).eval()
        if recs[0].share > 1.0:   # too deep here: the next sites go half as far past
            self.depth = 1.0 + (self.depth - 1.0) / 2

    def finish(self, unit: Unit, recs: list[StepRecord]) -> None:
        recs[0].params_after = n_params(self.model)

    def stop_after(self, unit: Unit, recs: list[StepRecord]) -> bool:
        if recs[0].status == "rolled back" and self.cfg.on_violation == "stop":
            recs[0].reason += "; stopping (on_violation='stop')"
            return True
        return False

    def result(self) -> CompressionResult:
        self.model.eval()
        if self.multi:
            check_same_plan(self.history)
        cfg = self.cfg
        return CompressionResult(
            self.model, self.plan, self.history, self.fits, self.original_metric,
            self.current_metric, self.original_params, n_params(self.model), config=cfg,
            metric_name="accuracy (%)" if cfg.task == "classification"
            else "cosine similarity to the original (%)")


@torch.no_grad()
def _contiguous_(model: nn.Module) -> None:
    """Make every parameter and buffer contiguous in place (surgery may leave transposed
    views; matmuls on them round differently from the contiguous copies a checkpoint holds)."""
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None and not p.is_contiguous():
                p.data = p.data.contiguous()
        for name, b in m._buffers.items():
            if b is not None and not b.is_contiguous():
                m._buffers[name] = b.contiguous()


def compress(model: nn.Module, train_data: Any, *, eval_data: Any = None,
             calib_data: Any = None, config: CompressConfig | None = None,
             checkpoint_dir: Any = None, resume: bool = False) -> CompressionResult:
    """Compress a copy of ``model`` with RMT-KD (see the module docstring for the flow).

    Args:
        model: a trained network (not modified; its outputs on the data must be logits for
            task "classification", embeddings for "embedding").
        train_data: (inputs, labels) batches (DataLoader or list) or a torch Dataset of
            (input, label) samples; distillation trains on it and, without ``calib_data``,
            the calibration subset is drawn from it.
        eval_data: like ``train_data``; the metric is measured on it (default: train_data).
        calib_data: calibration batches (default: ``calib_fraction`` of train_data).
        config: a :class:`CompressConfig`.
        checkpoint_dir: a directory where, after every finished step, a checkpoint is
            written atomically (:mod:`rmtkd.checkpoint`: JSON + safetensors, no pickles).
        resume: continue from the last checkpoint in ``checkpoint_dir`` (the same model,
            data and config: their fingerprint is checked). Without a checkpoint there the
            run starts from the beginning. Every random choice of a step is seeded from
            ``(config.seed, step)``, so a resumed run ends with the same model.

    Returns:
        A :class:`CompressionResult`.

    Raises:
        ValueError: bad config, no sites, missing labels, empty data, a checkpoint of
            another job.
        CalibrationError: a batch does not fit the model.
        UnsupportedArchitectureError: a Hugging Face model no adapter recognises.
    """
    cfg = (config if config is not None else CompressConfig()).resolved("whole")
    cfg.validate()
    s = WholeModel(model, train_data, eval_data, calib_data, cfg, checkpoint_dir, resume)
    run(s)
    return s.result()
