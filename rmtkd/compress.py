"""RMT-KD end to end: causal, layer-by-layer reduction with self-distillation.

``compress(model, train_data, eval_data=..., config=CompressConfig(...))`` works on a copy of
``model`` (the caller's model is not changed). Sites are found once (shallow to deep); for
each, in order:

1. teacher = a frozen copy of the current model (the model just before this step);
2. calibrate the current model on a fixed, seeded calibration subset (``calib_fraction``
   of the training data, or ``calib_data``) and fit the spectrum of the site
   (:func:`rmtkd.spikes`): k spike directions above the Marchenko-Pastur edge;
3. stop if k/d < rho_min; reduce (:func:`rmtkd.reduce.reduce_site`; a reduction that
   would not reduce parameters is recorded as skipped);
4. self-distil from the teacher (:func:`rmtkd.distill.distill`);
5. if the metric dropped more than ``epsilon`` points below the original model's, or the
   loss became NaN/Inf, roll back to the teacher; then ``on_violation`` = "skip" moves on
   to the next site and "stop" ends the run;
6. stop once ``params <= param_target * original`` or ``max_steps`` steps were tried.

The metric is accuracy in % (task "classification") or the mean cosine similarity in % of
the outputs to the original model's outputs (task "embedding"), on ``eval_data`` (the
training data when None).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, rng_states, set_rng_states, write_checkpoint
from .capture import CalibrationError, collect_statistics, find_sites, make_site
from .capture.sites import (CONV_SAMPLES, _describe, batch_size, batch_to, fit_samples,
                             model_device)
from .distill.trainer import (TASKS, NonFiniteLossError, batch_labels, model_inputs,
                              model_output)
from .distributed import (DATA_PARALLEL, agree, all_or_none, check_same, check_same_plan,
                          collect_sharded_statistics, distributed_distill, is_distributed,
                          is_main)
from .reduce import Reduction, UnsupportedModuleError, head_reduction, reduce_site
from .reduce.bert import bert_site
from .reduce.plan import MODES, SURGERIES, n_params
from .spectral import SpectrumFit, spikes
from .rank_rules import choose_k, parse_rule, top_eigenvectors
from .spectral.estimators import DEFAULT_MARGIN

ON_VIOLATION = ("skip", "stop")
DISTIL_FROM = ("previous", "original")
ACC_DTYPES = ("float32", "float64")
DATASET_BATCH_SIZE = 64


@dataclass
class CompressConfig:
    """Settings of :func:`compress` (defaults follow the paper, see PAPER.md).

    mode: "width" (the paper's: cut producer outputs and consumer inputs to k) or "project"
    (consumer -> rmtkd.nn.ProjectedLinear / 1x1 projection conv).
    width_surgery: how width mode cuts (:func:`rmtkd.reduce.plan.width_maps`): "rotate"
    onto the spike directions (the paper's; exact for a linear producer -> consumer chain),
    "select" the k producer units spanning them best (the kept units pass an elementwise
    nonlinearity unchanged) or "auto" (the default: select through a nonlinearity, rotate
    otherwise; on the digits MLP it keeps 95% accuracy right after the cut, rotating 47%).
    estimator, margin, solver: of :func:`rmtkd.spikes`.
    sites: fnmatch globs on module names (None: every hidden Linear/Conv2d input).
    calib_fraction: share of the training data used to calibrate (seeded, the same subset
    at every step).
    conv_samples: what the MP fit of a conv site counts as samples, "images" (default) or
    "positions" (:func:`rmtkd.capture.sites.fit_samples`).
    acc_dtype: covariance accumulation dtype, "float32" or "float64" (fp64 makes the fit
    reproducible to ~1e-12 across process counts; fp32 to the fp32 rounding of the bulk).
    task: "classification" or "embedding". alpha, temperature: of kd_loss.
    lr, warmup_steps, distill_epochs, distill_min_steps: the distillation after each
    reduction step (:func:`rmtkd.distill.distill`: at least distill_min_steps optimizer
    steps, so small data sets get more than 3 short epochs).
    distill_features, feature_weight: fnmatch globs of modules whose outputs the student
    also matches to the teacher's during distillation (``feature_weight`` times the mean
    relative squared error, :func:`rmtkd.distill.feature_loss`), e.g.
    ``["bert.encoder.layer.?"]`` (each BERT layer's hidden states); None: the task loss
    alone. The outputs must keep their shape through the cuts.
    distil_from: the teacher of each step's distillation: "previous" (the paper's: the model
    just before the step) or "original" (the uncompressed model, so each step also repairs
    the drift of the earlier ones; the roll-back target stays the previous model).
    data_parallel: under torch.distributed, "ddp" (a full student per rank) or "fsdp"
    (parameters, gradients and optimizer state sharded during distillation; surgery still
    needs the whole model on every rank) (:func:`rmtkd.distributed.distributed_distill`).
    epsilon: largest allowed metric drop (points) against the original model.
    rho_min: stop when k/d < rho_min. param_target: stop when parameters <= param_target *
    original. max_steps: most reduction steps tried. on_violation: "skip" or "stop" after a
    rolled-back step.
    rank_rule: how k is chosen at each site (:mod:`rmtkd.rank_rules`): "mp" (the spikes
    above the Marchenko-Pastur threshold, the paper's), or the heuristic baselines
    "energy:<f>" (top directions holding fraction f of the variance) and "uniform:<r>"
    (k = max(1, round(r * d))). BERT attention sites fit k per head.
    """

    mode: str = "width"
    width_surgery: str = "auto"
    estimator: str = "auto"
    margin: float | str = DEFAULT_MARGIN
    solver: str = "auto"
    sites: list[str] | None = None
    calib_fraction: float = 0.1
    conv_samples: str = "images"
    acc_dtype: str = "float32"
    task: str = "classification"
    alpha: float = 0.7
    temperature: float = 1.0
    lr: float = 1e-3
    warmup_steps: int = 20
    distill_epochs: int = 3
    distill_min_steps: int = 200
    distill_features: list[str] | None = None
    feature_weight: float = 1.0
    distil_from: str = "previous"
    data_parallel: str = "ddp"
    epsilon: float = 2.0
    rho_min: float = 0.0
    param_target: float | None = None
    max_steps: int | None = None
    on_violation: str = "skip"
    rank_rule: str = "mp"
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the first invalid setting."""
        for name, allowed in (("mode", MODES), ("width_surgery", SURGERIES),
                              ("conv_samples", CONV_SAMPLES), ("acc_dtype", ACC_DTYPES),
                              ("task", TASKS), ("distil_from", DISTIL_FROM),
                              ("data_parallel", DATA_PARALLEL),
                              ("on_violation", ON_VIOLATION)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, "
                                 f"got {getattr(self, name)!r}")
        if not 0.0 < self.calib_fraction <= 1.0:
            raise ValueError(f"calib_fraction must be in (0, 1], got {self.calib_fraction}")
        if self.param_target is not None and not 0.0 < self.param_target <= 1.0:
            raise ValueError(f"param_target must be in (0, 1], got {self.param_target}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if self.distill_epochs < 0 or self.warmup_steps < 0 or self.distill_min_steps < 0:
            raise ValueError("distill_epochs, distill_min_steps and warmup_steps must be >= 0")
        if self.feature_weight < 0:
            raise ValueError(f"feature_weight must be >= 0, got {self.feature_weight}")
        if self.distill_features is not None and (
                isinstance(self.distill_features, str)
                or not all(isinstance(p, str) for p in self.distill_features)):
            raise ValueError(f"distill_features must be a list of module-name globs, got "
                             f"{self.distill_features!r}")
        if not 0.0 <= self.rho_min <= 1.0:
            raise ValueError(f"rho_min must be in [0, 1], got {self.rho_min}")
        parse_rule(self.rank_rule)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class StepRecord:
    """One site's step. metric_reduced: after surgery, before distillation. status:
    "applied", "skipped" (nothing changed) or "rolled back" (reason says why)."""

    site: str
    mode: str
    d: int
    k: int
    estimator: str
    sigma2: float
    lambda_plus: float
    threshold: float
    params_before: int
    params_after: int
    metric_before: float
    metric_reduced: float = math.nan
    metric_after: float = math.nan
    seconds: float = 0.0
    status: str = "skipped"
    reason: str = ""
    rank_rule: str = "mp"   # how k was chosen (rmtkd.rank_rules); mp_k: the MP spike count
    mp_k: int | None = None
    gamma: float | None = None   # d / n of the fit; > 1: fewer calibration samples than d

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in dataclasses.asdict(self).items()}


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


# ----------------------------------------------------------------------------- data


class _Batches:
    """Re-iterable batches from a DataLoader, a list of batches, an iterator (read once and
    kept) or a torch Dataset (wrapped in a DataLoader). ``shuffle`` reorders a list's
    batches (or a Dataset's samples) with a seeded generator, a new order every pass."""

    def __init__(self, data: Any, *, what: str, shuffle: bool = False, seed: int = 0) -> None:
        from torch.utils.data import DataLoader, Dataset, IterableDataset

        self.gen = torch.Generator().manual_seed(seed)
        self.shuffle = shuffle
        if isinstance(data, (torch.Tensor, str, bytes)) or data is None:
            raise TypeError(f"{what}: expected a DataLoader, a list of (inputs, labels) "
                            f"batches or a torch Dataset, got {type(data).__name__}")
        if isinstance(data, Dataset) and not isinstance(data, (list, tuple)):
            iterable = isinstance(data, IterableDataset)
            data = DataLoader(data, batch_size=DATASET_BATCH_SIZE,
                              shuffle=shuffle and not iterable,
                              generator=self.gen if shuffle and not iterable else None)
        elif iter(data) is data:   # a generator / iterator: keep its batches
            data = list(data)
        self.data = data
        if hasattr(data, "__len__") and len(data) == 0:
            raise ValueError(f"{what} is empty: pass at least one batch")

    def __iter__(self) -> Iterator[Any]:
        if self.shuffle and isinstance(self.data, (list, tuple)):
            order = torch.randperm(len(self.data), generator=self.gen).tolist()
            return iter([self.data[i] for i in order])
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


def _rows(batch: Any, mask: torch.Tensor) -> Any:
    """The rows of a batch selected by a bool mask (tensors along dim 0)."""
    pick = lambda v: v[mask] if isinstance(v, torch.Tensor) and v.dim() > 0 \
        and v.shape[0] == mask.shape[0] else v  # noqa: E731
    if isinstance(batch, torch.Tensor):
        return pick(batch)
    if isinstance(batch, (tuple, list)):
        return type(batch)(pick(v) for v in batch)
    if isinstance(batch, Mapping):
        return {k: pick(v) for k, v in batch.items()}
    raise TypeError(f"a batch must be a tensor, an (inputs, labels) tuple or a dict, "
                    f"got {type(batch).__name__}")


def calibration_subset(train_data: Any, fraction: float, seed: int = 0) -> list[Any]:
    """A fixed, seeded ``fraction`` of the training samples, as a list of batches.

    A torch Dataset gives a random subset of ``ceil(fraction * len)`` samples; batches
    (DataLoader, list) give every batch's rows kept with probability ``fraction`` (at least
    2 samples overall), read once in the data's own order.
    """
    from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

    gen = torch.Generator().manual_seed(seed)
    if (isinstance(train_data, Dataset) and not isinstance(train_data, IterableDataset)
            and not isinstance(train_data, (list, tuple))):
        m = max(2, math.ceil(fraction * len(train_data)))
        idx = torch.randperm(len(train_data), generator=gen)[:m].sort().values.tolist()
        return list(DataLoader(Subset(train_data, idx), batch_size=256))
    out = []
    for batch in _Batches(train_data, what="train_data"):
        b = batch_size(batch)
        keep = torch.rand(b, generator=gen) < fraction if fraction < 1 else torch.ones(
            b, dtype=torch.bool)
        if bool(keep.any()):
            out.append(_rows(batch, keep))
    if sum(batch_size(b) for b in out) < 2:   # tiny data: fall back to the first batches
        out = list(_Batches(train_data, what="train_data"))
    return out


# --------------------------------------------------------------------------- metric


def _expected_input(model: nn.Module) -> str:
    for _, m in model.named_modules():
        if isinstance(m, nn.Linear):
            return f"[batch, ..., {m.in_features}] float"
        if isinstance(m, nn.Conv2d):
            return f"[batch, {m.in_channels}, H, W] float"
        if isinstance(m, nn.Embedding):
            return "[batch, seq] integer token ids"
    return "what the model's forward takes"


def _forward(model: nn.Module, batch: Any, index: int, what: str) -> torch.Tensor:
    args, kwargs = batch_to(*model_inputs(batch), model_device(model))
    try:
        return model_output(model(*args, **kwargs))
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise CalibrationError(
            f"forward pass failed on {what} batch {index} ({_describe(args, kwargs)}); "
            f"expected inputs of shape {_expected_input(model)}: {e}") from e


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Any], *, task: str = "classification",
             reference: nn.Module | None = None, what: str = "evaluation") -> float:
    """Accuracy in % (classification; batches need labels), or for "embedding" the mean
    cosine similarity in % between ``model``'s and ``reference``'s outputs.
    NaN when the outputs are not finite."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i, batch in enumerate(batches):
            out = _forward(model, batch, i, what)
            if not bool(torch.isfinite(out).all()):
                return math.nan
            if task == "classification":
                labels = batch_labels(batch)
                if labels is None:
                    raise ValueError(f"{what} batch {i} has no labels; classification needs "
                                     f"(inputs, labels) batches")
                logits = out.reshape(-1, out.shape[-1])
                labels = labels.reshape(-1).to(logits.device)
                if labels.shape[0] != logits.shape[0]:
                    raise ValueError(f"{what} batch {i}: {labels.shape[0]} labels for "
                                     f"{logits.shape[0]} rows of logits {tuple(out.shape)}; "
                                     f"expected labels of shape [{logits.shape[0]}]")
                total += (logits.argmax(-1) == labels).sum().item()
                count += labels.shape[0]
            else:
                ref = _forward(reference, batch, i, what)
                d = out.shape[-1]
                cos = nn.functional.cosine_similarity(out.reshape(-1, d).float(),
                                                      ref.reshape(-1, d).float(), dim=-1)
                total += cos.sum().item()
                count += cos.numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError(f"{what} data is empty: pass at least one batch")
    return 100.0 * total / count


# ------------------------------------------------------------------------- compress


def _attention_heads(model: nn.Module, module_name: str) -> int | None:
    """The head count when ``module_name`` is a BERT attention output (per-head site)."""
    try:
        found = bert_site(model, module_name)
    except UnsupportedModuleError:
        return None
    if found is None or found[0] != "attention":
        return None
    return int(model.get_submodule(found[1]).attention.self.num_attention_heads)


def _head_ks(cov: torch.Tensor, heads: int, n: int, cfg: "CompressConfig") -> list[int]:
    """k per head: the rank rule on each head's diagonal block of the site covariance."""
    d = cov.shape[0]
    hd = d // heads
    ks = []
    for h in range(heads):
        block = cov[h * hd:(h + 1) * hd, h * hd:(h + 1) * hd]
        fit = spikes(block, n, estimator=cfg.estimator, margin=cfg.margin, solver="full",
                     seed=cfg.seed)
        k = fit.k
        if parse_rule(cfg.rank_rule)[0] != "mp":
            k = choose_k(cfg.rank_rule, fit, hd, eigenvalues=top_eigenvectors(block)[0])
        ks.append(int(k))
    return ks


def _record(site: Any, fit: SpectrumFit, mode: str, params: int, metric: float
            ) -> StepRecord:
    """The step's record; warns (SmallSampleWarning) when the site's fit had gamma > 1."""
    from .analysis import warn_small_samples

    warn_small_samples({site.name: fit}, stacklevel=3)
    return StepRecord(site.name, mode, site.dim, fit.k, fit.estimator, float(fit.sigma2),
                      float(fit.lambda_plus), float(fit.threshold), params, params, metric,
                      gamma=float(fit.gamma))


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
        checkpoint_dir: a directory where, after every finished step (applied, skipped or
            rolled back), a checkpoint is written atomically (see :mod:`rmtkd.checkpoint`
            in this module: the current model in the :func:`rmtkd.save` format, the history,
            plan and fits so far, the next site's index and the RNG states).
        resume: continue from the last checkpoint in ``checkpoint_dir`` (pass the same
            model, data and config; a config that differs raises ValueError). Without a
            checkpoint there the run starts from the beginning. Every random choice of a
            step is seeded from ``(config.seed, step)``, so a resumed run ends with the same
            model as an uninterrupted one.

    Returns:
        A :class:`CompressionResult`.

    Raises:
        ValueError: bad config, no sites, missing labels, empty data.
        CalibrationError: a batch does not fit the model (names the batch and the expected
            input shape).
    """
    cfg = config if config is not None else CompressConfig()
    cfg.validate()
    # torch.distributed with > 1 rank (rmtkd.distributed): sharded calibration merged
    # exactly, DDP distillation on sharded batches, rank 0 shows progress and checkpoints
    multi = is_distributed()
    acc_dtype = getattr(torch, cfg.acc_dtype)
    progress = cfg.progress and is_main()
    torch.manual_seed(cfg.seed)
    original = model
    model = copy.deepcopy(model).eval()
    train = _Batches(train_data, what="train_data", shuffle=True, seed=cfg.seed)
    evals = _Batches(eval_data if eval_data is not None else train_data, what="eval_data")
    calib = (list(_Batches(calib_data, what="calib_data")) if calib_data is not None
             else calibration_subset(train_data, cfg.calib_fraction, cfg.seed))
    if not calib:
        raise ValueError("the calibration data is empty: pass calib_data or more train_data")
    n_calib = sum(batch_size(b) for b in calib)

    # Embedding metric: similarity to the original model's outputs (a frozen eval copy).
    reference = copy.deepcopy(original).eval() if cfg.task == "embedding" else None
    # distil_from="original": every step distils from the original model (a frozen copy)
    source = None
    if cfg.distil_from == "original":
        source = reference if reference is not None else copy.deepcopy(original).eval()

    def metric(m: nn.Module) -> float:   # every rank evaluates; rank 0's value decides
        return agree(evaluate(m, evals, task=cfg.task, reference=reference))

    original_metric = metric(model)
    original_params = n_params(model)
    current_metric = original_metric
    sites = find_sites(model, calib[0], include=cfg.sites)
    if not sites:
        raise ValueError("no sites to reduce: the model has no nn.Linear/nn.Conv2d with a "
                         "hidden input of >= 2 features; name modules with sites=[...]")

    plan: list[Reduction] = []
    history: list[StepRecord] = []
    fits: dict[str, SpectrumFit] = {}
    site_names = [s.module_name for s in sites]
    start, finished = 0, False
    if checkpoint_dir is not None and resume:
        state = load_checkpoint(checkpoint_dir)
        if state is not None:
            _check_resumable(state, cfg, site_names)
            model = state["model"].to(model_device(model)).eval()
            plan, history, fits = state["plan"], state["history"], state["fits"]
            current_metric = state["current_metric"]
            start, finished = state["next_step"], state["finished"]
            set_rng_states(state["rng"])
        if multi:   # every rank read the checkpoint: all must resume at the same step
            check_same([start, finished], "resume point (next step, finished) in "
                       f"{checkpoint_dir}")

    def checkpoint(next_step: int, done_all: bool) -> None:
        if checkpoint_dir is None:
            return
        with all_or_none("writing the checkpoint"):   # rank 0 writes; the others wait
            if is_main():
                write_checkpoint(checkpoint_dir, model, {
                    "next_step": next_step, "finished": done_all, "plan": plan,
                    "history": history, "fits": fits, "current_metric": current_metric,
                    "original_metric": original_metric, "original_params": original_params,
                    "config": _resume_config(cfg), "sites": site_names,
                    "rng": rng_states()})

    bar = tqdm(total=len(sites), initial=start, desc="compress", unit="site",
               disable=not progress)
    for step in range(start, len(sites)):
        if finished:
            break
        site0 = sites[step]
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break
        if (cfg.param_target is not None
                and n_params(model) <= cfg.param_target * original_params):
            break
        _seed_step(cfg.seed, step, train)
        _contiguous_(model)   # as a model read back from a checkpoint: same kernels, same bits
        t0 = time.perf_counter()
        site = make_site(site0.module_name, model.get_submodule(site0.module_name))
        bar.set_postfix_str(site.name)
        teacher = copy.deepcopy(model).eval()
        if multi:   # each rank streams its shard of calib; the moments are merged exactly
            stats = collect_sharded_statistics(model, calib, [site], progress=False,
                                               acc_dtype=acc_dtype)[site.name]
        else:
            stats = collect_statistics(model, calib, [site], progress=False,
                                       acc_dtype=acc_dtype)[site.name]
        n_fit = fit_samples(site, stats.n, n_calib, cfg.conv_samples)
        fit = spikes(stats.cov, n_fit, estimator=cfg.estimator, margin=cfg.margin,
                     solver=cfg.solver, seed=cfg.seed)
        fits[site.name] = fit
        rec = _record(site, fit, cfg.mode, n_params(model), current_metric)
        rec.rank_rule, rec.mp_k = cfg.rank_rule, fit.k
        k, basis = fit.k, None
        heads = _attention_heads(model, site.module_name) if cfg.mode == "width" else None
        head_ks = None
        if heads is not None:
            # BERT attention value/output: width mode cuts per head, so k is fitted per head
            # on the head's diagonal block of the covariance (a global basis would touch
            # every head's dimensions and remove nothing).
            head_ks = _head_ks(stats.cov, heads, n_fit, cfg)
            k = rec.k = sum(head_ks)
        elif parse_rule(cfg.rank_rule)[0] != "mp":
            # the heuristic baselines: k from the full spectrum, the top-k eigenvectors of
            # the site covariance (spikes() only returns the MP spike directions)
            vals, vecs = top_eigenvectors(stats.cov)
            k = choose_k(cfg.rank_rule, fit, site.dim, eigenvalues=vals)
            dtype = stats.cov.dtype if stats.cov.dtype.is_floating_point else torch.float32
            basis = vecs[:, :k].to(dtype=dtype, device=stats.cov.device)
            rec.k = k
        history.append(rec)
        if multi:
            check_same([site.name, k, head_ks], "k at this site (site, k, per-head k)")

        def done(status: str, reason: str) -> None:
            rec.status, rec.reason = status, reason
            rec.params_after = n_params(model)
            rec.seconds = time.perf_counter() - t0

        stop = False
        if k / site.dim < cfg.rho_min:
            done("skipped", f"k/d = {k}/{site.dim} < rho_min = {cfg.rho_min}: stopping")
            stop = True
        elif k < 1:
            done("skipped", "no spike above the threshold (k = 0): the site is left as is")
        else:
            try:
                if head_ks is not None:
                    reduction = head_reduction(site.name, site.module_name, stats.cov, heads,
                                               head_ks, mean=torch.as_tensor(stats.mean))
                elif basis is None:
                    reduction = Reduction.from_fit(site, fit, stats, cfg.mode,
                                                   cfg.width_surgery)
                else:
                    reduction = Reduction.from_basis(site, basis, stats, cfg.mode,
                                                     cfg.width_surgery)
                result = reduce_site(model, reduction)
            except UnsupportedModuleError as e:
                done("skipped", str(e))
                result = None
            if result is not None and not result.applied:
                done("skipped", result.reason)
            elif result is not None:
                rec.metric_reduced = metric(model)
                violation = None
                try:   # under DDP: each rank on its shard of every epoch's batch order
                    distributed_distill(model, teacher if source is None else source,
                                        train, task=cfg.task,
                                        alpha=cfg.alpha, temperature=cfg.temperature,
                                        lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                                        epochs=cfg.distill_epochs,
                                        min_steps=cfg.distill_min_steps, progress=progress,
                                        data_parallel=cfg.data_parallel,
                                        features=cfg.distill_features,
                                        feature_weight=cfg.feature_weight,
                                        desc=f"distil {site.module_name}")
                    rec.metric_after = metric(model)
                    if math.isnan(rec.metric_after):
                        violation = "the distilled model's outputs are NaN/Inf"
                    elif original_metric - rec.metric_after > cfg.epsilon:
                        violation = (f"metric {rec.metric_after:.2f} is "
                                     f"{original_metric - rec.metric_after:.2f} points below "
                                     f"the original {original_metric:.2f} "
                                     f"(epsilon = {cfg.epsilon})")
                except NonFiniteLossError as e:
                    violation = f"distillation diverged: {e}"
                if violation is not None:
                    model = teacher   # the model just before this step
                    done("rolled back", f"{result.reason}; rolled back: {violation}")
                    if cfg.on_violation == "stop":
                        rec.reason += "; stopping (on_violation='stop')"
                        stop = True
                else:
                    done("applied", result.reason)
                    plan.append(result.reduction)
                    current_metric = rec.metric_after
        bar.update(1)
        checkpoint(step + 1, stop or step + 1 == len(sites))
        if stop:
            break
    bar.close()
    model.eval()
    if multi:
        check_same_plan(history)
    return CompressionResult(model, plan, history, fits, original_metric, current_metric,
                             original_params, n_params(model), config=cfg,
                             metric_name="accuracy (%)" if cfg.task == "classification"
                             else "cosine similarity to the original (%)")


# ------------------------------------------------------------ step seeds / resume
def _step_seed(seed: int, step: int) -> int:
    import hashlib

    digest = hashlib.sha256(f"rmtkd-compress:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _seed_step(seed: int, step: int, train: "_Batches") -> None:
    """Seed every random choice of step ``step`` (dropout, shuffling) from (seed, step)."""
    import random

    import numpy as np

    s = _step_seed(seed, step)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)
    train.gen.manual_seed(s)


@torch.no_grad()
def _contiguous_(model: nn.Module) -> None:
    """Make every parameter and buffer contiguous in place (surgery may leave transposed
    views; matmuls on them round differently from the contiguous copies a checkpoint holds)."""
    for m in model.modules():
        for name, p in m._parameters.items():
            if p is not None and not p.is_contiguous():
                p.data = p.data.contiguous()
        for name, b in m._buffers.items():
            if b is not None and not b.is_contiguous():
                m._buffers[name] = b.contiguous()


def _resume_config(cfg: CompressConfig) -> dict:
    d = cfg.to_dict()
    d.pop("progress", None)
    return d


def _check_resumable(state: dict, cfg: CompressConfig, site_names: list[str]) -> None:
    now = _resume_config(cfg)
    # fields added after the checkpoint was written had their defaults then
    state = {**state, "config": {**_resume_config(CompressConfig()), **state["config"]}}
    diff = sorted(k for k in set(now) | set(state["config"])
                  if now.get(k) != state["config"].get(k))
    if diff:
        old = state["config"]
        was = ", ".join(f"{k}={old.get(k)!r}" for k in diff)
        new = ", ".join(f"{k}={now.get(k)!r}" for k in diff)
        raise ValueError(f"cannot resume: the checkpoint was written with a different config "
                         f"({was}; now {new}); pass the same config or start afresh")
    if state["sites"] != site_names:
        raise ValueError(f"cannot resume: the checkpoint's sites {state['sites']} differ from "
                         f"this model's {site_names}; pass the same model")


# --------------------------------------------------------------------------- report


def first_sample(batches: Any) -> Any:
    """The first sample of the first batch, as a batch of one (tensor, tuple or dict). A dict
    batch with a right-padded 2-d ``attention_mask`` is cut to the sample's own length: a
    batch of one needs no padding, and timing pad tokens would time the wrong input."""
    batch = next(iter(batches))
    args, kwargs = model_inputs(batch)
    one = lambda v: v[:1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v  # noqa: E731
    if not kwargs:
        return one(args[0])
    out = {k: one(v) for k, v in kwargs.items()}
    mask = out.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        n, t = int(mask.sum()), mask.shape[1]
        if 0 < n < t and bool(mask[0, :n].all()):   # right padding only
            out = {k: v[:, :n] if isinstance(v, torch.Tensor) and v.dim() >= 2
                   and v.shape[1] == t else v for k, v in out.items()}
    return out


def input_shape(example: Any) -> list[int]:
    """The shape of ``example``'s main input (a tensor, the first of a tuple, or a dict's
    ``input_ids`` / first tensor), for reports."""
    args, kwargs = model_inputs(example)
    if kwargs:
        v = kwargs.get("input_ids")
        if not isinstance(v, torch.Tensor):
            v = next((x for x in kwargs.values() if isinstance(x, torch.Tensor)), None)
    else:
        v = args[0] if args else None
    return list(v.shape) if isinstance(v, torch.Tensor) else []


def latency_ms(model: nn.Module, example: Any, *, passes: int = 200, warmup: int = 20
               ) -> float:
    """Median wall time in ms of one forward pass on ``example`` (a tensor, an (inputs,
    labels) tuple or a dict of keyword arguments; no gradients, eval mode) over ``passes``
    passes after ``warmup`` untimed ones."""
    args, kwargs = batch_to(*model_inputs(example), model_device(model))
    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.no_grad():
            for i in range(warmup + passes):
                t0 = time.perf_counter()
                model(*args, **kwargs)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    times.sort()
    return 1e3 * times[len(times) // 2]


def latency_pair(before: nn.Module, after: nn.Module, example: Any, *, passes: int = 200
                 ) -> tuple[float, float, dict[str, list[float]]]:
    """Batch-1 latencies (ms) of two models on ``example``: :func:`latency_ms` of each in
    turn, then once more in reverse order, and the lower median of each model's two rounds
    (a load drift on a shared machine shows as a difference between the rounds, returned
    as ``{"before": [ms, ms], "after": [ms, ms]}``)."""
    rounds: dict[str, list[float]] = {"before": [], "after": []}
    models = {"before": before, "after": after}
    for order in (("before", "after"), ("after", "before")):
        for k in order:
            rounds[k].append(latency_ms(models[k], example, passes=passes))
    return min(rounds["before"]), min(rounds["after"]), rounds


def saved_size(obj: Any) -> int | None:
    """Bytes on disk of ``rmtkd.save(obj, ...)`` (a model or a CompressionResult), or None
    when that format cannot describe the model."""
    import tempfile
    from pathlib import Path

    from .io import UnsupportedModelError, save

    with tempfile.TemporaryDirectory(prefix="rmtkd-size-") as tmp:
        try:
            return _dir_bytes(save(obj, Path(tmp) / "model"))
        except UnsupportedModelError:
            return None


def _dir_bytes(path: Any) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


_STEP_COLUMNS = ("site", "d -> k", "estimator", "sigma^2", "lambda_+", "params before",
                 "params after", "metric before", "after surgery", "after KD", "time (s)",
                 "status")


def _fmt(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def _step_cells(r: StepRecord) -> list[str]:
    return [r.site, f"{r.d} -> {r.k}", r.estimator, f"{r.sigma2:.4g}", f"{r.lambda_plus:.4g}",
            f"{r.params_before:,}", f"{r.params_after:,}", _fmt(r.metric_before),
            _fmt(r.metric_reduced), _fmt(r.metric_after), f"{r.seconds:.2f}", r.status]


def format_history(history: list[StepRecord], markdown: bool = False) -> str:
    """The per-step table (console, or markdown with ``markdown=True``)."""
    rows = [list(_STEP_COLUMNS)] + [_step_cells(r) for r in history]
    if markdown:
        rows.insert(1, ["---"] * len(_STEP_COLUMNS))
        return "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |"
                         for r in rows)
    widths = [max(len(r[i]) for r in rows) for i in range(len(_STEP_COLUMNS))]
    left = (0, 2, 11)
    fmt = lambda r: "  ".join(c.ljust(w) if i in left else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([fmt(rows[0]), "  ".join("-" * w for w in widths)]
                     + [fmt(r) for r in rows[1:]])


def write_compress_report(out_dir: Any, result: CompressionResult, *, meta: dict,
                          summary: dict, force: bool = False) -> Any:
    """Write report.json, index.md, one spectrum PNG per step and the compressed model
    (``model/``, the :func:`rmtkd.save` format; ``model.pt``, a pickled module, where that
    format cannot describe it) into ``out_dir``, atomically (a temporary sibling renamed at
    the end). ``summary["table"]`` (optional) is a dict of printable lines; the size on disk
    of the saved model is added to ``summary`` (``bytes_after``, and the table line when
    ``summary["bytes_before"]`` is set). Raises FileExistsError when ``out_dir`` exists and
    ``force`` is False."""
    import json
    from pathlib import Path

    from ._fs import atomic_directory
    from .report import _file_names, _json_default, plot_site

    out = Path(out_dir)
    if (out.exists() or out.is_symlink()) and not force:
        raise FileExistsError(f"{out} already exists; pass --force (force=True) to replace "
                              f"it, or choose another output directory")
    with atomic_directory(out) as tmp:
        files = _file_names([r.site for r in result.history])
        from .io import UnsupportedModelError, save

        try:
            saved = save(result, tmp / "model")
            summary["bytes_after"] = _dir_bytes(saved)
            how = ("`model/` holds the compressed model in the rmtkd.save format (safetensors "
                   "+ plan.json): `rmtkd.load('model')` rebuilds it without the original "
                   "code or checkpoint.")
        except UnsupportedModelError as e:
            torch.save(result.model, tmp / "model.pt")
            summary["bytes_after"] = None
            how = (f"`model.pt` holds the pickled compressed module (torch.load; its classes "
                   f"must be importable): rmtkd.save cannot describe it ({e}).")
        if summary.get("bytes_before") is not None and summary["bytes_after"] is not None:
            summary.setdefault("table", {})["size on disk (rmtkd.save)"] = (
                f"{summary['bytes_before'] / 2**20:.2f} MiB -> "
                f"{summary['bytes_after'] / 2**20:.2f} MiB")
        for r in result.history:
            if r.site in result.fits:
                plot_site(tmp / files[r.site], r.site, result.fits[r.site])
        history = [{**r.to_dict(), "plot": files[r.site]} for r in result.history]
        report = {"meta": meta, "summary": summary, **result.to_dict(), "history": history,
                  "fits": {n: f.to_dict() for n, f in result.fits.items()}}
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=_json_default))
        lines = ["# RMT-KD compression", ""]
        lines += [f"- **{k}**: {v}" for k, v in meta.items()]
        lines += ["", "## Summary", ""]
        lines += [f"- **{k}**: {v}" for k, v in summary.get("table", {}).items()]
        lines += ["", "## Steps (shallow to deep)", "",
                  "metric before = at the start of the step; after surgery = reduced, before "
                  "distillation; after KD = after self-distillation.", "",
                  format_history(result.history, markdown=True), ""]
        lines += [f"- `{r.site}`: {r.reason}" for r in result.history]
        lines += ["", how, ""]
        for r in result.history:
            lines += [f"## {r.site}", "", f"![{r.site}]({files[r.site]})", ""]
        (tmp / "index.md").write_text("\n".join(lines))
    return out
